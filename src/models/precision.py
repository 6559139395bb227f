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


_twins: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def sampling_twin(model: nn.Module) -> nn.Module:
    """`model` with its parameters in the compute dtype, for decoding; `model` itself under fp32.

    Decoding reads every weight once per token, so it is bound by memory traffic: bf16 weights halve
    it (1.8x tokens/s at batch 8 on 2 CPU cores), where autocast would re-cast fp32 weights at each
    token. The twin is built once per model and refreshed from the live weights at every call, so it
    always samples from the current policy. Buffers (rotary frequencies) stay fp32. Log-probs used
    for training never come from the twin: `generation` recomputes them under autocast.
    """
    param = next(model.parameters())
    dtype = compute_dtype(param.device)
    quantized = any("quantized" in type(m).__module__ for m in model.modules())  # e.g. an int8 copy
    if dtype is None or param.dtype != torch.float32 or quantized:
        return model
    twin = _twins.get(model)
    if twin is None:
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.data = p.data.to(dtype)
        twin.requires_grad_(False)
        _twins[model] = twin
    else:
        for dst, src in zip(twin.parameters(), model.parameters()):
            dst.copy_(src)
    twin.eval()
    return twin


__all__ = ["PRECISIONS", "autocast", "compute_dtype", "get_precision", "native_bf16", "sampling_twin",
           "set_precision"]
