"""The guarded optimiser step that SFT, the reward model, PPO, GRPO/RLOO/REINFORCE and DPO all take.

After the trainer's own loss and `backward()`:
  1. every rank agrees whether the loss was finite before any gradient collective
     (`finite_on_all_ranks`; one process: just the check), so all ranks skip together;
  2. under torchrun the gradients were already averaged over ranks inside `backward()` by DDP or FSDP
     (every trained model is wrapped by `parallel.wrap`; an unwrapped one with several processes is an
     error, since nothing would average its gradients);
  3. each model's gradient is clipped to its `max_norm` (None: only measured);
  4. if every norm is finite, every optimiser steps; otherwise the gradients are dropped and the
     caller counts a bad step (each trainer's `max_bad_steps` policy decides when to stop);
  5. the CPU thread governor gets its chance to re-check the machine's load (src/models/threads.py).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from src.models.threads import adapt_threads

from ..common import distributed as ddp
from ..common.parallel import is_wrapped

__all__ = ["clip_and_step", "finite_on_all_ranks", "grad_norm"]


def finite_on_all_ranks(*losses) -> bool:
    """True when every loss is finite on every rank (the vote happens in every process, or none hangs)."""
    local = all(bool(torch.isfinite(torch.as_tensor(loss)).all()) for loss in losses)
    return ddp.all_true(local)


def grad_norm(model: nn.Module, max_norm: Optional[float]) -> float:
    """The global L2 norm of `model`'s gradients, clipped in place to `max_norm` unless it is None."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        if any(_is_dtensor(p.grad) for p in params):  # FSDP: shards; get_total_norm reduces over ranks
            return _as_float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return _as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def _as_float(norm) -> float:
    return float(norm.full_tensor() if _is_dtensor(norm) else norm)


def clip_and_step(parts: Sequence[Tuple[nn.Module, torch.optim.Optimizer, Optional[float]]]) -> Tuple[List[float], bool]:
    """Steps 2-5 above for (model, optimizer, max_norm) triples whose gradients are in place.

    Returns (the gradient norms before clipping, whether the optimisers stepped). Gradients are
    cleared either way."""
    # mean over ranks, before clipping: DDP/FSDP reduced the gradients in backward()
    if ddp.world_size() > 1:
        unwrapped = [type(model).__name__ for model, _, _ in parts if not is_wrapped(model)]
        if unwrapped:
            raise RuntimeError(f"{', '.join(unwrapped)} is trained by {ddp.world_size()} processes but not wrapped "
                               "by parallel.wrap (DDP/FSDP): nothing would average its gradients over the ranks")
    norms = [grad_norm(model, max_norm) for model, _, max_norm in parts]
    stepped = all(math.isfinite(n) for n in norms)
    if stepped:
        for _, optimizer, _ in parts:
            optimizer.step()
    for _, optimizer, _ in parts:
        optimizer.zero_grad(set_to_none=True)
    adapt_threads()
    return norms, stepped
