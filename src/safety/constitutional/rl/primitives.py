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
    "FixedKLController", "RunningMeanStd", "KL_ESTIMATORS", "discounted_returns", "group_advantages",
    "rloo_baseline", "policy_gradient_loss", "importance_sampling_loss", "dpo_loss", "DPO_LOSS_TYPES",
    "update_reference",
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


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1}, per row, without a value model (REINFORCE). (batch, T)

    Padding neither receives nor passes on reward: each row's episode ends at its last real token.
    """
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1 or group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(scores.shape)}")
    return scores.view(-1, group_size)  # (num_prompts, k): prompt-major, k answers per prompt


def group_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024): (r - mean_group) / (std_group + eps). (num_prompts*k,)

    `scores` is (num_prompts*k,) in prompt-major order (the k answers of prompt 0 first). The std is
    the unbiased one, as in DeepSeekMath/TRL; `scale=False` only centres (Dr. GRPO, Liu et al. 2025).
    A group whose answers all score the same gets advantage 0: it carries no signal.
    """
    grouped = _groups(scores, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_baseline(scores: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024): b_i = mean of the OTHER k-1
    answers to the same prompt, so it does not depend on answer i and the estimate stays unbiased.
    (num_prompts*k,), prompt-major. Needs k >= 2."""
    if group_size < 2:
        raise ValueError(f"the leave-one-out baseline needs group_size >= 2, got {group_size}")
    grouped = _groups(scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return baseline.reshape(-1)


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


def policy_gradient_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor,
                         ref_logprobs: Optional[Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                         entropy: Optional[Tensor] = None, entropy_coef: float = 0.0
                         ) -> Tuple[Tensor, Dict[str, float]]:
    """Plain (on-policy) policy gradient, REINFORCE's surrogate, as a loss to minimise:

        loss = mean_t [-A_t * log pi(a_t)] + kl_coef * mean_t KL_t(pi || ref) - entropy_coef * mean_t H_t

    Inputs (batch, T); means over real tokens. Its gradient is the REINFORCE estimate only for
    samples drawn from the current policy: reuse the samples with `importance_sampling_loss` or
    `ppo_policy_loss`. Metrics: `pg_loss`, `kl_ref` (mean per-token KL), `entropy`.
    """
    pg_loss = masked_mean(-advantages.detach() * logprobs, mask)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.item()}
    if ref_logprobs is not None:
        kl_ref = masked_mean(kl_penalty(logprobs, ref_logprobs.detach(), kl_estimator), mask)
        loss = loss + kl_coef * kl_ref
        metrics["kl_ref"] = kl_ref.item()
    if entropy is not None:
        entropy_mean = masked_mean(entropy, mask)
        loss = loss - entropy_coef * entropy_mean
        metrics["entropy"] = entropy_mean.item()
    return loss, metrics


def importance_sampling_loss(logprobs: Tensor, behavior_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                             clip_ratio: Optional[float] = 10.0) -> Tuple[Tensor, Dict[str, float]]:
    """Off-policy policy gradient with truncated importance weights: loss = -mean min(w, c) * A.

    w = pi(a) / pi_behaviour(a). Per token when `behavior_logprobs` is (batch, T); per answer when it
    is (batch,) (the answer's summed log-prob; `advantages` then (batch,) too). A weight above
    `clip_ratio` is held at it and passes no gradient (truncated IS: bounded variance, some bias).
    At w = 1 the gradient is exactly REINFORCE's. Metrics: is_ratio_mean/max/min, clipped_fraction.
    """
    if behavior_logprobs.dim() == 1:  # sequence-level weights
        log_w = (logprobs * mask).sum(1) - behavior_logprobs.detach()
        weight_mask = torch.ones_like(log_w)
    else:
        log_w = logprobs - behavior_logprobs.detach()
        weight_mask = mask
    weights = log_w.exp()
    clipped = weights if clip_ratio is None else torch.clamp(weights, max=clip_ratio)
    loss = masked_mean(-clipped * advantages.detach(), weight_mask)
    with torch.no_grad():
        real = weight_mask.bool()
        w_real = weights[real] if real.any() else weights.new_ones(1)
        metrics = {
            "is_ratio_mean": w_real.mean().item(), "is_ratio_max": w_real.max().item(),
            "is_ratio_min": w_real.min().item(),
            "clipped_fraction": 0.0 if clip_ratio is None else (w_real > clip_ratio).float().mean().item(),
        }
    return loss, metrics


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", labels: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, float]]:
    """Direct Preference Optimisation (Rafailov et al. 2023). All inputs (batch,): summed answer log-probs.

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps > 0: conservative DPO)
        ipo:     (h - 1 / (2 beta))^2                                   (Azar et al. 2023)

    `labels` (batch,) are P(chosen is better) for soft AI-feedback pairs: the target becomes
    labels * (1 - eps) + (1 - labels) * eps. Implicit rewards are beta * (log pi - log ref).
    Metrics: chosen/rejected reward means, reward accuracy (chosen > rejected), margin mean.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratio - rejected_logratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        target = torch.ones_like(h) if labels is None else labels.to(h.dtype)
        target = target * (1.0 - label_smoothing) + (1.0 - target) * label_smoothing
        logits = beta * h
        losses = -target * torch.nn.functional.logsigmoid(logits) \
            - (1.0 - target) * torch.nn.functional.logsigmoid(-logits)
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
        margins = chosen_rewards - rejected_rewards
        metrics = {
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": margins.mean().item(),
            "logps_chosen": policy_chosen_logps.mean().item(), "logps_rejected": policy_rejected_logps.mean().item(),
        }
    return losses.mean(), metrics


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


# -- reference model ------------------------------------------------------------------------

@torch.no_grad()
def update_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, method: str = "copy",
                     alpha: float = 0.99) -> None:
    """Move a frozen reference towards the policy: "copy" (ref <- policy) or "ema"
    (ref <- alpha * ref + (1 - alpha) * policy). Parameters are matched in order."""
    if method not in ("copy", "ema"):
        raise ValueError(f"unknown reference update {method!r}; choose 'copy' or 'ema'")
    for ref_p, p in zip(ref_model.parameters(), policy.parameters()):
        src = p.detach().to(ref_p.device)
        if method == "copy":
            ref_p.copy_(src)
        else:
            ref_p.mul_(alpha).add_(src, alpha=1 - alpha)


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
