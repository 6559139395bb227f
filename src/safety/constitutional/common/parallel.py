"""The trainers on PyTorch's own data-parallel engines: DDP for models that fit a device, FSDP2 for
those that do not.

    par = parallel.wrap(model, "auto")      # auto: DDP under torchrun (world size > 1), else as is
    loss = par(lambda m: my_loss(m, batch))  # every training forward goes through the engine
    with par.no_sync(): loss.backward()      # gradient accumulation: no reduction for this backward
    model = par.unwrap()                     # a plain model again, for generation and saving

Modes (`distributed` on the SFT, reward-model, DPO and online RL configs: PPO, GRPO/RLOO/REINFORCE):

* `none`: the model as it is; one process only (with several processes it is an error: nothing else
  averages the gradients);
* `ddp`: `DistributedDataParallel`; every rank holds the whole model and gradients are averaged in
  buckets during `backward()`;
* `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, then on the whole;
  parameters, gradients and optimiser state are sharded over the ranks. On CUDA parameters are
  gathered in bf16 and gradients reduced in fp32 (`MixedPrecisionPolicy`); on CPU (gloo) in fp32;
  Not for the online RL trainers yet (their configs refuse it): generation needs the full weights;
* `auto` (default): `ddp` when the world size is > 1, else `none`.
  With one process `ddp` and `fsdp` fall back to `none` (nothing to parallelise); a sharded
  checkpoint still loads then, into the plain model.

Why the closure (`par(fn)`): the trainers compute their losses by calling parts of the model (the
backbone, then the LM head on the answer positions only; the top layers on cached features), not
`model.forward`. DDP prepares its gradient reduction, and FSDP gathers the parameters that live
outside the decoder layers (embeddings, final norm, heads), only inside the wrapper's forward. So
the engine wraps a small `Forward` module whose forward is `fn(model)`: any computation on the
model runs inside it. Under FSDP every forward, evaluation included, must go through it, on every
rank, the same number of times.

The guarded step leaves the gradient averaging to the engine (it refuses an unwrapped model under
torchrun, `is_wrapped`); clipping and the finite-norm vote are the same for every mode (the norm of FSDP's sharded
gradients is reduced over ranks by `clip_grad_norm_`).

Checkpoints of a sharded model: `save_sharded` writes model and optimiser state with
`torch.distributed.checkpoint` (DCP, every rank writes its shards); `load_sharded` reads them back
into the current layout, which may have a different world size, or be one plain process.
`export_hf` writes a plain Hugging Face folder (the full weights gathered to rank 0).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from src.models.heads import ScalarHeadModel, backbone_of

from . import distributed as ddp

log = logging.getLogger(__name__)

MODES = ("auto", "ddp", "fsdp", "none")
_MARK = "_cai_parallel_mode"   # set on a wrapped model: guarded_step then leaves its gradients to the engine


class Forward(nn.Module):
    """Runs `fn(model, *args)` as its forward, so DDP and FSDP see every computation on the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        out = fn(self.model, *args, **kwargs)
        # FSDP hooks the output for its backward; an in-place op on a view would drop that hook
        return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out


def check_mode(mode: str, where: str = "distributed") -> str:
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def resolve_mode(mode: str) -> str:
    """`auto` -> `ddp` with several processes, else `none`; `ddp`/`fsdp` with one process -> `none`."""
    check_mode(mode)
    if ddp.world_size() <= 1:
        return "none"
    return "ddp" if mode == "auto" else mode


def is_wrapped(model: nn.Module) -> bool:
    """True when DDP or FSDP reduces this model's gradients (under torchrun every trained model must be)."""
    return getattr(model, _MARK, "none") != "none"


def is_sharded(model: nn.Module) -> bool:
    return getattr(model, _MARK, "none") == "fsdp"


def decoder_layers(model: nn.Module):
    """The transformer's decoder layers (one FSDP unit each)."""
    layers = getattr(backbone_of(model), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (expected backbone.layers)")
    return list(layers)


class Parallel:
    """A model and the engine that trains it (see the module docstring). `model` stays the plain
    module (for FSDP: its parameters are sharded DTensors until `unwrap`)."""

    def __init__(self, model: nn.Module, mode: str, engine: Optional[nn.Module]):
        self.model, self.mode, self.engine = model, mode, engine

    @property
    def wrapped(self) -> bool:
        return self.engine is not None

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.engine is None:
            return fn(self.model, *args, **kwargs)
        return self.engine(fn, *args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally during this backward (all but the last micro-batch)."""
        if self.mode == "ddp":
            with self.engine.no_sync():
                yield
        elif self.mode == "fsdp":
            self.engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.engine.set_requires_gradient_sync(True)
        else:
            yield

    def unwrap(self) -> nn.Module:
        """The plain model: the same object for `none`/`ddp` (DDP never copies the parameters); for
        FSDP a new, unsharded copy on every rank (the full weights gathered), which generation and
        `save_pretrained` can use. Training through this `Parallel` ends with an FSDP unwrap."""
        if self.mode != "fsdp":
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        plain = _fresh_like(self.model)
        plain.load_state_dict(full, strict=False, assign=True)
        _copy_buffers(self.model, plain)
        if hasattr(plain, "tie_weights"):
            plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"unwrapping the FSDP model left parameters unset: {missing[:5]}")
        trainable = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for name, p in plain.named_parameters():
            p.requires_grad_(trainable.get(name, True))
        plain.train(self.model.training)
        self.engine = None
        self.mode = "none"
        self.model = plain
        return plain


def wrap(model: nn.Module, mode: str = "auto", device=None) -> Parallel:
    """Put `model` on the engine `mode` names (module docstring). Build the optimiser AFTER this:
    FSDP replaces the parameters with sharded ones."""
    resolved = resolve_mode(mode)
    if resolved == "none" and ddp.world_size() > 1:
        raise ValueError(f"distributed='none' with {ddp.world_size()} processes would train {ddp.world_size()} "
                         "diverging copies (nothing averages the gradients): use 'auto' or 'ddp'")
    if resolved == "none":
        return Parallel(model, "none", None)
    if is_wrapped(model):
        raise RuntimeError("this model is already wrapped for data parallelism")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    forward = Forward(model)
    if resolved == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: buffers (rotary tables) are computed identically on every rank, and
        # evaluation forwards (not the same count on every rank) must not issue collectives.
        cuda_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        engine = DDP(forward, device_ids=[cuda_index] if cuda_index is not None else None,
                     broadcast_buffers=False)
    else:
        engine = _fully_shard(forward, model, device)
    setattr(model, _MARK, resolved)
    log.info("training %s with %s over %d processes", type(model).__name__, resolved.upper(), ddp.world_size())
    return Parallel(model, resolved, engine)


def _fully_shard(forward: Forward, model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any("lora" in name.lower() for name, _ in model.named_modules()):
        raise NotImplementedError("FSDP with LoRA adapters is not wired: use distributed=ddp with lora_r")
    mesh = init_device_mesh(device.type, (ddp.world_size(),))
    kwargs = {"mesh": mesh}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # the root: embeddings, final norm and heads, gathered for the whole of each forward
    return fully_shard(forward, **kwargs)


def _fresh_like(model: nn.Module) -> nn.Module:
    """An uninitialised (meta) copy of an HF model or a ScalarHeadModel, same class and config."""
    with torch.device("meta"):
        if isinstance(model, ScalarHeadModel):
            fresh = type(model)(type(model.model)(model.model.config))
        else:
            fresh = type(model)(model.config)
    if hasattr(model, "generation_config") and hasattr(fresh, "generation_config"):
        fresh.generation_config = model.generation_config
    return fresh


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Buffers (rotary tables; FSDP does not shard them) from `source` into `target`, by name."""
    for name, buf in source.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(leaf, buf.detach().clone(), persistent=persistent)


# -- checkpoints --------------------------------------------------------------------------------

def _dcp_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """{"model": ..., "optimizer": ...} keyed by parameter names, in the model's current layout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def _dcp(action, state: dict, folder) -> None:
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, which is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        action(state, checkpoint_id=str(folder), no_dist=not ddp.is_initialized())


def save_sharded(folder, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Path:
    """Model (and optimiser) state with DCP into `folder`; every rank calls it and writes its shards.
    Keys are parameter names, so the checkpoint loads into any world size (`load_sharded`)."""
    import torch.distributed.checkpoint as dcp

    _dcp(dcp.save, _dcp_state(model, optimizer), folder)
    return Path(folder)


def load_sharded(folder, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Read a `save_sharded` checkpoint into `model` (and `optimizer`) in place, whatever the current
    layout: FSDP over any number of ranks, DDP, or one plain process (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _dcp_state(model, optimizer)
    _dcp(dcp.load, state, folder)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])


def export_hf(model: nn.Module, tokenizer, folder) -> Optional[Path]:
    """A plain Hugging Face folder (safetensors, config, tokenizer) of `model`'s full weights.

    Sharded models: every rank must call it (the weights are gathered to rank 0, on CPU); rank 0
    writes. Plain models: rank 0 writes. Returns the folder on rank 0, None elsewhere."""
    folder = Path(folder)
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        target = model.model if isinstance(model, ScalarHeadModel) else model
        state = get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ddp.is_main_process():
        return None
    if state is None:
        model.save_pretrained(folder)
    else:
        target.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


__all__ = ["MODES", "Forward", "Parallel", "wrap", "resolve_mode", "check_mode", "is_wrapped", "is_sharded",
           "decoder_layers", "save_sharded", "load_sharded", "export_hf"]
