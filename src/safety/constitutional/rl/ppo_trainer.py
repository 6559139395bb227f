"""PPO for language models: a policy, a separate per-token value model, a frozen reference and a
reward model (Ouyang et al. 2022; the same recipe as TRL's PPOTrainer and OpenRLHF).

One training step reads top to bottom (`train_step`):

  1. rollout   sample answers with the shared `generation.generate`; then ONE batched forward per
               frozen model under inference_mode: the reference's log-probs of the sampled tokens (at
               the sampling temperature) and the reward model's score at the last real token (plus,
               optionally, a judge term: below). The old policy's log-probs and the critic's values
               come from the first update mini-batch's own forward, before any step
               (`old_values_from_update`, the default; rows outside that mini-batch get a no-grad
               forward of just those rows), or with the option off from one more batched forward each;
  2. rewards   r_t = -beta * KL_t at every answer token, plus the (normalised) score at the last one;
  3. GAE       advantages over answer tokens only (padding masked), whitened; returns = A + V;
  4. update    several epochs over shuffled mini-batches: clipped policy ratio, clipped value loss,
               separate AdamW optimisers and gradient clipping for policy and value.

Optional judge term (`judge_reward=` hook, scaled by `PPOConfig.judge_reward_weight`, 0 = off): a
callable (prompts, answers) -> (batch,) whose value is added to the raw reward-model score right after
the rollout, *before* `normalise_scores` (so it is whitened, clipped and eos-penalised with it), as in
rule-based rewards for safety (Mu et al. 2024); `judge_reward.RuleBasedReward` is a ready one.

All the math lives in `rl.primitives` as pure functions. This file holds what is PPO's own: the
config, the critic (its per-token values) and the step (GAE, clipped policy and value losses). The
rollout, the frozen reference, reward scoring and the judge hook are `rl.rollout`'s components; the
prompt sampler, update epochs, `train`, checkpoints and the guide's text helpers are
`rl.online_trainer.OnlineRLTrainer`'s, shared with GRPO/RLOO/REINFORCE. The step loop, bad-step policy,
Ctrl-C and the JSONL log are `training.loop.TrainingLoop`'s; `train_step` ends with the loop's
`end_step`, so a step taken on its own counts and stops like one in `train`. Token alignment:
with prompt width P (left-padded) and answer width R (right-padded), answer token t sits at column
P + t and is *predicted* at column P - 1 + t; its log-prob and its value both come from that
column (as in TRL: `values[:, P - 1:-1]`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from src.models.heads import ValueModel

from ..common import distributed as ddp
from ..common import parallel
from ..training.guarded_step import clip_and_step, finite_on_all_ranks
from ..training.logprobs import sequence_logprobs
from .online_trainer import OnlineRLConfig, OnlineRLTrainer, PPOTrainingError
from .primitives import (clipped_value_loss, compute_gae, conservative_kl_penalty,
                         explained_variance, kl_penalty, masked_mean, masked_whiten, ppo_policy_loss)
from .rollout import Rollout, device_of, disable_dropout

log = logging.getLogger(__name__)

@dataclass
class PPOConfig(OnlineRLConfig):
    """Everything PPOTrainer can be told: the shared online-RL fields (`OnlineRLConfig`) and the
    critic's. The guide's constructor arguments map onto fields of the same names."""

    # the critic (value model) and GAE
    value_learning_rate: Optional[float] = None  # value AdamW learning rate (None: learning_rate)
    value_max_grad_norm: Optional[float] = None  # value gradient clipping (None: max_grad_norm)
    value_clip: Optional[float] = 0.2       # value clip around the rollout values (None: plain MSE)
    value_loss_coef: float = 0.5
    gae_lambda: float = 0.95
    value_keep_layers: Optional[int] = None  # critic = bottom K decoder layers of the policy + value head (None/0: all)
                                            # (a given ValueModel is cut to K layers too; docs/ppo.md)
    old_values_from_update: bool = True     # old log-probs/values from the first update's forward (same numbers)
                                            # (instead of a separate no-grad forward of policy and critic in the
                                            # rollout; the other mini-batches' rows still get one; docs/ppo.md)

    def __post_init__(self):
        super().__post_init__()
        if not (self.value_keep_layers is None or self.value_keep_layers >= 0):
            raise ValueError(f"{type(self).__name__}.value_keep_layers must be >= 0 (None or 0: the full depth), "
                             f"got {self.value_keep_layers!r}")
        if not (self.value_clip is None or self.value_clip > 0):
            raise ValueError(f"{type(self).__name__}.value_clip must be > 0 or None, got {self.value_clip!r}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"{type(self).__name__}.gae_lambda must be in [0, 1], got {self.gae_lambda!r}")


def _dropout_active(model: nn.Module) -> bool:
    """Whether a train-mode forward of `model` would drop anything (nn.Dropout or HF attention dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


# The guide's constructor arguments, in its order, with its defaults.
_GUIDE_DEFAULTS = {"learning_rate": 1e-5, "clip_epsilon": 0.2, "kl_penalty": 0.1, "gamma": 0.99,
                   "gae_lambda": 0.95, "value_loss_coef": 0.5, "max_grad_norm": 1.0}


class PPOTrainer(OnlineRLTrainer):
    """PPO with a value model, a frozen reference, GAE, per-token KL rewards and exact-resume checkpoints.

    Positional arguments follow the guide: (policy_model, value_model, reward_model, tokenizer,
    device, learning_rate, clip_epsilon, kl_penalty, gamma, gae_lambda, value_loss_coef,
    max_grad_norm). With `config=PPOConfig(...)` its fields are used, except that any of the guide's
    arguments given with a value other than its default overrides the config field of that name.

    `value_model=None` builds a `ValueModel` on a copy of the policy's backbone. `ref_model=None`
    deep-copies the initial policy (once). `reward_tokenizer` is needed when the reward model reads
    a different vocabulary: its inputs are then rebuilt from the decoded text.

    `judge_reward` (keyword-only): a callable (prompt_texts, answer_texts) -> tensor (batch,), e.g.
    `judge_reward.RuleBasedReward`; `config.judge_reward_weight` times its value is added to each raw
    reward-model score before normalisation. Off unless both are given (weight 0 = never called).
    """

    def __init__(self, policy_model: nn.Module, value_model: Optional[nn.Module], reward_model: nn.Module,
                 tokenizer, device: Union[str, torch.device, None] = None, learning_rate: float = 1e-5,
                 clip_epsilon: float = 0.2, kl_penalty: float = 0.1, gamma: float = 0.99,
                 gae_lambda: float = 0.95, value_loss_coef: float = 0.5, max_grad_norm: float = 1.0,
                 config: Optional[PPOConfig] = None, ref_model: Optional[nn.Module] = None,
                 reward_tokenizer=None, *, judge_reward: Optional[Callable[[List[str], List[str]], Any]] = None):
        guide_args = dict(learning_rate=learning_rate, clip_epsilon=clip_epsilon, kl_penalty=kl_penalty,
                          gamma=gamma, gae_lambda=gae_lambda, value_loss_coef=value_loss_coef,
                          max_grad_norm=max_grad_norm)
        if config is None:
            config = PPOConfig(**guide_args)
        else:
            overrides = {k: v for k, v in guide_args.items() if v != _GUIDE_DEFAULTS[k]}
            config = PPOConfig(**{**asdict(config), **overrides})
        if value_model is None:  # the critic copies the policy's backbone before any LoRA adapter is added
            policy_model = policy_model.to(torch.device(device) if device is not None else device_of(policy_model))
            value_model = ValueModel.from_causal_lm(policy_model, device=device_of(policy_model),
                                                    keep_layers=config.value_keep_layers)
        elif config.value_keep_layers:  # a given critic is cut to the configured depth too (in place)
            if not hasattr(value_model, "keep_bottom_layers"):
                raise TypeError(f"value_keep_layers={config.value_keep_layers} needs a ValueModel critic, got "
                                f"{type(value_model).__name__}")
            value_model.keep_bottom_layers(config.value_keep_layers)
        super().__init__(policy_model, value_model, reward_model, tokenizer, device, config, ref_model=ref_model,
                         reward_tokenizer=reward_tokenizer, judge_reward=judge_reward)
        # Old log-probs/values from the first update's forward are the same numbers only when that forward
        # is deterministic: no active dropout (train-mode forward vs the rollout's eval-mode one).
        self.old_from_update = config.old_values_from_update
        if self.old_from_update and any(_dropout_active(m) for m in self._trained_models()):
            log.warning("old_values_from_update is on but policy or critic has active dropout (disable_dropout="
                        "False): the first update's forward would differ from a rollout forward, so the old "
                        "log-probs and values come from the rollout's separate forward instead")
            self.old_from_update = False

    def _token_values(self, input_ids, attention_mask, prompt_width, response_len, value_model=None) -> torch.Tensor:
        """Values aligned with answer tokens: column P-1+t for token t. (batch, R). `value_model`: the model
        to call (a training forward passes a `Parallel`'s `Forward` model); default the plain critic."""
        value_model = self.value_model if value_model is None else value_model
        if hasattr(value_model, "token_scores"):
            per_position = value_model.token_scores(input_ids, attention_mask)
        else:
            per_position = value_model(input_ids, attention_mask)
            per_position = getattr(per_position, "logits", per_position)
            if per_position.dim() == 3 and per_position.shape[-1] == 1:
                per_position = per_position.squeeze(-1)
            if per_position.dim() != 2:
                raise TypeError("the value model must return one value per token (batch, seq); a model that "
                                "scores only the last token cannot give per-token values for GAE. Use "
                                "src.models.ValueModel (ValueModel.from_causal_lm(policy)).")
        return per_position[:, prompt_width - 1:prompt_width - 1 + response_len].float()

    def rollout(self, prompts: Sequence, max_new_tokens: int = 150, temperature: float = 1.0) -> Rollout:
        """Sample answers and score them: one batched forward per model (the critic's too), under inference_mode."""
        self.value_model.eval()
        return self.rollouts.collect(prompts, max_new_tokens, temperature, values=self._token_values)

    # -- the step ----------------------------------------------------------------------------
    def train_step(self, prompts: Sequence, num_epochs_per_batch: int = 4, max_length: int = 150,
                   temperature: float = 1.0) -> Dict[str, float]:
        """One PPO iteration on `prompts` (a batch). `max_length` = max new tokens per answer."""
        cfg = self.config
        t0 = time.perf_counter()
        if self.old_from_update:  # no policy/critic forward in the rollout: see _old_from_first_minibatch
            rollout = self.rollouts.collect(prompts, max_length, temperature, policy_logprobs=False)
        else:
            rollout = self.rollout(prompts, max_new_tokens=max_length, temperature=temperature)
        t_rollout = time.perf_counter() - t0
        mask = rollout.mask
        batch = mask.shape[0]
        first_order = first_forward = None
        if self.old_from_update:
            sampler_state = self.sampler.get_state()
            first_order = torch.randperm(batch, generator=self.sampler)  # _update_epochs' first draw, made here
            first_forward = self._old_from_first_minibatch(rollout, first_order, temperature)

        # rewards, GAE (no gradients anywhere here)
        scores = self.normalise_scores(rollout.total_scores, rollout.finished)  # RM score + judge term
        rewards, kl = self.compute_token_rewards(rollout, scores)
        advantages, returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
        raw_advantage_mean = masked_mean(advantages, mask).item()
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        rollout_finite = ddp.all_true(all(torch.isfinite(t).all() for t in (rewards, advantages, returns)))
        if first_order is not None and not rollout_finite:  # nothing trains: no permutation was drawn
            self.sampler.set_state(sampler_state)
            first_order = first_forward = None

        # update epochs over shuffled mini-batches
        self.policy.train()
        self.value_model.train()
        pending = [first_forward] if first_forward is not None else []

        def update(idx):
            forward = pending.pop() if pending else None  # the first mini-batch's forward, already done
            return self._update_minibatch(rollout, idx, advantages[idx], returns[idx], temperature, forward)
        acc, skipped, epochs_done = self._update_epochs(batch, num_epochs_per_batch, rollout_finite, update,
                                                        first_order=first_order)
        self.policy.eval()
        self.value_model.eval()

        beta_used, kl_per_answer = self._close_update(rollout, mask, batch)
        self._maybe_update_reference(self.step + 1)

        mean = self._means(acc)
        stats = {
            "step": self.step + 1,
            "policy_loss": mean("policy_loss"),
            "value_loss": mean("value_loss"),
            **self._policy_step_stats(rollout, scores, kl, beta_used, kl_per_answer, acc),
            "mean_advantage": raw_advantage_mean,
            "value_clipfrac": mean("vf_clipfrac"),
            "explained_variance": explained_variance(rollout.values, returns, mask),
            "value_grad_norm": mean("value_grad_norm"),
            **self._step_bookkeeping(rollout, beta_used, epochs_done, skipped, t_rollout, t0),
        }
        return self._record_step(stats, rollout, skipped)

    def _minibatch_forward(self, rollout: Rollout, idx, temperature):
        """The training forwards of mini-batch `idx`, with gradients: (log-probs, entropy, values), each
        (len(idx), R). They go through the engines (DDP reduces the gradients in backward())."""
        P, R = rollout.prompt_width, rollout.mask.shape[1]
        ids, attn = rollout.input_ids[idx], rollout.attention_mask[idx]
        new_logprobs, entropy = self.policy_parallel(
            lambda m: sequence_logprobs(m, ids, attn, R, temperature, return_entropy=True,
                                        entropy_grad=bool(self.config.entropy_coef)))
        values = self.value_parallel(lambda m: self._token_values(ids, attn, P, R, value_model=m))
        return idx, new_logprobs, entropy, values

    def _old_from_first_minibatch(self, rollout: Rollout, order: torch.Tensor, temperature):
        """`old_values_from_update`: fill `rollout.logprobs` and `rollout.values` without the rollout's
        separate no-grad forward of policy and critic over the whole batch.

        The first mini-batch of the first epoch (`order[:mini_batch_size]`) runs its training forward
        now, before rewards and advantages exist (they need the old log-probs and values of every row);
        its detached outputs are its rows' old log-probs and values, and the update reuses the forward
        (returned) for its loss. Nothing has stepped yet, so these are the rollout weights' numbers, and
        with dropout off a train-mode forward equals an eval-mode one. The other rows (several
        mini-batches) need their old numbers before the first optimiser step too, so they get one
        no-grad forward of just those rows, here. Saves mini_batch_size/batch of a policy and a critic
        forward per iteration: all of it with one mini-batch."""
        P, R = rollout.prompt_width, rollout.mask.shape[1]
        batch = rollout.mask.shape[0]
        size = min(self.config.mini_batch_size or batch, batch)
        first, rest = order[:size], order[size:].sort().values
        device = rollout.mask.device
        logprobs, old_values = torch.zeros(batch, R, device=device), torch.zeros(batch, R, device=device)
        if len(rest):  # as the rollout's forward would: eval mode, no gradients
            self.policy.eval()
            self.value_model.eval()
            ids, attn = rollout.input_ids[rest], rollout.attention_mask[rest]
            with torch.no_grad():
                logprobs[rest] = sequence_logprobs(self.policy, ids, attn, R, temperature).to(device)
                old_values[rest] = self._token_values(ids, attn, P, R).to(device)
        self.policy.train()
        self.value_model.train()
        forward = self._minibatch_forward(rollout, first, temperature)
        _, new_logprobs, _, values = forward
        logprobs[first], old_values[first] = new_logprobs.detach().to(device), values.detach().to(device)
        rollout.logprobs, rollout.values = logprobs * rollout.mask, old_values * rollout.mask
        return forward

    def _update_minibatch(self, rollout: Rollout, idx, advantages, returns, temperature,
                          forward=None) -> Optional[Dict[str, float]]:
        """One gradient step on policy and value. Returns None (and changes nothing) if not finite.
        `forward`: this mini-batch's training forward, already run (`_old_from_first_minibatch`)."""
        cfg = self.config
        mask = rollout.mask[idx]
        old_logprobs, ref_logprobs, old_values = rollout.logprobs[idx], rollout.ref_logprobs[idx], rollout.values[idx]

        if forward is not None and not torch.equal(forward[0], idx):
            raise RuntimeError("the precomputed forward is not this mini-batch's")
        _, new_logprobs, entropy, values = forward if forward is not None else \
            self._minibatch_forward(rollout, idx, temperature)
        pg_loss, metrics = ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cfg.clip_epsilon)
        entropy_mean = masked_mean(entropy if cfg.entropy_coef else entropy.detach(), mask)
        policy_loss = pg_loss - cfg.entropy_coef * entropy_mean
        if cfg.conservative_kl_coef:
            kl_ref = masked_mean(kl_penalty(new_logprobs, ref_logprobs, "k3"), mask)
            policy_loss = policy_loss + conservative_kl_penalty(kl_ref, cfg.conservative_kl_threshold,
                                                                cfg.conservative_kl_coef)
        vf_loss, vf_metrics = clipped_value_loss(values, old_values, returns, mask, cfg.value_clip)
        value_loss = cfg.value_loss_coef * vf_loss

        self.policy_optimizer.zero_grad(set_to_none=True)
        self.value_optimizer.zero_grad(set_to_none=True)
        if not finite_on_all_ranks(policy_loss, value_loss):
            log.warning("step %d: non-finite loss (policy %s, value %s); update skipped",
                        self.step + 1, policy_loss.item(), value_loss.item())
            return None
        policy_loss.backward()
        value_loss.backward()
        v_max = cfg.value_max_grad_norm if cfg.value_max_grad_norm is not None else cfg.max_grad_norm
        (p_norm, v_norm), stepped = clip_and_step([(self.policy, self.policy_optimizer, cfg.max_grad_norm),
                                                   (self.value_model, self.value_optimizer, v_max)])
        if not stepped:
            log.warning("step %d: non-finite gradient norm (policy %s, value %s); update skipped",
                        self.step + 1, p_norm, v_norm)
            return None
        return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy_mean.item(),
                "policy_grad_norm": p_norm, "value_grad_norm": v_norm, **metrics, **vf_metrics}

    # -- the guide's helper API (the rest is OnlineRLTrainer's) ------------------------------
    def compute_gae(self, rewards: torch.Tensor, values: torch.Tensor, dones: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None):
        """(advantages, returns) with the trainer's gamma/lambda. `mask` marks real tokens; `dones`
        (1 at a sequence's last step) is accepted too: steps after the first done are treated as padding."""
        if mask is None:
            if dones is None:
                mask = torch.ones_like(rewards)
            else:
                done = dones.float()
                mask = ((done.cumsum(-1) - done) == 0).float()
        return compute_gae(rewards, values, mask, self.config.gamma, self.config.gae_lambda)

    def compute_ppo_loss(self, old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clipped surrogate loss (to minimise). Metrics of the last call are in `self.last_loss_metrics`."""
        mask = mask if mask is not None else torch.ones_like(new_logprobs)
        loss, self.last_loss_metrics = ppo_policy_loss(new_logprobs, old_logprobs.detach(), advantages.detach(),
                                                       mask, self.config.clip_epsilon)
        return loss

    @torch.no_grad()
    def compute_values(self, prompts, responses) -> torch.Tensor:
        """Value of the state before each answer token. (batch, R), padding 0."""
        ids, attn, P, mask, _ = self._encode(prompts, responses)
        return self._token_values(ids, attn, P, mask.shape[1]) * mask


__all__ = ["PPOConfig", "PPOTrainer", "PPOTrainingError", "Rollout", "disable_dropout"]
