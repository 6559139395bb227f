"""One checkpoint format for every stage.

    <root>/checkpoint-000120/
        policy/ value/ ...      models, each a plain Hugging Face directory (safetensors)
        policy.dcp/             an FSDP-sharded model with its optimiser state (torch.distributed.checkpoint,
                                one file per rank that wrote it; loads into any world size: parallel.load_sharded)
        trainer_state.pt        optimisers, schedulers, counters: tensors and plain types only,
                                so it loads with torch.load(weights_only=True) (no arbitrary pickle)
        rng_state.pt            Python/NumPy/torch RNG states, for bit-exact resume on CPU
        checkpoint.json         step, metadata, and `"complete": true`, written last

A checkpoint is built in a temporary folder and renamed into place, so a crash mid-save (or a full
disk) leaves the previous checkpoint untouched; a folder without a complete checkpoint.json is
never loaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from src.models.device import get_rng_state, set_rng_state

from . import distributed as ddp
from .io import atomic_write_json

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
META_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    metadata: dict
    trainer_state: dict
    rng_state: Optional[dict]

    def model_dir(self, name: str) -> Path:
        return self.path / name


def checkpoint_path(root, step: int) -> Path:
    return Path(root) / f"checkpoint-{step:06d}"


def save_checkpoint(root, step: int, models: Dict[str, object], tokenizer=None,
                    trainer_state: Optional[dict] = None, metadata: Optional[dict] = None,
                    keep_last: Optional[int] = 3, sharded: Optional[Dict[str, Callable[[Path], None]]] = None) -> Path:
    """Write models + state atomically as `<root>/checkpoint-<step>`; returns its path.

    Without `sharded` rank 0 alone calls this. With `sharded` ({name: write(checkpoint_folder)}, the
    FSDP models' DCP writers, `parallel.save_sharded`) EVERY rank calls it: all ranks write their
    shards into one temporary folder, then rank 0 adds the rest and renames it into place."""
    root = Path(root)
    target = checkpoint_path(root, step)
    if sharded:
        tmp = root / f".tmp-{target.name}-sharded"   # one name every rank computes
        if ddp.is_main_process():
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)   # a crashed earlier attempt
            tmp.mkdir()
        ddp.barrier()
        try:
            for write in sharded.values():
                write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ddp.barrier()
        if not ddp.is_main_process():
            return target
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        for name, model in models.items():
            model.save_pretrained(tmp / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        torch.save(trainer_state or {}, tmp / "trainer_state.pt")
        torch.save(get_rng_state(), tmp / "rng_state.pt")
        atomic_write_json(tmp / META_FILE, {"step": step, "complete": True,
                                            "models": sorted(set(models) | set(sharded or {})),
                                            "sharded": sorted(sharded or {}),
                                            "metadata": metadata or {}})
        _fsync_tree(tmp)
        if target.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-{target.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous checkpoint back before reporting the error
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == 28:
            raise OSError(err.errno, f"disk full while saving checkpoint {target}; "
                                     "earlier checkpoints are intact") from err
        raise
    if keep_last:
        _prune(root, keep_last)
    return target


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep_last: int) -> None:
    complete = [p for _, p in _complete_checkpoints(root)]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _read_meta(path: Path) -> Optional[dict]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("complete") else None


def _complete_checkpoints(root: Path):
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if not match or not child.is_dir():
            continue
        if _read_meta(child) is None:
            log.warning("ignoring incomplete checkpoint %s (no complete %s)", child, META_FILE)
            continue
        found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root) -> Optional[Path]:
    """Newest complete checkpoint under `root` (or `root` itself if it is one); None if there is none."""
    root = Path(root)
    if _read_meta(root) is not None:
        return root
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_checkpoint(path, restore_rng: bool = True) -> Checkpoint:
    """Read a checkpoint's state (models are loaded by the caller from `model_dir(name)`)."""
    path = Path(path)
    resolved = latest_checkpoint(path)
    if resolved is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    meta = _read_meta(resolved)
    trainer_state = torch.load(resolved / "trainer_state.pt", map_location="cpu", weights_only=True)
    rng_file = resolved / "rng_state.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return Checkpoint(resolved, int(meta["step"]), meta.get("metadata", {}), trainer_state, rng)


def load_model_weights(model, directory: Path) -> None:
    """Load safetensors weights from an HF directory into an existing model, in place (keeps optimiser refs)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    state = {}
    for file in files:
        state.update(load_file(file, device=str(next(model.parameters()).device)))
    target = getattr(model, "model", model) if not any(k in state for k in model.state_dict()) else model
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = getattr(getattr(target, "config", None), "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"weights in {directory} do not match the model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
