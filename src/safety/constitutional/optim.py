"""The one AdamW every trainer uses: torch's fused kernel wherever it runs.

The default (for-loop) AdamW makes about ten passes over memory per parameter tensor; the fused one
makes one. For the 267M parameters of a PPO policy + value model on a 2-core CPU that is 1.9 s ->
0.24 s per optimiser step (docs/performance.md), and Hugging Face's Trainer (hence TRL) already
defaults to it. The update is the same AdamW; only the floating-point evaluation order differs.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch


def adamw(params: Iterable[Union[torch.Tensor, dict]], **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW(params, **kwargs), fused when every parameter is a float tensor on CPU/CUDA."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors) \
        and len({p.device for p in tensors}) == 1
    return torch.optim.AdamW(groups, fused=fused, **kwargs)
