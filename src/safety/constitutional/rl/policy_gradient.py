"""Critic-free policy-gradient trainers: GRPO, RLOO and REINFORCE.

`PolicyGradientTrainer` is an `rl.online_trainer.OnlineRLTrainer` without a critic, as `PPOTrainer` is one
with a critic: both take the rollout, the frozen/moving reference and reward scoring from the
`rl.rollout` components, and the prompt sampler, LR schedule, update epochs, checkpoints (exact
resume), history and non-finite-step handling from `OnlineRLTrainer`. What is their own is one step
(`train_step`):

  1. rollout    every prompt of the batch is asked `group_size` (k) times: N prompts -> N*k answers,
                prompt-major (answers 0..k-1 belong to prompt 0);
  2. advantages no value model:
                  GRPO       (score - group mean) / group std, the same for every token of an answer
                             (Shao et al. 2024, DeepSeekMath, outcome supervision);
                  RLOO       reward-to-go minus the mean return of the other k-1 answers to the prompt
                             (Ahmadian et al. 2024);
                  REINFORCE  reward-to-go of the normalised score (the running reward mean is the
                             baseline), optionally minus the batch mean;
                where reward-to-go comes from the same per-token rewards as PPO: -beta * KL_t at every
                token, + score at the last one (beta = `kl_penalty`, 0 for GRPO);
  3. update     `num_epochs_per_batch` passes over shuffled mini-batches with one of three surrogates:
                "clipped" (PPO's ratio clip; GRPO), "vanilla" (-A log pi; on-policy), or
                "importance_sampling" (truncated IS weights), plus `kl_loss_coef` * per-token k3
                KL(pi || ref) in the loss (GRPO's regulariser) and the entropy bonus.

There is no value model: `value_model` must be None, none is built, and `trainer.value_model` is None.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..common import distributed as ddp
from ..training.guarded_step import clip_and_step, finite_on_all_ranks
from ..training.logprobs import sequence_logprobs
from .online_trainer import OnlineRLConfig, OnlineRLTrainer
from .primitives import (conservative_kl_penalty, discounted_returns, group_advantages,
                         importance_sampling_loss, kl_penalty, masked_mean, masked_whiten,
                         policy_gradient_loss, ppo_policy_loss, rloo_baseline)
from .rollout import Rollout

log = logging.getLogger(__name__)

POLICY_LOSSES = ("clipped", "vanilla", "importance_sampling")
PG_ALGORITHMS = ("grpo", "rloo", "reinforce")


@dataclass
class PolicyGradientConfig(OnlineRLConfig):
    """The shared online-RL fields (`OnlineRLConfig`) plus the critic-free algorithms' own; no critic fields.

    `kl_penalty` (beta) is the KL coefficient *in the reward*; `kl_loss_coef` the one *in the loss*.
    The reference is static (`ref_update="none"`), periodic (`"copy"` every `ref_update_every`
    steps) or EMA (`"ema"`, alpha `ref_ema_alpha`, every `ref_update_every` steps).
    """

    algorithm: str = "reinforce"          # grpo | rloo | reinforce
    group_size: int = 1                   # k answers per prompt; batch_size counts prompts
    policy_loss: str = "vanilla"          # clipped | vanilla | importance_sampling
    kl_loss_coef: float = 0.0             # beta * mean_t KL_t(pi || ref) (k3) added to the loss
    is_weight_clip: Optional[float] = 10.0  # importance_sampling: weights held at this value
    scale_group_rewards: bool = True      # grpo: divide by the group std (False: Dr. GRPO, centre only)
    reinforce_baseline: str = "none"      # reinforce: none | batch_mean (on top of the running-mean baseline)

    def __post_init__(self):
        super().__post_init__()

        def need(ok, name, what):
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name} {what}, got {getattr(self, name)!r}")
        need(self.algorithm in PG_ALGORITHMS, "algorithm", f"must be one of {PG_ALGORITHMS}")
        need(self.group_size >= 1, "group_size", "must be >= 1")
        need(self.algorithm == "reinforce" or self.group_size >= 2, "group_size",
             f"must be >= 2 for {self.algorithm} (the baseline comes from the other answers to the prompt)")
        need(self.policy_loss in POLICY_LOSSES, "policy_loss", f"must be one of {POLICY_LOSSES}")
        need(self.kl_loss_coef >= 0, "kl_loss_coef", "must be >= 0")
        need(self.is_weight_clip is None or self.is_weight_clip > 0, "is_weight_clip", "must be > 0 or None")
        need(self.reinforce_baseline in ("none", "batch_mean"), "reinforce_baseline",
             "must be 'none' or 'batch_mean'")


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """GRPO defaults (DeepSeekMath / TRL): k=4, clipped ratio, KL in the loss (beta 0.04), none in the reward."""

    algorithm: str = "grpo"
    group_size: int = 4
    policy_loss: str = "clipped"
    kl_loss_coef: float = 0.04
    kl_penalty: float = 0.0
    kl_estimator: str = "k3"
    whiten_advantages: bool = False       # the group normalisation already scales them


@dataclass
class RLOOConfig(PolicyGradientConfig):
    """RLOO defaults (Ahmadian et al. 2024): k=4, KL in the reward (beta 0.05), REINFORCE surrogate
    (importance-weighted, so extra epochs over a rollout stay corrected)."""

    algorithm: str = "rloo"
    group_size: int = 4
    policy_loss: str = "importance_sampling"  # = REINFORCE on the first epoch, IS-corrected after
    kl_penalty: float = 0.05
    whiten_advantages: bool = False


@dataclass
class REINFORCEConfig(PolicyGradientConfig):
    """REINFORCE with the running reward mean as baseline, KL in the reward (beta 0.05)."""

    algorithm: str = "reinforce"
    group_size: int = 1
    policy_loss: str = "importance_sampling"  # = REINFORCE on the first epoch, IS-corrected after
    kl_penalty: float = 0.05
    whiten_advantages: bool = False


CONFIG_CLASSES = {"grpo": GRPOConfig, "rloo": RLOOConfig, "reinforce": REINFORCEConfig}


class PolicyGradientTrainer(OnlineRLTrainer):
    """GRPO / RLOO / REINFORCE (chosen by `config.algorithm`), with PPOTrainer's `train(...)` signature.

    `train(prompts, num_steps, batch_size, ...)`: `batch_size` prompts per step, `group_size` answers each.
    """

    def __init__(self, policy_model: nn.Module, reward_model: nn.Module, tokenizer, device=None,
                 config: Optional[PolicyGradientConfig] = None, ref_model: Optional[nn.Module] = None,
                 reward_tokenizer=None, value_model: Optional[nn.Module] = None, *, judge_reward=None):
        if value_model is not None:
            raise ValueError("GRPO/RLOO/REINFORCE use no value model: pass value_model=None")
        config = config if config is not None else GRPOConfig()
        if not isinstance(config, PolicyGradientConfig):
            raise TypeError(f"config must be a PolicyGradientConfig (GRPOConfig, RLOOConfig, REINFORCEConfig), "
                            f"got {type(config).__name__}")
        super().__init__(policy_model, None, reward_model, tokenizer, device, config, ref_model=ref_model,
                         reward_tokenizer=reward_tokenizer, judge_reward=judge_reward)
        self._warned_vanilla_epochs = False

    # -- advantages ---------------------------------------------------------------------------
    def compute_advantages(self, rollout: Rollout, scores: torch.Tensor):
        """Per-token advantages (batch, R) and the per-token rewards/KL behind them."""
        cfg = self.config
        mask = rollout.mask
        rewards, kl = self.compute_token_rewards(rollout, scores)        # (batch, R) each
        if cfg.algorithm == "grpo":
            # outcome supervision: every token of answer i gets its group-normalised reward
            seq_reward = (rewards * mask).sum(1)                          # (batch,) = score - beta*KL
            adv = group_advantages(seq_reward, cfg.group_size, scale=cfg.scale_group_rewards)
            advantages = adv[:, None] * mask
        else:
            returns = discounted_returns(rewards, mask, cfg.gamma)        # (batch, R) reward-to-go
            if cfg.algorithm == "rloo":
                baseline = rloo_baseline(returns[:, 0], cfg.group_size)   # (batch,)
            elif cfg.reinforce_baseline == "batch_mean":
                baseline = ddp.all_reduce_mean(returns[:, 0].mean()).expand(returns.shape[0])  # all ranks' answers
            else:
                baseline = torch.zeros_like(returns[:, 0])
            advantages = (returns - baseline[:, None]) * mask
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return advantages, rewards, kl

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, prompts: Sequence, num_epochs_per_batch: int = 1, max_length: int = 150,
                   temperature: float = 1.0) -> Dict[str, float]:
        """One iteration: k answers to each of `prompts`, critic-free advantages, policy update."""
        cfg = self.config
        t0 = time.perf_counter()
        k = cfg.group_size
        grouped_prompts = [p for p in prompts for _ in range(k)]          # prompt-major
        rollout = self.rollout(grouped_prompts, max_new_tokens=max_length, temperature=temperature)
        t_rollout = time.perf_counter() - t0
        mask = rollout.mask
        batch = mask.shape[0]

        scores = self.normalise_scores(rollout.total_scores, rollout.finished)  # RM score + judge term
        advantages, rewards, kl = self.compute_advantages(rollout, scores)
        raw_advantage_mean = masked_mean(advantages, mask).item()
        rollout_finite = ddp.all_true(bool(torch.isfinite(advantages).all() and torch.isfinite(rewards).all()))
        if cfg.policy_loss == "vanilla" and num_epochs_per_batch > 1 and not self._warned_vanilla_epochs:
            log.warning("policy_loss='vanilla' is on-policy: epochs after the first reuse stale samples "
                        "without correction; use 'importance_sampling' or 'clipped' for several epochs")
            self._warned_vanilla_epochs = True

        self.policy.train()
        acc, skipped, epochs_done = self._update_epochs(
            batch, num_epochs_per_batch, rollout_finite,
            lambda idx: self._update_policy_minibatch(rollout, idx, advantages[idx], temperature))
        self.policy.eval()

        beta_used, kl_per_answer = self._close_update(rollout, mask, batch)
        self._maybe_update_reference(self.step + 1)

        mean = self._means(acc)
        group_std = rollout.total_scores.view(-1, k).std(1).mean().item() if k > 1 else float("nan")
        stats = {
            "step": self.step + 1,
            "policy_loss": mean("policy_loss"),
            **self._policy_step_stats(rollout, scores, kl, beta_used, kl_per_answer, acc),
            "kl_ref_loss": mean("kl_ref"),                  # the KL term of the loss (k3), if any
            "group_score_std": group_std,                   # 0 = the groups carry no signal
            "mean_advantage": raw_advantage_mean,
            "advantage_std": advantages[mask.bool()].std().item() if mask.sum() > 1 else float("nan"),
            "is_clipped_fraction": mean("clipped_fraction"),
            "conservative_penalty": mean("conservative_penalty"),   # conservative_kl_coef > 0 only
            "kl_violation": mean("kl_violation"),                   # share of updates beyond the threshold
            **self._step_bookkeeping(rollout, beta_used, epochs_done, skipped, t_rollout, t0),
        }
        return self._record_step(stats, rollout, skipped)  # the loop's end of step

    def _update_policy_minibatch(self, rollout: Rollout, idx, advantages, temperature) -> Optional[Dict[str, float]]:
        """One gradient step on the policy. Returns None (and changes nothing) if not finite."""
        cfg = self.config
        R = rollout.mask.shape[1]
        ids, attn, mask = rollout.input_ids[idx], rollout.attention_mask[idx], rollout.mask[idx]
        old_logprobs, ref_logprobs = rollout.logprobs[idx], rollout.ref_logprobs[idx]

        new_logprobs, entropy = self.policy_parallel(  # through the engine (DDP reduces in backward())
            lambda m: sequence_logprobs(m, ids, attn, R, temperature, return_entropy=True,
                                        entropy_grad=bool(cfg.entropy_coef)))
        if cfg.policy_loss == "clipped":
            loss, metrics = ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cfg.clip_epsilon)
        elif cfg.policy_loss == "importance_sampling":
            loss, metrics = importance_sampling_loss(new_logprobs, old_logprobs, advantages, mask,
                                                     cfg.is_weight_clip)
        else:
            loss, metrics = policy_gradient_loss(new_logprobs, advantages, mask)
        # KL to the reference in the loss (GRPO), entropy bonus, conservative wall: the shared primitives
        if cfg.kl_loss_coef:
            kl_ref = masked_mean(kl_penalty(new_logprobs, ref_logprobs, "k3"), mask)
            loss = loss + cfg.kl_loss_coef * kl_ref
            metrics["kl_ref"] = kl_ref.item()
        entropy_mean = masked_mean(entropy if cfg.entropy_coef else entropy.detach(), mask)
        loss = loss - cfg.entropy_coef * entropy_mean
        if cfg.conservative_kl_coef:
            kl_ref_c = masked_mean(kl_penalty(new_logprobs, ref_logprobs, "k3"), mask)
            wall = conservative_kl_penalty(kl_ref_c, cfg.conservative_kl_threshold, cfg.conservative_kl_coef)
            loss = loss + wall
            metrics.update(conservative_penalty=wall.item(),
                           kl_violation=float(kl_ref_c.item() > cfg.conservative_kl_threshold))

        self.policy_optimizer.zero_grad(set_to_none=True)
        if not finite_on_all_ranks(loss):  # every rank skips together
            log.warning("step %d: non-finite policy loss %s; update skipped", self.step + 1, loss.item())
            return None
        loss.backward()
        (norm,), stepped = clip_and_step([(self.policy, self.policy_optimizer, cfg.max_grad_norm)])
        if not stepped:
            log.warning("step %d: non-finite gradient norm %s; update skipped", self.step + 1, norm)
            return None
        return {"policy_loss": loss.item(), "entropy": entropy_mean.item(), "policy_grad_norm": norm, **metrics}


class GRPOTrainer(PolicyGradientTrainer):
    """GRPO: `PolicyGradientTrainer` with `GRPOConfig` defaults."""

    def __init__(self, policy_model, reward_model, tokenizer, device=None, config: Optional[GRPOConfig] = None,
                 **kwargs):
        super().__init__(policy_model, reward_model, tokenizer, device, config or GRPOConfig(), **kwargs)


class RLOOTrainer(PolicyGradientTrainer):
    """RLOO: `PolicyGradientTrainer` with `RLOOConfig` defaults."""

    def __init__(self, policy_model, reward_model, tokenizer, device=None, config: Optional[RLOOConfig] = None,
                 **kwargs):
        super().__init__(policy_model, reward_model, tokenizer, device, config or RLOOConfig(), **kwargs)


class REINFORCETrainer(PolicyGradientTrainer):
    """REINFORCE: `PolicyGradientTrainer` with `REINFORCEConfig` defaults."""

    def __init__(self, policy_model, reward_model, tokenizer, device=None, config: Optional[REINFORCEConfig] = None,
                 **kwargs):
        super().__init__(policy_model, reward_model, tokenizer, device, config or REINFORCEConfig(), **kwargs)


__all__ = ["PolicyGradientConfig", "GRPOConfig", "RLOOConfig", "REINFORCEConfig", "PolicyGradientTrainer",
           "GRPOTrainer", "RLOOTrainer", "REINFORCETrainer", "CONFIG_CLASSES", "POLICY_LOSSES", "PG_ALGORITHMS"]
