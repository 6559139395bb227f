"""Direct Preference Optimisation on preference pairs (Rafailov et al. 2023): no reward model, no rollouts.

    trainer = DPOTrainer(policy, tokenizer, DPOConfig(beta=0.1))
    result = trainer.train(pairs, eval_pairs=held_out)       # pairs: hh_rlhf.PreferencePair list

One step: a batch of pairs becomes one (2B, P + R) token batch (chosen rows, then rejected rows;
prompt left-padded, answer right-padded, the layout every stage uses), the shared
`logprobs.sequence_logprobs` gives the policy's answer log-probs, and `rl.primitives.dpo_loss`
compares them with the reference's. The reference's log-probs are computed ONCE for every pair,
under inference_mode, before training; the reference is then released if this trainer made it.
The step loop, bad-step policy, Ctrl-C, checkpoints and logs are `training.loop.TrainingLoop`'s;
checkpoints resume exactly (same weights as an uninterrupted run).
Under torchrun each rank takes its block of every batch and gradients are averaged (`guarded_step`),
so the weights equal one process's on the whole batch; rank 0 writes.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..common import distributed as ddp
from ..common import parallel
from ..common.pairs import PreferencePair
from ..training.generation import GenerationConfig, encode_answers, encode_prompts, left_pad
from ..training.guarded_step import clip_and_step, finite_on_all_ranks
from ..training.logprobs import sequence_logprobs
from ..training.loop import LoopCounters, TrainingError, TrainingLoop, load_models, recent_means
from ..training.optim import LR_SCHEDULES, adamw, lr_scheduler
from .primitives import DPO_LOSS_TYPES, dpo_loss
from .rollout import disable_dropout

log = logging.getLogger(__name__)


class DPOTrainingError(TrainingError):
    """Training cannot go on (more than max_bad_steps non-finite steps in a row)."""


@dataclass
class DPOConfig:
    beta: float = 0.1                      # implicit-reward scale; smaller = further from the reference
    loss_type: str = "sigmoid"             # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0           # conservative DPO: assume this share of labels are flipped
    use_pair_labels: bool = True           # soft AI-feedback labels (PreferencePair.label) as targets
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    lr_schedule: str = "linear"            # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    batch_size: int = 8                    # pairs per step (2x rows in the forward)
    num_epochs: int = 1
    max_steps: Optional[int] = None        # stop here (default: num_epochs over the pairs)
    max_prompt_tokens: int = 512           # longer prompts lose their start
    max_answer_tokens: int = 512           # longer answers lose their end
    system_prompt: Optional[str] = None
    ref_batch_size: int = 16               # pairs per forward when precomputing reference log-probs
    eval_every: int = 0                    # steps between evals on eval_pairs (0: only at the end)
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0              # steps between checkpoints (0: only at the end, if a dir is set)
    keep_last_checkpoints: int = 3
    max_bad_steps: int = 3                 # bad (non-finite) steps in a row tolerated (training/loop.py)
    disable_dropout: bool = True
    seed: int = 0
    log_file: Optional[str] = None
    distributed: str = "auto"              # auto | ddp | fsdp | none: the data-parallel engine under torchrun (parallel.py)

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"DPOConfig.{name} {what}, got {getattr(self, name)!r}")
        need(self.beta > 0, "beta", "must be > 0")
        need(self.loss_type in DPO_LOSS_TYPES, "loss_type", f"must be one of {DPO_LOSS_TYPES}")
        need(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or None")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        need(self.max_answer_tokens >= 1, "max_answer_tokens", "must be >= 1")
        need(self.ref_batch_size >= 1, "ref_batch_size", "must be >= 1")
        need(self.max_bad_steps >= 0, "max_bad_steps", "must be >= 0")
        parallel.check_mode(self.distributed, "DPOConfig.distributed")


class DPOTrainer(LoopCounters):
    """DPO / conservative DPO / IPO on `PreferencePair`s, with a frozen reference (default: a copy
    of the initial policy) whose log-probs are precomputed once."""

    def __init__(self, policy: nn.Module, tokenizer, config: Optional[DPOConfig] = None,
                 ref_model: Optional[nn.Module] = None, device=None):
        self.config = config or DPOConfig()
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.policy = policy.to(self.device)
        ddp.init_distributed()  # joins torchrun's process group; a no-op in a plain process
        ddp.broadcast_model(self.policy)  # every rank starts from rank 0's weights (and reference)
        self.tokenizer = tokenizer
        self._owns_reference = ref_model is None
        self.ref_model = copy.deepcopy(policy) if ref_model is None else ref_model
        self.ref_model.requires_grad_(False).eval()
        if self.config.disable_dropout:
            disable_dropout(self.policy)
        # DDP / FSDP2 / as is (after the reference copy; before the optimiser: FSDP shards the parameters)
        self.parallel = parallel.wrap(self.policy, self.config.distributed, self.device)
        self.optimizer = adamw([p for p in self.policy.parameters() if p.requires_grad],
                                           lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        self.scheduler = None
        self.history: List[Dict[str, float]] = []
        self.ref_logps: Optional[torch.Tensor] = None       # (num_pairs, 2): chosen, rejected
        self.loop = TrainingLoop("dpo", self.config.max_bad_steps, error=DPOTrainingError,
                                 keep_last=self.config.keep_last_checkpoints, log_file=self.config.log_file)

    # -- tokenisation --------------------------------------------------------------------------
    def encode(self, pairs: Sequence[PreferencePair]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, answer_mask) for 2B rows: the chosen answers, then the rejected.

        input_ids is (2B, P + R): prompt left-padded to P, answer (+ end-of-turn) right-padded to R.
        """
        cfg = self.config
        gen_cfg = GenerationConfig(max_prompt_tokens=cfg.max_prompt_tokens, system_prompt=cfg.system_prompt)
        prompts, _ = encode_prompts(self.tokenizer, [p.prompt for p in pairs], gen_cfg)
        p_ids, p_mask = left_pad(prompts + prompts, self.tokenizer.pad_token_id)
        a_ids, a_mask = encode_answers(self.tokenizer, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                       max_tokens=cfg.max_answer_tokens)
        ids = torch.cat([p_ids, a_ids], 1).to(self.device)
        attn = torch.cat([p_mask, a_mask], 1).to(self.device)
        return ids, attn, a_mask.float().to(self.device)

    def answer_logps(self, model: nn.Module, pairs: Sequence[PreferencePair]) -> torch.Tensor:
        """Summed answer log-probs under `model`. (B, 2): column 0 chosen, column 1 rejected."""
        ids, attn, mask = self.encode(pairs)
        if model is self.policy:  # inside the DDP/FSDP engine (every policy forward must be, under FSDP)
            logps = self.parallel(lambda m: sequence_logprobs(m, ids, attn, mask.shape[1]))
        else:
            logps = sequence_logprobs(model, ids, attn, mask.shape[1])  # (2B, R)
        summed = (logps * mask).sum(1)                                   # (2B,)
        return summed.view(2, len(pairs)).T

    @torch.inference_mode()
    def reference_logps(self, pairs: Sequence[PreferencePair]) -> torch.Tensor:
        """The reference's (B, 2) answer log-probs for every pair, in batches of `ref_batch_size`."""
        if self.ref_model is None:
            raise RuntimeError("the reference model was released after precomputation; build a new DPOTrainer")
        out = [self.answer_logps(self.ref_model, pairs[i:i + self.config.ref_batch_size])
               for i in range(0, len(pairs), self.config.ref_batch_size)]
        return torch.cat(out).float().cpu()

    # -- the loop ------------------------------------------------------------------------------
    def _labels(self, pairs: Sequence[PreferencePair]) -> Optional[torch.Tensor]:
        if not self.config.use_pair_labels or all(p.label == 1.0 for p in pairs):
            return None
        return torch.tensor([float(p.label) for p in pairs], device=self.device)

    def _batch_indices(self, step: int, num_pairs: int) -> List[int]:
        """Pairs of a step: epoch e's order is a permutation seeded by (seed, e), so a resumed run
        sees the same batches without saving any sampler state."""
        per_epoch = math.ceil(num_pairs / self.config.batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
        start = position * self.config.batch_size
        return order[start:start + self.config.batch_size].tolist()

    def train(self, pairs: Sequence[PreferencePair], eval_pairs: Optional[Sequence[PreferencePair]] = None,
              resume_from=None, show_progress: bool = True) -> Dict[str, Any]:
        """Train; returns {"final_stats", "history", "eval"} (eval: metrics on eval_pairs at the end)."""
        cfg = self.config
        if getattr(self, "_unwrapped", False):
            raise RuntimeError("this DPOTrainer trained under FSDP and unwrapped its policy: build a new one")
        pairs = list(pairs)
        if not pairs:
            raise ValueError("the preference pair list is empty: give at least one pair")
        per_epoch = math.ceil(len(pairs) / cfg.batch_size)
        total = cfg.max_steps or cfg.num_epochs * per_epoch
        if self.scheduler is None:
            self.scheduler = lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.warmup_steps, total)
            self.loop.schedulers = [self.scheduler]
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.ref_logps is None or len(self.ref_logps) != len(pairs):
            t0 = time.perf_counter()
            self.ref_logps = self.reference_logps(pairs)
            log.info("reference log-probs for %d pairs in %.1fs", len(pairs), time.perf_counter() - t0)
        eval_pairs = list(eval_pairs or [])
        eval_ref = self.reference_logps(eval_pairs) if eval_pairs else None
        if self._owns_reference:
            self.ref_model = None  # everything it is needed for is computed: free its memory

        def step() -> Dict[str, float]:
            stats = self.train_step(pairs, self._batch_indices(self.step, len(pairs)))
            if eval_pairs and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total:
                stats.update({f"eval_{k}": v for k, v in self.evaluate(eval_pairs, eval_ref).items()})
            return stats

        save = (lambda: self.save_checkpoint(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
        self.loop.run(step, total, save, checkpoint_every=cfg.checkpoint_every, show_progress=show_progress,
                      show={"loss": "loss", "acc": "reward_accuracy", "margin": "reward_margin"})
        eval_metrics: Dict[str, float] = {}
        if eval_pairs:
            eval_metrics = self.evaluate(eval_pairs, eval_ref)
            log.info("dpo eval: %s", eval_metrics)
        if self.parallel.mode == "fsdp":  # a plain policy again (full weights on every rank) for generation
            self.policy = self.parallel.unwrap()
            self._unwrapped = True
        return {"final_stats": self._final_stats(), "history": list(self.history), "eval": eval_metrics}

    def train_step(self, pairs: Sequence[PreferencePair], idx: List[int]) -> Dict[str, float]:
        """One optimiser step on pairs[idx]; a non-finite loss or gradient skips it (weights unchanged)."""
        cfg = self.config
        t0 = time.perf_counter()
        mine = ddp.shard(idx)  # this rank's block of the batch (all of it in one process)
        # Fewer pairs than ranks: this rank adds zero gradient. Under DDP/FSDP it must still run the
        # forward and backward (they hold collectives): one pair, weighted 0.
        rows = mine or (idx[:1] if self.parallel.wrapped else [])
        self.policy.train()
        loss = torch.zeros((), device=self.device)
        logps = torch.zeros((0, 2), device=self.device)
        if rows:
            batch = [pairs[i] for i in rows]
            ref = self.ref_logps[rows].to(self.device)                     # (b, 2)
            logps = self.answer_logps(self.policy, batch)                  # (b, 2)
            loss, _ = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing,
                               cfg.loss_type, self._labels(batch))
            if not mine:
                logps = logps[:0]
        # The batch mean over ranks: each rank's mean weighted by its share (DDP/FSDP average).
        scaled = loss * (len(mine) * ddp.world_size() / len(idx))
        # Metrics (and the logged loss) of the whole batch, as one process computes them.
        full = torch.stack([ddp.all_gather_cat(logps[:, 0].detach().float()),
                            ddp.all_gather_cat(logps[:, 1].detach().float())], 1)
        ref_all = self.ref_logps[idx].to(full.device)
        with torch.no_grad():
            loss_all, metrics = dpo_loss(full[:, 0], full[:, 1], ref_all[:, 0], ref_all[:, 1], cfg.beta,
                                         cfg.label_smoothing, cfg.loss_type, self._labels([pairs[i] for i in idx]))
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm, skipped = float("nan"), True
        if finite_on_all_ranks(loss):
            if rows:
                scaled.backward()
            (grad_norm,), stepped = clip_and_step([(self.policy, self.optimizer, cfg.max_grad_norm)])
            skipped = not stepped
        if skipped:
            log.warning("dpo step %d: non-finite loss/gradient (loss %s, grad norm %s); update skipped",
                        self.step + 1, loss_all.item(), grad_norm)
        self.policy.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        stats = {"step": self.step + 1, "loss": loss_all.item(), **metrics, "grad_norm": grad_norm,
                 "learning_rate": lr, "skipped": int(skipped), "time_step_s": time.perf_counter() - t0}
        self.history.append(stats)
        return self.loop.end_step(stats, int(skipped))  # schedule, count, bad-step policy

    @torch.no_grad()
    def evaluate(self, pairs: Sequence[PreferencePair], ref_logps: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """DPO loss and implicit-reward metrics on `pairs` (reference log-probs computed if not given)."""
        pairs = list(pairs)
        ref_logps = self.reference_logps(pairs) if ref_logps is None else ref_logps
        bs = self.config.ref_batch_size
        logps = torch.cat([self.answer_logps(self.policy, pairs[i:i + bs]) for i in range(0, len(pairs), bs)])
        loss, metrics = dpo_loss(logps[:, 0].float().cpu(), logps[:, 1].float().cpu(), ref_logps[:, 0],
                                 ref_logps[:, 1], self.config.beta, self.config.label_smoothing,
                                 self.config.loss_type, None)
        return {"loss": loss.item(), **metrics}

    def _final_stats(self, last: int = 10) -> Dict[str, float]:
        means = recent_means(self.history, {"avg_loss": "loss", "avg_reward_accuracy": "reward_accuracy",
                                            "avg_reward_margin": "reward_margin", "avg_chosen_reward": "chosen_reward",
                                            "avg_rejected_reward": "rejected_reward"}, last)
        return {**means, "steps": self.step, "skipped_updates": self.total_skipped_updates,
                "window": len(self.history[-last:])}

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint_dir, step: Optional[int] = None) -> Path:
        """`<dir>/checkpoint-<step>`: policy/ (HF format + tokenizer), optimiser, scheduler, history,
        the reference log-probs (so a resume needs no reference model), RNG states."""
        state = {"history": self.history,
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None, "ref_logps": self.ref_logps}
        if not parallel.is_sharded(self.policy):  # FSDP: the optimiser goes with the policy's shards (DCP)
            state["optimizer"] = self.optimizer.state_dict()
        return self.loop.save(checkpoint_dir, {"policy": self.policy}, self.tokenizer, state,
                              metadata={"trainer": "dpo", "config": asdict(self.config)}, step=step,
                              optimizers={"policy": self.optimizer})

    def load_checkpoint(self, checkpoint_path) -> int:
        loaded = self.loop.resume(checkpoint_path)
        state = loaded.trainer_state
        load_models(loaded, {"policy": self.policy}, {"policy": self.optimizer})
        if "optimizer" in state:  # else it came with the sharded policy (DCP)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        self.ref_logps = state.get("ref_logps")
        return self.step


__all__ = ["DPOConfig", "DPOTrainer", "DPOTrainingError"]
