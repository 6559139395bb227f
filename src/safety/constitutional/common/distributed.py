"""Process-group helpers for the trainers under `torchrun` (the engines themselves are in parallel.py).

    torchrun --nproc_per_node 2 scripts/train_constitutional.py ...     # gloo on CPU, NCCL on GPU
    python scripts/train_constitutional.py ...                          # one process: everything here is a no-op

Every trainer (SFT, the reward model, DPO, PPO and GRPO/RLOO/REINFORCE) trains on PyTorch's engines
(`parallel.wrap`: DDP by default under torchrun; FSDP2 with `distributed: fsdp` for SFT, the reward
model and DPO): every rank works on its share of the data (`shard`) and the engine averages the
gradients inside `backward()`. The helpers here are the rest: joining the process group, the
start-of-run broadcast (`broadcast_model`), metric means, the all-ranks vote before a step, gathers.

Seeding rule: model initialisation uses the same seed on every rank (and is broadcast from rank 0
anyway); sampling (PPO rollouts) uses `seed + SAMPLING_SEED_STRIDE * rank`, so ranks draw different
answers. Data order (shuffles) is seeded identically on every rank, then `shard` cuts it.

Only rank 0 writes checkpoints, logs and reports (`is_main_process()`), followed by `barrier()` so
no rank reads a checkpoint before it exists (FSDP's sharded checkpoints: every rank writes its shard).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import List, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")
SAMPLING_SEED_STRIDE = 1_000_003  # rank r samples with seed + stride * r


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: int = 1800) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns True when running distributed. Without WORLD_SIZE, or with WORLD_SIZE=1, nothing happens.
    On CUDA each process is pinned to GPU LOCAL_RANK and uses NCCL; on CPU gloo.
    """
    if is_initialized():
        return True
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun (see docs/distributed.md)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sampling_seed(seed: int) -> int:
    """The seed this rank samples with (same seed on one process)."""
    return seed + SAMPLING_SEED_STRIDE * rank()


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of `items`: a contiguous block, sizes differing by at most one.

    Deterministic: every rank computes the same split of the same (identically ordered) sequence.
    A rank may get an empty share when len(items) < world_size; callers must still join collectives.
    """
    items = list(items)
    size, r = world_size(), rank()
    if size == 1:
        return items
    base, extra = divmod(len(items), size)
    start = r * base + min(r, extra)
    return items[start:start + base + (1 if r < extra else 0)]


def _device_for_collectives(tensor: torch.Tensor) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors (and CUDA ones by copying)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


@torch.no_grad()
def broadcast_model(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (so all start from identical weights)."""
    if world_size() == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        target = _device_for_collectives(tensor)
        buf = tensor.detach().to(target).clone()
        dist.broadcast(buf, src=src)
        tensor.copy_(buf.to(tensor.device))


def all_reduce_mean(value: Union[torch.Tensor, float, int]) -> Union[torch.Tensor, float]:
    """Mean over ranks of a metric (tensor or number); the value itself on one process."""
    if world_size() == 1:
        return value
    is_tensor = isinstance(value, torch.Tensor)
    tensor = value.detach().double() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    target = _device_for_collectives(tensor)
    buf = tensor.to(target).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = (buf / world_size()).to(tensor.device)
    return buf.to(value.dtype) if is_tensor else float(buf)


def all_true(flag: bool) -> bool:
    """True only if `flag` is True on every rank: ranks agree before skipping a step."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor(1.0 if flag else 0.0, dtype=torch.float64)
    buf = t.to(_device_for_collectives(t))
    dist.all_reduce(buf, op=dist.ReduceOp.MIN)
    return bool(buf.item() > 0.5)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (shares may differ in length), in rank order."""
    if world_size() == 1:
        return tensor
    device = tensor.device
    target = _device_for_collectives(tensor)
    local = tensor.detach().to(target)
    n = torch.tensor([local.numel()], device=target)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=local.dtype, device=target)
    padded[:local.numel()] = local.reshape(-1)
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(device)


__all__ = ["init_distributed", "destroy_distributed", "is_initialized", "world_size", "rank", "local_rank",
           "is_main_process", "barrier", "sampling_seed", "shard", "broadcast_model",
           "all_reduce_mean", "all_true", "all_gather_cat", "SAMPLING_SEED_STRIDE"]
