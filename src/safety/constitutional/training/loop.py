"""The one training loop: SFT, the reward model, PPO, GRPO/RLOO/REINFORCE and DPO all run it.

A trainer supplies only what is its own: `step() -> metrics`, one optimiser step (its batch, its
loss, `backward()`, `guarded_step.clip_and_step`) that ends with `loop.end_step(metrics, skipped)`,
and `save() -> path`, its checkpoint (which models, which optimiser state) written by `loop.save`.
The loop does the rest, the same way for every trainer:

    while loop.step < total_steps:
        metrics = step()          # the trainer's step; its last line, loop.end_step, steps the
                                  # learning-rate schedules, counts the step and applies the bad-step policy
        progress bar, one compact log line, one JSONL line (every `log_every` steps)
        checkpoint every `checkpoint_every` steps (and after the last step with `save_last`)
        Ctrl-C on any rank: checkpoint (unless this step has one), then KeyboardInterrupt

`end_step` is the trainer's call, not the loop's, because PPO's `train_step` is public API (the
guide's): a step taken outside `train` must count, schedule and stop exactly like one inside it.

Bad steps, one policy for every trainer. A step is bad when an update in it was skipped because a
loss or gradient norm was NaN/inf on some rank (`guarded_step`: weights and optimiser state are left
alone; the schedule still advances, so it follows the data position). One bad batch is tolerated; a
run of them means training has diverged. So the run stops with `TrainingError`, naming the last
checkpoint (every checkpoint holds weights no bad step touched), once MORE THAN `max_bad_steps`
steps IN A ROW were bad: `max_bad_steps=0` stops at the first bad step, and a good step resets the
count. The total number of skipped updates is reported with the final statistics.

Checkpoints are `<root>/checkpoint-<step:06d>` (`checkpoint.save_checkpoint`: atomic, the newest
`keep_last` kept); rank 0 writes, every rank waits. The loop's counters travel in the trainer state,
so a resumed run continues the step count and the bad-step count where they were.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Type

from tqdm.auto import tqdm

from ..common import checkpoint as ckpt
from ..common import distributed as ddp
from ..common import parallel
from ..common.interrupts import GracefulInterrupt, interrupted
from ..common.io import append_jsonl

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on: more than `max_bad_steps` bad steps in a row."""


class TrainingLoop:
    """The step loop and its bookkeeping (module docstring). `stage` names the run in logs and messages."""

    def __init__(self, stage: str, max_bad_steps: int, *, error: Type[TrainingError] = TrainingError,
                 advice: str = "Lower the learning rate.", keep_last: Optional[int] = 3,
                 log_file=None, log_every: int = 1):
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0 (0: stop at the first bad step), got {max_bad_steps}")
        self.stage, self.max_bad_steps, self.error, self.advice = stage, max_bad_steps, error, advice
        self.keep_last, self.log_file, self.log_every = keep_last, log_file, max(1, log_every)
        self.schedulers: list = []                 # stepped once per step by end_step; set by the trainer
        self.step = 0                              # steps done (a resumed run starts at its checkpoint's)
        self.consecutive_bad_steps = 0
        self.skipped_updates = 0                   # over the whole run (PPO may skip several per step)
        self.last_checkpoint: Optional[Path] = None
        self._saved_at: Optional[int] = None       # the step the last checkpoint was written at

    # -- one step -------------------------------------------------------------------------------
    def end_step(self, metrics: dict, skipped: int = 0) -> dict:
        """Close the step the trainer just took: step the schedules (after a skipped step too), count
        it, apply the bad-step policy. `skipped`: updates of this step skipped as non-finite."""
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in self.schedulers:
                scheduler.step()
        self.step += 1
        self.skipped_updates += int(skipped)
        self.consecutive_bad_steps = self.consecutive_bad_steps + 1 if skipped else 0
        if skipped:
            log.warning("%s step %d: non-finite loss or gradient, update skipped (%d bad step(s) in a row)",
                        self.stage, self.step, self.consecutive_bad_steps)
            self.log({"event": "bad_step", "step": self.step, "bad_steps_in_a_row": self.consecutive_bad_steps,
                      "skipped_updates": self.skipped_updates})
        if self.consecutive_bad_steps > self.max_bad_steps:
            where = (f"the last good checkpoint is in {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet")
            raise self.error(
                f"{self.stage} stopped: {self.consecutive_bad_steps} steps in a row had a NaN/inf loss or gradient "
                f"(max_bad_steps={self.max_bad_steps}). {self.advice} {where[0].upper()}{where[1:]}.")
        return metrics

    def log(self, record: dict) -> None:
        """One JSONL line on rank 0: {"stage", "time", "event": train | eval | bad_step | done, ...}."""
        if self.log_file and ddp.is_main_process():
            append_jsonl(self.log_file, {"stage": self.stage, "time": time.time(), **record})

    # -- the loop -------------------------------------------------------------------------------
    def run(self, step: Callable[[], dict], total_steps: int, save: Optional[Callable[[], Path]] = None, *,
            checkpoint_every: int = 0, save_last: bool = True, show: Optional[Dict[str, str]] = None,
            show_progress: bool = True) -> None:
        """Take steps until `total_steps` are done, from `self.step` (a resumed run continues).

        `save()` writes a checkpoint (None: the run has nowhere to write one). `save_last=False`
        leaves the last step's checkpoint to the trainer, which writes it after its final evaluation.
        `show` maps a label to the metric shown for it in the progress bar and the log line."""
        show = show or {}
        bar = tqdm(total=total_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True,
                   disable=not show_progress or not ddp.is_main_process())
        try:
            with GracefulInterrupt() as stop:  # Ctrl-C: finish this step, save, stop
                while self.step < total_steps:
                    metrics = step()
                    shown = {label: f"{metrics[key]:.4g}" for label, key in show.items()
                             if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])}
                    bar.update(1)
                    bar.set_postfix(shown)
                    log.info("%s step %d/%d %s", self.stage, self.step, total_steps,
                             " ".join(f"{k} {v}" for k, v in shown.items()))
                    if self.step % self.log_every == 0:
                        self.log({"event": "train", **metrics})
                    due = checkpoint_every and self.step % checkpoint_every == 0
                    if save is not None and (self.step == total_steps and save_last
                                             or due and self.step < total_steps):
                        save()
                    if stop.should_stop():
                        raise interrupted(self.stage, self.step, self._checkpoint_now(save))
        finally:
            bar.close()

    def _checkpoint_now(self, save: Optional[Callable[[], Path]]):
        if save is None:
            return "(nowhere: no checkpoint directory was given)"
        return self.last_checkpoint if self._saved_at == self.step else save()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "consecutive_bad_steps": self.consecutive_bad_steps,
                "skipped_updates": self.skipped_updates}

    def save(self, root, models: Dict[str, object], tokenizer=None, trainer_state: Optional[dict] = None,
             metadata: Optional[dict] = None, step: Optional[int] = None,
             optimizers: Optional[Dict[str, object]] = None) -> Path:
        """`<root>/checkpoint-<step>` (default: the current step) with `models` (Hugging Face folders;
        a plain nn.Module's weights ride in the trainer state), the trainer's state plus the loop's
        counters, and RNG states. Rank 0 writes; every rank returns the path once it exists.

        An FSDP-sharded model (`parallel.is_sharded`) is written by every rank with DCP as
        `<name>.dcp/`, together with its optimiser from `optimizers[name]` (so the trainer state must
        not hold that optimiser), plus a plain HF export `<name>/` gathered to rank 0."""
        step = self.step if step is None else step
        state = {**(trainer_state or {}), **self.state_dict()}
        folders, sharded = {}, {}
        for name, model in models.items():
            if parallel.is_sharded(model):
                optimizer = (optimizers or {}).get(name)

                def write(tmp, name=name, model=model, optimizer=optimizer):
                    parallel.save_sharded(tmp / f"{name}.dcp", model, optimizer)
                    parallel.export_hf(model, tokenizer, tmp / name)
                sharded[name] = write
            elif hasattr(model, "save_pretrained"):
                folders[name] = model
            else:
                state.setdefault("module_states", {})[name] = model.state_dict()
        if sharded or ddp.is_main_process():  # sharded: every rank writes its shards
            ckpt.save_checkpoint(root, step, folders, tokenizer=tokenizer, trainer_state=state,
                                 metadata=metadata, keep_last=self.keep_last, sharded=sharded)
        ddp.barrier()
        self.last_checkpoint, self._saved_at = ckpt.checkpoint_path(root, step), self.step
        return self.last_checkpoint

    def resume(self, path, check: Optional[Callable[[ckpt.Checkpoint], None]] = None) -> ckpt.Checkpoint:
        """Load the checkpoint at `path` (or the newest complete one under it): RNG states and the
        loop's counters are restored; `check(loaded)` may refuse it before anything else is. The
        trainer restores its models (`load_models`), optimisers and schedules from the result."""
        resolved = ckpt.latest_checkpoint(path)
        if resolved is None:
            raise FileNotFoundError(f"cannot resume: no complete checkpoint at {path}")
        loaded = ckpt.load_checkpoint(resolved, restore_rng=True)
        if check is not None:
            check(loaded)
        state = loaded.trainer_state
        self.step = int(state.get("step", loaded.step))
        self.consecutive_bad_steps = int(state.get("consecutive_bad_steps", 0))
        # older checkpoints named the total differently (PPO/DPO: total_skipped_updates, SFT/RM: bad_steps)
        self.skipped_updates = int(state.get("skipped_updates", state.get("total_skipped_updates",
                                                                          state.get("bad_steps", 0))))
        self.last_checkpoint, self._saved_at = loaded.path, self.step
        log.info("resumed %s from %s at step %d", self.stage, loaded.path, self.step)
        return loaded


def load_models(loaded: ckpt.Checkpoint, models: Dict[str, object],
                optimizers: Optional[Dict[str, object]] = None) -> None:
    """Restore `models` in place (optimisers keep their references) from what `TrainingLoop.save` wrote.

    A sharded `<name>.dcp/` is preferred when present: it loads into the current layout (FSDP over any
    number of ranks, or a plain model) together with `optimizers[name]`. Otherwise the trainer
    restores the optimiser from its trainer state."""
    module_states = loaded.trainer_state.get("module_states", {})
    for name, model in models.items():
        dcp_dir = loaded.path / f"{name}.dcp"
        if dcp_dir.is_dir():
            parallel.load_sharded(dcp_dir, model, (optimizers or {}).get(name))
        elif parallel.is_sharded(model):
            raise NotImplementedError(
                f"{loaded.path} holds a plain (unsharded) '{name}': resuming it under FSDP is not wired; "
                "resume with distributed=ddp or none, or start the FSDP run from its exported weights")
        elif name in module_states:
            model.load_state_dict(module_states[name])
        else:
            ckpt.load_model_weights(model, loaded.model_dir(name))


def recent_means(history: Sequence[dict], keys: Dict[str, str], last: int = 10) -> Dict[str, float]:
    """{name: mean of metric `key` over the last `last` steps' finite values (NaN if none)}: final stats."""
    recent = history[-last:]
    out = {}
    for name, key in keys.items():
        values = [h[key] for h in recent if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
        out[name] = float(sum(values) / len(values)) if values else float("nan")
    return out


class LoopCounters:
    """The loop's counters under the names the RL and DPO trainers have always exposed (`self.loop`)."""

    loop: TrainingLoop

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def consecutive_bad_steps(self) -> int:
        return self.loop.consecutive_bad_steps

    @property
    def total_skipped_updates(self) -> int:
        return self.loop.skipped_updates

    @property
    def last_checkpoint(self) -> Optional[Path]:
        return self.loop.last_checkpoint


__all__ = ["TrainingLoop", "TrainingError", "load_models", "recent_means", "LoopCounters"]
