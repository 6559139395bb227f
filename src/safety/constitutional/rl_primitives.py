"""RL math for language-model policies, as small pure functions (no models, no I/O).

Conventions, shared by every function here:
  * token-level tensors are (batch, answer_len): one column per answer token, right-padded;
  * `mask` is 1.0 on real answer tokens (up to and including end-of-turn) and 0.0 on padding;
  * padding never contributes to a mean, a variance, a loss or a recursion.

The PPO pieces follow the public implementations they are checked against (TRL's PPOTrainer,
OpenRLHF, CleanRL's ppo.py): the same formulas, the same metric definitions, so numbers logged
here can be compared with theirs. Algorithms beyond PPO (GRPO, RLOO, DPO) add their primitives to
this file in the same style.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "masked_mean", "masked_var", "masked_whiten", "compute_gae", "kl_penalty", "ppo_policy_loss",
    "clipped_value_loss", "conservative_kl_penalty", "explained_variance", "AdaptiveKLController",
    "FixedKLController", "RunningMeanStd", "KL_ESTIMATORS",
]


# -- masked statistics -----------------------------------------------------------------------

def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`). Empty mask -> 0."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL/OpenRLHF do)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count > 1:
            var = var * count / (count - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the masked entries; padding comes back as 0.

    `shift_mean=False` only rescales (keeps the mean), which TRL uses for per-token rewards.
    """
    mask = mask.to(values.dtype)
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Optional[Tensor] = None) -> float:
    """1 - Var[returns - values] / Var[returns] (CleanRL's diagnostic). 1 is perfect, <= 0 is useless."""
    if mask is None:
        mask = torch.ones_like(returns)
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


# -- advantages ------------------------------------------------------------------------------

def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> Tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over answer tokens (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    `rewards`, `values`, `mask`: (batch, T), right-padded. Each row's episode ends at its last
    real token: V and A beyond it are 0, so a short answer's last token bootstraps from nothing
    (terminal state) and padding neither receives nor passes on credit.
    Returns (advantages, returns), both (batch, T), returns = advantages + values, padding 0.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (batch, answer_len) shape")
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # at padding (mask 0) the running sums reset, so a row's real tokens see a terminal state
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


# -- KL --------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k3", "abs", "mse")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs. (batch, T)

    Tokens are sampled from pi, so with log r = log pi_ref - log pi (Schulman's "Approximating KL"):
      k1  = -log r              unbiased, can be negative per token
      k3  = (r - 1) - log r     unbiased, always >= 0, lower variance
      abs = |log pi - log pi_ref|,  mse = 0.5 (log pi - log pi_ref)^2   (TRL's extra options)
    All are exactly 0 where the two models agree.
    """
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k3":
        log_ratio = -diff
        return log_ratio.exp() - 1 - log_ratio
    if estimator == "abs":
        return diff.abs()
    if estimator == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def conservative_kl_penalty(kl: Tensor, threshold: float, coef: float) -> Tensor:
    """coef * max(0, KL - threshold)^2: no cost inside the trust region, a quadratic wall beyond it."""
    return coef * torch.clamp(kl - threshold, min=0.0) ** 2


# -- losses ----------------------------------------------------------------------------------

def ppo_policy_loss(new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float = 0.2) -> Tuple[Tensor, Dict[str, float]]:
    """Clipped surrogate objective, as a loss to minimise (Schulman et al. 2017):

        ratio = exp(new - old)
        loss  = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))   (= -min(...) of the paper)

    Inputs (batch, T); the mean is over real tokens. Metrics: `clipfrac` (share of tokens where the
    clipped term is the active one), `approx_kl` (0.5 * mean (new - old)^2, TRL's / CleanRL's
    estimate of KL(old || new)), and the ratio's mean/max/min over real tokens.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        real = mask.bool()
        ratio_real = ratio[real] if real.any() else ratio.new_ones(1)
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask).item(),
            "ratio_mean": ratio_real.mean().item(),
            "ratio_max": ratio_real.max().item(),
            "ratio_min": ratio_real.min().item(),
        }
    return loss, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: Optional[float] = 0.2) -> Tuple[Tensor, Dict[str, float]]:
    """0.5 * mean_t max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clamp(V - old, -clip, clip).

    The value may move at most `clip` away from its rollout estimate before the loss stops
    rewarding the move (PPO2/TRL). `clip=None` gives the plain 0.5 * MSE. Inputs (batch, T).
    """
    loss_unclipped = (values - returns) ** 2
    if clip is None:
        loss = 0.5 * masked_mean(loss_unclipped, mask)
        return loss, {"vf_clipfrac": 0.0}
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask).item()
    return loss, {"vf_clipfrac": clipfrac}


# -- KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences") --

class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    `current_kl` is the mean per-sequence KL of the last batch and `n_steps` the number of samples
    in it, as in the paper and TRL: beta grows while KL is above target, shrinks while below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            return self.value  # never let a bad batch poison the coefficient
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))


# -- running statistics ----------------------------------------------------------------------

class RunningMeanStd:
    """Mean and variance of everything seen so far (Chan et al. parallel update), for reward scaling."""

    def __init__(self, epsilon: float = 1e-4):
        # epsilon pseudo-count keeps the first update from dividing by zero (as in OpenAI baselines)
        self.mean, self.var, self.count = 0.0, 1.0, float(epsilon)

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        batch_mean, batch_var, batch_count = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta ** 2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def normalize(self, x: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        return ((x - self.mean) if shift_mean else x) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = (float(state[k]) for k in ("mean", "var", "count"))
