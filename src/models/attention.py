"""Which attention kernel a forward uses: plain matmul-softmax attention for short sequences on CPU.

PyTorch's CPU SDPA (a flash-attention kernel) is built for long sequences; at RLHF lengths (tens to
a couple hundred tokens) its backward is slower than two matmuls and a softmax. Measured with
SmolLM2-135M under bf16 autocast on 2 Zen 4 cores, batch 8 x 94 tokens: backward 1.04 s with
eager attention vs 1.26 s with SDPA, and a whole PPO iteration 22.4-22.9 s vs 26.4-28.2 s
(docs/performance.md). Eager attention keeps (batch, heads, T, T) probabilities for the backward,
about 6 bytes per element per layer: at T = 256 and batch 8 that is 0.85 GB for a 30-layer model,
so longer sequences keep SDPA. On CUDA SDPA is always used, and so it is under gradient
checkpointing (its recomputation runs outside the forward's block). Forwards through eager
attention are not bit-identical across two copies of a model in fp32 (the matmul kernels depend on
memory alignment; 1 ulp), where SDPA's were.

The switch is Hugging Face's own: `config._attn_implementation` is read at every forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .checkpointing import uses_gradient_checkpointing

EAGER_MAX_TOKENS = 256


@contextlib.contextmanager
def attention_for(model: nn.Module, tokens: torch.Tensor) -> Iterator[str]:
    """Eager attention inside this block if `model` uses SDPA and the (batch, seq) `tokens` (ids or
    attention mask) are short and on CPU."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or tokens.device.type != "cpu" or tokens.shape[-1] > EAGER_MAX_TOKENS \
            or uses_gradient_checkpointing(model):  # its recomputation runs outside this block: one kernel
        yield current
        return
    config._attn_implementation = "eager"
    try:
        yield "eager"
    finally:
        config._attn_implementation = current


# -- padding-free packed sequences ----------------------------------------------------------------

PACKED = "cai_packed"  # the attention implementation name registered with Hugging Face below


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float, dropout: float = 0.0, cu_seq_lens_q=None, **kwargs):
    """Causal attention within each sequence of one packed row, (1, heads, total, dim) in; the
    sequences' boundaries are `cu_seq_lens_q` (cumulative lengths, flash-attention's varlen name).
    Short sequences on CPU take matmul-softmax-matmul (faster than CPU SDPA at these lengths, see
    above), long ones or CUDA take SDPA; no (total x total) mask is ever built."""
    bounds = cu_seq_lens_q.tolist()
    groups = getattr(module, "num_key_value_groups", query.shape[1] // key.shape[1])
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if query.device.type != "cpu" or end - start > EAGER_MAX_TOKENS:
            outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling))
            continue
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, torch.finfo(scores.dtype).min).softmax(-1, dtype=torch.float32)
        outputs.append(torch.matmul(probs.to(q.dtype), v))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def takes_4d_masks(model: nn.Module) -> bool:
    """Whether the model's attention kernel reads a custom 4-D mask and can be switched to
    `_packed_attention`: Hugging Face's eager and SDPA kernels (flash-attention reads padding only)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in (None, "sdpa", "eager")


def _register_packed() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED, _packed_attention)


@contextlib.contextmanager
def packed_attention(model: nn.Module) -> Iterator[bool]:
    """Inside this block `model` attends within the sequences of a packed row: call it with
    `cu_seq_lens_q` / `cu_seq_lens_k` (cumulative lengths) and per-sequence `position_ids`.
    Flash-attention kernels read those natively; eager and SDPA models switch to `_packed_attention`.
    Yields False (and changes nothing) where packing cannot work: gradient checkpointing (the
    recomputation runs outside this block) or a kernel that is neither of these."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if str(current).startswith("flash_attention"):
        yield True
        return
    if current is None or not takes_4d_masks(model) or uses_gradient_checkpointing(model):
        yield False
        return
    _register_packed()
    config._attn_implementation = PACKED
    try:
        yield True
    finally:
        config._attn_implementation = current


def can_pack(model: nn.Module) -> bool:
    with packed_attention(model) as ok:
        return ok


__all__ = ["EAGER_MAX_TOKENS", "attention_for", "can_pack", "packed_attention", "takes_4d_masks"]
