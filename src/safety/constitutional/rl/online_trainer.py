"""What every online RL trainer shares besides its loss: PPO (with a critic) and GRPO/RLOO/REINFORCE
(without one) are both `OnlineRLTrainer`s; each file adds only its advantages and its update.

`OnlineRLTrainer` composes:
  - the rollout components of `rl.rollout` (`self.scorer`: reward model, judge term, normalisation;
    `self.reference`: the frozen reference in its three modes; `self.rollouts`: generation and the
    frozen forwards);
  - `training.loop.TrainingLoop` (`self.loop`: steps, bad-step policy, Ctrl-C, checkpoint cadence);
and holds what is the same for every algorithm: the policy (LoRA, dropout off, gradient
checkpointing), its AdamW and schedule, the optional critic's (`value_model`: None without one),
the KL controller, the seeded prompt sampler (prompts and mini-batch order), `train(...)`, the update
epochs over shuffled mini-batches, the per-step bookkeeping metrics, checkpoints and final statistics.

A subclass supplies `train_step(prompts, num_epochs_per_batch, max_length, temperature) -> metrics`
(ending with `_record_step`, the loop's end of step). The order of every RNG draw is the one PPO
always had, so default training numbers do not depend on this split.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from src.models.checkpointing import enable_gradient_checkpointing
from src.models.lora import add_lora

from ..common import distributed as ddp
from ..common import parallel
from ..training.logprobs import sequence_logprobs
from ..training.loop import LoopCounters, TrainingError, TrainingLoop, load_models, recent_means
from ..training.optim import LR_SCHEDULES, adamw, lr_scheduler
from .primitives import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty, masked_mean
from .rollout import (FrozenReference, RewardScorer, Rollout, RolloutCollector, device_of, disable_dropout,
                      kl_shaped_rewards)

log = logging.getLogger(__name__)


REWARD_NORMALIZATIONS = ("auto", "running", "model", "none")
REF_UPDATES = ("none", "copy", "ema")


@dataclass
class OnlineRLConfig:
    """What every online RL trainer can be told: optimisation, KL, reward scoring, reference,
    memory and bookkeeping. `PPOConfig` adds its critic's fields, `PolicyGradientConfig` the
    critic-free algorithms' (group size, loss form, KL in the loss).

    Defaults follow TRL/OpenRLHF where the guide is silent. `gamma` defaults to 1.0 here (the
    RLHF convention: the score arrives at the last token and should not be discounted by answer
    length); the guide's constructor keeps its 0.99 default for compatibility.
    """

    # optimisation
    learning_rate: float = 1e-5             # policy AdamW learning rate
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"           # constant | linear | cosine, stepped once per PPO step
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0    # policy gradient clipping (None: off)
    # PPO objective
    clip_epsilon: float = 0.2               # policy ratio clip
    entropy_coef: float = 0.0               # entropy bonus (0: off)
    mini_batch_size: Optional[int] = None   # rows per update (None: the whole rollout batch)
    early_stop_kl: Optional[float] = None   # stop the epochs once approx KL(old||new) exceeds this
    conservative_kl_coef: float = 0.0       # coef * max(0, KL(pi||ref) - threshold)^2 in the loss
    conservative_kl_threshold: float = 0.05  # per-token KL (k3) threshold for that penalty
    # advantages
    gamma: float = 1.0
    whiten_advantages: bool = True
    whiten_rewards: bool = False            # TRL's option: rescale per-token rewards (mean kept)
    # rewards and KL
    kl_penalty: float = 0.1                 # beta, the (initial) KL coefficient
    kl_estimator: str = "k1"                # k1 | k3 | abs | mse, per token in the reward
    adaptive_kl: bool = False               # Ziegler et al. adaptive beta
    target_kl: float = 6.0                  # target KL per answer (nats), adaptive only
    kl_horizon: int = 10000                 # adaptive only
    reward_normalization: str = "auto"      # auto (model's stats if saved, else running) | running | model | none
    score_clip: Optional[float] = None      # clip the normalised score to [-c, c]
    missing_eos_penalty: Optional[float] = None  # subtracted from the normalised score of answers cut by the length limit
    judge_reward_weight: float = 0.0        # scale of the `judge_reward` hook's term added to the raw score (0: off)
    # generation
    max_prompt_tokens: int = 512
    system_prompt: Optional[str] = None
    reward_max_tokens: int = 1024           # re-tokenised reward inputs are cut from the left to this
    # models and memory
    ref_update: str = "none"                # none | copy | ema: refresh the reference every ref_update_every steps
    ref_update_every: int = 0
    ref_ema_alpha: float = 0.99             # ema: ref <- alpha * ref + (1 - alpha) * policy
    offload_frozen_to_cpu: bool = False     # keep reference and reward model on CPU
    share_reward_and_reference: bool = False  # one frozen backbone for both (see docs/ppo.md)
    gradient_checkpointing: bool = False
    lora_r: int = 0                         # LoRA rank on the policy (0: full fine-tuning); the reference is
                                            # then the policy with its adapters off, not a copy (src/models/lora.py)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0               # (disable_dropout also turns this off)
    lora_target_modules: Optional[List[str]] = None  # None: every Linear but the LM head
    disable_dropout: bool = True            # dropout would make old/new log-probs differ at ratio 1
    distributed: str = "auto"               # auto | ddp | none: the data-parallel engine under torchrun (parallel.py);
                                            # fsdp is not supported for online RL yet (generation needs full weights)
    # bookkeeping
    max_bad_steps: int = 3                  # steps in a row with a non-finite loss/grad tolerated (training/loop.py)
    seed: int = 0                           # prompt sampling and mini-batch shuffling
    keep_last_checkpoints: int = 3
    log_file: Optional[str] = None          # append each step's metrics here as JSON lines

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name} {what}, got {getattr(self, name)!r}")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.clip_epsilon > 0, "clip_epsilon", "must be > 0")
        need(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        need(self.kl_penalty >= 0, "kl_penalty", "must be >= 0")
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}")
        need(self.reward_normalization in REWARD_NORMALIZATIONS, "reward_normalization",
             f"must be one of {REWARD_NORMALIZATIONS}")
        need(self.ref_update in REF_UPDATES, "ref_update", f"must be one of {REF_UPDATES}")
        need(self.ref_update == "none" or self.ref_update_every > 0, "ref_update_every",
             "must be > 0 when ref_update is 'copy' or 'ema'")
        need(0 <= self.ref_ema_alpha <= 1, "ref_ema_alpha", "must be in [0, 1]")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
        need(self.mini_batch_size is None or self.mini_batch_size >= 1, "mini_batch_size", "must be >= 1")
        need(self.max_bad_steps >= 0, "max_bad_steps", "must be >= 0")
        parallel.check_mode(self.distributed, f"{type(self).__name__}.distributed")
        if self.distributed == "fsdp":
            raise ValueError(f"{type(self).__name__}.distributed='fsdp' is not supported for online RL "
                             "(PPO, GRPO/RLOO/REINFORCE) yet: generating the rollouts needs the full weights on "
                             "every rank. Use distributed='ddp' (or 'auto'), with lora_r and gradient_checkpointing "
                             "to save memory")
        need(self.target_kl > 0, "target_kl", "must be > 0")
        need(math.isfinite(self.judge_reward_weight), "judge_reward_weight", "must be a finite number (0: off)")
        need(self.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)")
        need(not (self.lora_r and self.ref_update != "none"), "ref_update",
             "must be 'none' with LoRA (the reference is the policy's frozen base weights)")
        need(not (self.share_reward_and_reference and self.ref_update != "none"), "ref_update",
             "must be 'none' with share_reward_and_reference (the shared backbone is the reward model's)")


class PPOTrainingError(TrainingError):
    """Training cannot go on (more than max_bad_steps steps in a row with non-finite updates).
    Raised by every online RL trainer; the name is PPO's, which callers already catch."""


class OnlineRLTrainer(LoopCounters):
    """The shared part of PPO and GRPO/RLOO/REINFORCE (module docstring). `config` is an
    `OnlineRLConfig` (`PPOConfig` with a critic, `PolicyGradientConfig` without); `value_model` is the
    critic, or None for the critic-free algorithms."""

    def __init__(self, policy_model: nn.Module, value_model: Optional[nn.Module], reward_model: nn.Module,
                 tokenizer, device, config, ref_model: Optional[nn.Module] = None, reward_tokenizer=None,
                 judge_reward: Optional[Callable[[List[str], List[str]], Any]] = None):
        self.config = config
        self.device = torch.device(device) if device is not None else device_of(policy_model)
        self.tokenizer = tokenizer
        frozen_device = torch.device("cpu") if config.offload_frozen_to_cpu else self.device

        self.policy = policy_model.to(self.device)
        self.value_model = value_model.to(self.device) if value_model is not None else None
        ddp.init_distributed()  # joins torchrun's process group; a no-op in a plain process
        for model in self._trained_models():  # under torchrun: every rank starts from rank 0's
            ddp.broadcast_model(model)
        self.scorer = RewardScorer(reward_model, config, self.device, reward_tokenizer, judge_reward, frozen_device)
        self.scorer.check_vocab(self.policy)
        if config.lora_r:  # after a critic copied the base backbone
            add_lora(self.policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
        self.reference = FrozenReference(self.policy, self.scorer, config, ref_model, frozen_device)
        self.rollouts = RolloutCollector(self.policy, tokenizer, config, self.device, self.reference, self.scorer)

        for model in self._trained_models():
            if config.disable_dropout:
                disable_dropout(model)
        if config.gradient_checkpointing:
            for model in self._trained_models():
                enable_gradient_checkpointing(model)
        # DDP under torchrun (`distributed`, default auto), the model as it is in one process. Generation,
        # the rollout's forwards, the reference and checkpoints use the plain models (`self.policy`,
        # `self.value_model`: DDP shares their parameters); every training forward goes through these.
        self.policy_parallel = parallel.wrap(self.policy, config.distributed, self.device)
        self.value_parallel = None if self.value_model is None else \
            parallel.wrap(self.value_model, config.distributed, self.device)

        self.policy_optimizer = adamw(
            [p for p in self.policy.parameters() if p.requires_grad], lr=config.learning_rate,
            weight_decay=config.weight_decay, eps=config.adam_eps)
        self.value_optimizer = None if self.value_model is None else adamw(
            [p for p in self.value_model.parameters() if p.requires_grad],
            lr=config.value_learning_rate or config.learning_rate, weight_decay=config.weight_decay,
            eps=config.adam_eps)
        self.policy_scheduler = self.value_scheduler = None

        if config.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(config.kl_penalty, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_penalty)
        self.sampler = torch.Generator().manual_seed(config.seed)  # prompts and mini-batch order
        self.history: List[Dict[str, float]] = []
        self.loop = TrainingLoop(self.algorithm, config.max_bad_steps, error=PPOTrainingError,
                                 advice="Lower the learning rate or check the reward model's outputs.",
                                 keep_last=config.keep_last_checkpoints, log_file=config.log_file)

    def _trained_models(self) -> List[nn.Module]:
        return [self.policy] + ([self.value_model] if self.value_model is not None else [])

    # -- the components under the names callers have always used --------------------------------
    @property
    def reward_model(self) -> nn.Module:
        return self.scorer.reward_model

    @property
    def reward_tokenizer(self):
        return self.scorer.reward_tokenizer

    @property
    def judge_reward(self):
        return self.scorer.judge_reward

    @property
    def reward_stats(self):
        """Running mean/std of the raw scores (reward_normalization 'running')."""
        return self.scorer.stats

    @property
    def ref_model(self) -> Optional[nn.Module]:
        """The separate frozen reference; None when it is the policy without adapters or the shared backbone."""
        return self.reference.model

    @property
    def algorithm(self) -> str:
        """ppo, or the policy-gradient config's grpo | rloo | reinforce (progress bar, checkpoint metadata)."""
        return getattr(self.config, "algorithm", "ppo")

    def _build_schedulers(self, total_steps: int) -> None:
        cfg = self.config
        self.policy_scheduler = lr_scheduler(self.policy_optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
        if self.value_optimizer is not None:
            self.value_scheduler = lr_scheduler(self.value_optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
        # stepped once per step (end_step)
        self.loop.schedulers = [s for s in (self.policy_scheduler, self.value_scheduler) if s is not None]

    # -- rollout and rewards -----------------------------------------------------------------
    def rollout(self, prompts: Sequence, max_new_tokens: int = 150, temperature: float = 1.0) -> Rollout:
        """Sample answers and score them: one batched forward per model, under inference_mode."""
        return self.rollouts.collect(prompts, max_new_tokens, temperature)

    def normalise_scores(self, scores: torch.Tensor, finished: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        """Raw scores -> whitened scores (running or the reward model's saved stats), clip, missing-eos penalty."""
        return self.scorer.normalise(scores, finished, update_stats)

    def compute_token_rewards(self, rollout: Rollout, scores: torch.Tensor):
        """Per-token rewards: -beta * KL_t everywhere, + score at the last real token. (batch, R) each."""
        return kl_shaped_rewards(rollout, scores, self.kl_ctl.value, self.config.kl_estimator,
                                 self.config.whiten_rewards)

    def _ref_and_scores(self, input_ids, attention_mask, response_len, temperature, prompt_texts, texts):
        """Reference log-probs (batch, R) and raw reward scores (batch,), one forward per frozen model."""
        return self.reference.logprobs_and_scores(input_ids, attention_mask, response_len, temperature,
                                                  prompt_texts, texts, self.device)

    # -- pieces of a step --------------------------------------------------------------------
    @staticmethod
    def _judge_metrics(rollout: Rollout) -> Dict[str, float]:
        """`judge_reward`: mean weighted judge term of the rollout (logged only when the hook is on)."""
        if rollout.judge_scores is None:
            return {}
        return {"judge_reward": rollout.judge_scores.mean().item()}

    @staticmethod
    def _means(acc: Dict[str, List[float]]) -> Callable[[str], float]:
        """key -> mean of the update's recorded values for it (NaN when none were recorded)."""
        return lambda key: float(sum(acc[key]) / len(acc[key])) if acc.get(key) else float("nan")

    def _policy_step_stats(self, rollout: Rollout, scores: torch.Tensor, kl: torch.Tensor, beta_used: float,
                           kl_per_answer: torch.Tensor, acc: Dict[str, List[float]]) -> Dict[str, float]:
        """The statistics of the rollout and the policy update every online trainer logs; each adds its own
        (critic, group, loss-form) beside them."""
        mean, mask = self._means(acc), rollout.mask
        return {
            "kl_divergence": kl_per_answer.mean().item(),   # nats per answer, k1, rollout vs reference
            "kl_per_token": masked_mean(kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1"), mask).item(),
            "mean_reward": (scores - beta_used * (kl * mask).sum(1)).mean().item(),  # score - beta*KL, per answer
            "mean_score": rollout.scores.mean().item(),      # raw reward-model score
            **self._judge_metrics(rollout),                  # judge_reward, when the hook is on
            "mean_normalized_score": scores.mean().item(),   # of RM score + judge term
            "approx_kl": mean("approx_kl"),
            "clipfrac": mean("clipfrac"),
            "ratio_mean": mean("ratio_mean"),
            "ratio_max": max(acc.get("ratio_max", [float("nan")])),
            "ratio_min": min(acc.get("ratio_min", [float("nan")])),
            "entropy": mean("entropy"),
            "policy_grad_norm": mean("policy_grad_norm"),
        }

    def _step_bookkeeping(self, rollout: Rollout, beta_used: float, epochs_done: int, skipped: int,
                          t_rollout: float, t0: float) -> Dict[str, float]:
        """The metrics every online trainer logs for a step besides its losses."""
        return {"answer_length": rollout.mask.sum(1).mean().item(),
                "fraction_finished": rollout.finished.float().mean().item(),
                "kl_coef": beta_used,
                "learning_rate": self.policy_optimizer.param_groups[0]["lr"],
                "epochs_done": epochs_done,
                "skipped_updates": skipped,
                "time_rollout_s": t_rollout,
                "time_step_s": time.perf_counter() - t0}

    def _update_epochs(self, batch: int, num_epochs: int, rollout_finite: bool,
                       update: Callable[[torch.Tensor], Optional[Dict[str, float]]],
                       first_order: Optional[torch.Tensor] = None):
        """`num_epochs` passes over the rollout in shuffled mini-batches; `update(idx)` takes one
        gradient step and returns its metrics, or None when it skipped a non-finite update. Stops
        early once approx KL(old || new) passes `early_stop_kl`. A non-finite rollout trains nothing.
        `first_order`: the first epoch's permutation, already drawn from `self.sampler` by the caller
        (the draw it would have made here). Returns (metric name -> values, skipped updates, epochs done)."""
        cfg = self.config
        acc: Dict[str, List[float]] = {}
        if not rollout_finite:
            log.warning("step %d: non-finite rewards/advantages in the rollout; skipping the update", self.step + 1)
            return acc, 1, 0
        mb_size = min(cfg.mini_batch_size or batch, batch)
        skipped = epochs_done = 0
        for epoch in range(num_epochs):
            if epoch == 0 and first_order is not None:
                order = first_order
            else:
                order = torch.randperm(batch, generator=self.sampler)
            stop = False
            for start in range(0, batch, mb_size):
                metrics = update(order[start:start + mb_size])
                if metrics is None:
                    skipped += 1
                    continue
                for k, v in metrics.items():
                    acc.setdefault(k, []).append(v)
                if cfg.early_stop_kl is not None and \
                        ddp.all_reduce_mean(metrics.get("approx_kl", 0.0)) > cfg.early_stop_kl:
                    stop = True
                    break
            epochs_done += 1
            if stop:
                break
        return acc, skipped, epochs_done

    def _close_update(self, rollout: Rollout, mask: torch.Tensor, batch: int):
        """Feed the KL controller. Returns (the beta used this step, KL to the reference per answer (batch,))."""
        kl_per_answer = (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * mask).sum(1)
        beta_used = self.kl_ctl.value
        self.kl_ctl.update(ddp.all_reduce_mean(kl_per_answer.mean().item()), batch * ddp.world_size())
        return beta_used, kl_per_answer

    def _maybe_update_reference(self, step: int) -> None:
        self.reference.maybe_update(step)

    def _record_step(self, stats: Dict[str, Any], rollout: Rollout, skipped: int) -> Dict[str, Any]:
        """Keep the step's metrics, then the loop's end of step: schedules, counters, bad-step policy."""
        self.history.append(stats)
        self.last_rollout = rollout
        return self.loop.end_step(stats, skipped)

    def train_step(self, prompts: Sequence, num_epochs_per_batch: int = 4, max_length: int = 150,
                   temperature: float = 1.0) -> Dict[str, float]:
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------------------------
    def train(self, prompts: Sequence, num_steps: int = 100, batch_size: int = 4, num_epochs_per_batch: int = 4,
              max_length: int = 150, temperature: float = 1.0, checkpoint_dir=None, checkpoint_freq: int = 10,
              resume_from=None, show_progress: bool = True) -> Dict[str, Any]:
        """Run until `num_steps` total steps; returns {"final_stats": {...}, "history": [...]}.

        Each step samples `batch_size` prompts (a seeded generator whose state is checkpointed).
        `resume_from` (a checkpoint or a folder of them) continues a run: an interrupted run and an
        uninterrupted one end with identical weights on CPU.
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty: give at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.policy_scheduler is None:
            self._build_schedulers(num_steps)
        if batch_size % ddp.world_size():
            raise ValueError(f"batch_size={batch_size} must be a multiple of the number of processes "
                             f"({ddp.world_size()}): each rank generates an equal share")
        if resume_from is not None:
            self.load_checkpoint(resume_from)

        def step() -> Dict[str, float]:
            if ddp.world_size() > 1:
                # ranks sample different answers (docs/distributed.md: seeding rule); re-seeded at every step
                # from the step number, so a run resumed on several processes samples what the
                # uninterrupted one did (one process: the checkpoint's RNG state does that)
                torch.manual_seed(ddp.sampling_seed(self.config.seed + self.step))
            # every rank draws the same prompts (same sampler state) and keeps its share
            batch = ddp.shard(self._sample_prompts(prompts, batch_size))
            return self.train_step(batch, num_epochs_per_batch, max_length, temperature)

        save = (lambda: self.save_checkpoint(checkpoint_dir)) if checkpoint_dir is not None else None
        self.loop.run(step, num_steps, save, checkpoint_every=checkpoint_freq, save_last=bool(checkpoint_freq),
                      show={"score": "mean_score", "reward": "mean_reward", "kl": "kl_divergence",
                            "clipfrac": "clipfrac", "len": "answer_length", "s/step": "time_step_s"},
                      show_progress=show_progress)
        return {"final_stats": self._final_stats(), "history": list(self.history)}

    def _sample_prompts(self, prompts: List, batch_size: int) -> List:
        if batch_size <= len(prompts):
            idx = torch.randperm(len(prompts), generator=self.sampler)[:batch_size]
        else:
            idx = torch.randint(len(prompts), (batch_size,), generator=self.sampler)
        return [prompts[i] for i in idx.tolist()]

    def _final_stats(self, last: int = 10) -> Dict[str, float]:
        means = recent_means(self.history, {
            "avg_reward": "mean_reward", "avg_kl_divergence": "kl_divergence", "avg_score": "mean_score",
            "avg_policy_loss": "policy_loss", "avg_value_loss": "value_loss", "avg_answer_length": "answer_length",
            "avg_fraction_finished": "fraction_finished"}, last)
        return {**means, "kl_coef": self.kl_ctl.value, "steps": self.step,
                "skipped_updates": self.total_skipped_updates, "window": len(self.history[-last:])}

    def get_statistics(self) -> Dict[str, Any]:
        """Summary of the run so far (averages over the last 10 steps) and the controllers' state."""
        return {**self._final_stats(), "total_steps": self.step, "history_length": len(self.history),
                "reward_running_mean": self.reward_stats.mean, "reward_running_std": self.reward_stats.std,
                "consecutive_bad_steps": self.consecutive_bad_steps}

    # -- checkpoints -------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        state = {
            "history": self.history,
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "policy_scheduler": self.policy_scheduler.state_dict() if self.policy_scheduler else None,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_stats": self.reward_stats.state_dict(),
            "sampler": self.sampler.get_state(),
        }
        if self.value_model is not None:
            state["value_optimizer"] = self.value_optimizer.state_dict()
            state["value_scheduler"] = self.value_scheduler.state_dict() if self.value_scheduler else None
        return state

    def save_checkpoint(self, checkpoint_dir, step: Optional[int] = None) -> Path:
        """`<checkpoint_dir>/checkpoint-<step>`: policy/ (and value/ with a critic; HF format + tokenizer),
        optimisers, schedulers, KL controller, running stats, sampler, history, RNG states."""
        models = {"policy": self.policy}
        if self.value_model is not None:
            models["value"] = self.value_model  # a plain nn.Module rides in the state
        if self.reference.moves:
            models["reference"] = self.ref_model  # it moves: needed for an exact resume
        return self.loop.save(checkpoint_dir, models, self.tokenizer, self._trainer_state(),
                              metadata={"trainer": self.algorithm, "config": asdict(self.config)}, step=step)

    def load_checkpoint(self, checkpoint_path) -> int:
        """Restore everything `save_checkpoint` wrote (models in place, RNG states included); returns the step.
        (A critic-free trainer ignores the empty stand-in critic older GRPO/RLOO/REINFORCE checkpoints hold.)"""
        loaded = self.loop.resume(checkpoint_path)
        state = loaded.trainer_state
        named = {"policy": self.policy}
        if self.value_model is not None:
            named["value"] = self.value_model
        if (loaded.path / "reference").is_dir() or "reference" in state.get("module_states", {}):
            named["reference"] = self.ref_model
        load_models(loaded, named)
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        if self.value_model is not None:
            self.value_optimizer.load_state_dict(state["value_optimizer"])
        for scheduler, key in ((self.policy_scheduler, "policy_scheduler"), (self.value_scheduler, "value_scheduler")):
            if scheduler is not None and state.get(key) is not None:
                scheduler.load_state_dict(state[key])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.sampler.set_state(state["sampler"])
        self.history = list(state["history"])
        return self.step

    # -- the guide's helper API, for any online trainer ----------------------------------------
    def compute_kl_divergence(self, current_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean per-token KL(current || reference) estimate (the configured estimator); 0 if identical."""
        kl = kl_penalty(current_logprobs, reference_logprobs, self.config.kl_estimator)
        return masked_mean(kl, mask if mask is not None else torch.ones_like(kl))

    def generate_responses(self, prompts: Sequence, max_length: int = 150, temperature: float = 1.0):
        """(answer texts, log-probs (batch, R) of the sampled tokens, padding 0)."""
        return self.rollouts.generate_texts(prompts, max_length, temperature)

    def _encode(self, prompts: Sequence, responses):
        """Token batch for (prompt, answer-text) pairs; a text answer is taken as finished (end-of-turn appended)."""
        return self.rollouts.encode(prompts, responses)

    @torch.no_grad()
    def get_logprobs(self, prompts, responses, temperature: float = 1.0) -> torch.Tensor:
        """Current policy's log-probs of the answers' tokens. (batch, R), padding 0."""
        ids, attn, _, mask, _ = self._encode(prompts, responses)
        return sequence_logprobs(self.policy, ids, attn, mask.shape[1], temperature) * mask

    @torch.no_grad()
    def get_reference_logprobs(self, prompts, responses, temperature: float = 1.0) -> torch.Tensor:
        """Frozen reference's log-probs of the answers' tokens. (batch, R), padding 0."""
        ids, attn, _, mask, texts = self._encode(prompts, responses)
        ref, _ = self._ref_and_scores(ids, attn, mask.shape[1], temperature, list(prompts), texts)
        return ref * mask

    @torch.no_grad()
    def compute_rewards(self, prompts, responses) -> torch.Tensor:
        """Raw reward-model score of each (prompt, answer). (batch,)"""
        ids, attn, _, _, texts = self._encode(prompts, responses)
        return self.scorer.score(ids, attn, list(prompts), texts).to(self.device)


__all__ = ["OnlineRLTrainer", "PPOTrainingError"]
