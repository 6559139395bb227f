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


__all__ = ["EAGER_MAX_TOKENS", "attention_for"]
