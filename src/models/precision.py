"""Mixed precision: weights stay fp32, matmuls run in bf16 where the hardware does bf16 natively.

Why fp32 weights: AdamW steps at RLHF learning rates (1e-5 on weights of magnitude ~0.02) are
smaller than bf16's resolution (8 mantissa bits, ~0.4% relative), so pure-bf16 weights silently
drop most updates. Autocast keeps fp32 master weights and casts them to bf16 per matmul.

Why bf16 on CPU too: on CPUs with AVX512-BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire Rapids)
oneDNN's bf16 matmul runs ~2.4x the fp32 rate (measured 410 vs 170 GFLOP/s on 2 Zen 4 cores,
docs/performance.md). Without those instructions bf16 is emulated and slower, so "auto" stays fp32.

The setting is process-wide: `set_precision("fp32" | "bf16" | "auto")`, or $CAI_PRECISION; every
forward of the toolkit (`logprobs`, scalar heads, `generation`, the trainers) asks `autocast(device)`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import weakref
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .lora import has_lora, merge_lora

PRECISIONS = ("auto", "bf16", "fp32")
_setting: Optional[str] = None


def set_precision(precision: Optional[str]) -> None:
    """Process-wide compute precision; None goes back to $CAI_PRECISION (default "auto")."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    global _setting
    _setting = precision


def get_precision() -> str:
    value = _setting or os.environ.get("CAI_PRECISION", "auto") or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"CAI_PRECISION={value!r} is not one of {PRECISIONS}")
    return value


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Does this device multiply bf16 matrices in hardware (faster than fp32)?"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def compute_dtype(device: Union[str, torch.device], precision: Optional[str] = None) -> Optional[torch.dtype]:
    """bf16 when matmuls should run in bf16 on `device`, None for plain fp32."""
    precision = precision or get_precision()
    if precision == "fp32":
        return None
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: Union[str, torch.device]) -> Iterator[Optional[torch.dtype]]:
    """torch.autocast to the compute dtype of `device` (a no-op under fp32); yields that dtype."""
    device = torch.device(device)
    dtype = compute_dtype(device)
    if dtype is None:
        yield None
        return
    with torch.autocast(device.type, dtype=dtype):
        yield dtype


class PackedLinear(nn.Module):
    """A bf16 Linear whose weight oneDNN has pre-packed into its blocked layout (CPU, decoding only).

    A plain bf16 matmul re-packs its weight on every call; with 8 rows per call (batch-8 decoding)
    that re-packing is most of the work. Measured on 2 Zen 4 cores: 11 GB/s of weights read
    unpacked vs 15 GB/s packed for one (8 x 576) @ (576 x 1536) product, and 1.1-1.3x tokens/s for
    batch-8 decoding of SmolLM2-135M (docs/performance.md). Same numbers as F.linear in bf16.
    """

    def __init__(self, source: nn.Linear, rows_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features, self.rows_hint = source.in_features, source.out_features, rows_hint
        self.bias = None if source.bias is None else source.bias.detach().to(torch.bfloat16)
        self.refresh(source)

    def refresh(self, source: nn.Linear) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(source.weight.detach().to(torch.bfloat16), self.rows_hint)
        if self.bias is not None:
            self.bias.copy_(source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def _can_pack(device: torch.device) -> bool:
    """oneDNN's packed bf16 linear is available and gives F.linear's numbers (checked once)."""
    global _PACK_OK
    if device.type != "cpu":
        return False
    if _PACK_OK is None:
        try:
            # a private generator: the probe must not move the global RNG (sampling would depend on
            # whether this ran before, and a resumed run would no longer repeat an uninterrupted one)
            gen = torch.Generator().manual_seed(0)
            probe = nn.Linear(64, 48, bias=False, device="meta").to_empty(device="cpu")
            with torch.no_grad():
                probe.weight.normal_(generator=gen)
            x = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
            _PACK_OK = torch.equal(PackedLinear(probe)(x), nn.functional.linear(x, probe.weight.to(torch.bfloat16)))
        except (AttributeError, RuntimeError):  # op missing from this torch build, or no oneDNN bf16
            _PACK_OK = False
    return _PACK_OK


_PACK_OK: Optional[bool] = None


class _Twin:
    """The decoding copy and, per piece, where in the live model it is refreshed from.
    `own=True`: `model` is already a private copy, converted in place (never refreshed)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, pack: bool, own: bool = False):
        self.module = (model if own else copy.deepcopy(model)).requires_grad_(False)
        sources = dict(model.named_modules())
        self.packed = []
        if pack:
            for name, parent in list(self.module.named_modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        packed = PackedLinear(child)
                        setattr(parent, child_name, packed)
                        self.packed.append((packed, sources[f"{name}.{child_name}" if name else child_name]))
        live = dict(model.named_parameters(remove_duplicate=False))
        self.params = [(p, live[name]) for name, p in self.module.named_parameters(remove_duplicate=False)]
        for p, _ in self.params:
            p.data = p.data.to(dtype)

    def refresh(self) -> nn.Module:
        for dst, src in self.params:
            dst.copy_(src)
        for packed, source in self.packed:
            packed.refresh(source)
        return self.module


_twins: "weakref.WeakKeyDictionary[nn.Module, _Twin]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def sampling_twin(model: nn.Module) -> nn.Module:
    """`model` with its weights in the compute dtype, for decoding; `model` itself under fp32.

    Decoding reads every weight once per token, so it is bound by memory traffic: bf16 weights halve
    it (1.8x tokens/s at batch 8 on 2 CPU cores), where autocast would re-cast fp32 weights at each
    token; on CPU the Linear weights are also pre-packed for oneDNN (`PackedLinear`). The twin is
    built once per model and refreshed from the live weights at every call, so it always samples
    from the current policy. Buffers (rotary frequencies) stay fp32. Log-probs used for training
    never come from the twin: `generation` recomputes them under autocast.
    """
    param = next(model.parameters())
    dtype = compute_dtype(param.device)
    quantized = any("quantized" in type(m).__module__ for m in model.modules())  # e.g. an int8 copy
    if dtype is None or param.dtype != torch.float32 or quantized:
        return model
    pack = dtype == torch.bfloat16 and _can_pack(param.device)
    if has_lora(model):  # adapters folded into a fresh copy: their weights change at every step
        module = _Twin(merge_lora(copy.deepcopy(model)), dtype, pack, own=True).module
        module.eval()
        return module
    twin = _twins.get(model)
    if twin is None:
        twin = _twins[model] = _Twin(model, dtype, pack)
    module = twin.refresh()
    module.eval()
    return module


# Inputs of this many rows or fewer (and more than one) take the weight-major product in decoding.
DECODE_ROWS = 256


def _weight_major_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features
    if not 1 < rows <= DECODE_ROWS:
        return nn.functional.linear(x, self.weight, self.bias)
    out = (self.weight @ x.reshape(rows, self.in_features).t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def decoding_matmuls(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, the fp32 Linear layers of `model` on CPU compute few-row inputs as
    (W @ x^T)^T instead of x @ W^T: the same product, another BLAS call.

    Decoding multiplies a few rows (one per sequence) by every weight matrix, and MKL's kernel for
    x @ W^T with W stored (out, in) reads the weights slowly at few rows: on this project's 2-core AVX2
    machine, 8 rows x (576 x 1536) weights ran at 6.6 GB/s of weights read against 9.3 GB/s for
    W @ x^T (the LM head 4.4 vs 9.8), and batch-8 greedy decoding of SmolLM2-135M went from 55 to 74
    tokens/s with the same tokens (docs/performance.md). One row (batch-1 decoding) and large inputs
    (prefill, training) keep F.linear. Numbers equal F.linear's to float rounding (tested); bf16 twins
    (PackedLinear), quantised copies and CUDA are left alone."""
    param = next(model.parameters(), None)
    layers = [] if param is None or param.device.type != "cpu" else [
        m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    for m in layers:
        m.forward = _weight_major_linear.__get__(m)  # an instance attribute: removed on the way out
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


__all__ = ["PRECISIONS", "PackedLinear", "autocast", "compute_dtype", "decoding_matmuls", "get_precision", "native_bf16", "sampling_twin",
           "set_precision"]
