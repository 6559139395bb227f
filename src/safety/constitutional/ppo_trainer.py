"""PPO for language models: a policy, a separate per-token value model, a frozen reference and a
reward model (Ouyang et al. 2022; the same recipe as TRL's PPOTrainer and OpenRLHF).

One training step reads top to bottom (`train_step`):

  1. rollout   sample answers with the shared `generation.generate`; then ONE batched forward per
               model under inference_mode: the policy's log-probs of the sampled tokens (at the
               sampling temperature), the reference's, the value model's per-token values and the
               reward model's score at the last real token (plus, optionally, a judge term: below);
  2. rewards   r_t = -beta * KL_t at every answer token, plus the (normalised) score at the last one;
  3. GAE       advantages over answer tokens only (padding masked), whitened; returns = A + V;
  4. update    several epochs over shuffled mini-batches: clipped policy ratio, clipped value loss,
               separate AdamW optimisers and gradient clipping for policy and value.

Optional judge term (`judge_reward=` hook, scaled by `PPOConfig.judge_reward_weight`, 0 = off): a
callable (prompts, answers) -> (batch,) whose value is added to the raw reward-model score right after
the rollout, *before* `normalise_scores` (so it is whitened, clipped and eos-penalised with it), as in
rule-based rewards for safety (Mu et al. 2024); `judge_reward.RuleBasedReward` is a ready one.

All the math lives in `rl_primitives` as pure functions; this file orchestrates. The step loop,
bad-step policy, Ctrl-C, checkpoints and the JSONL log are `training_loop.TrainingLoop`'s; `train_step`
ends with the loop's `end_step`, so a step taken on its own counts and stops like one in `train`.
Token alignment:
with prompt width P (left-padded) and answer width R (right-padded), answer token t sits at column
P + t and is *predicted* at column P - 1 + t; its log-prob and its value both come from that
column (as in TRL: `values[:, P - 1:-1]`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from src.models.attention import attention_for
from src.models.checkpointing import enable_gradient_checkpointing
from src.models.heads import (ScalarHeadModel, ValueModel, backbone_of, head_scores, last_token_index,
                             position_ids_from_mask)
from src.models.lora import adapters_disabled, add_lora
from src.models.precision import autocast

from .generation import GenerationConfig, GenerationOutput, encode_answers, generate, to_messages, tokenize_prompts
from . import distributed as ddp
from .logprobs import selective_log_softmax, sequence_logprobs
from .guarded_step import clip_and_step, finite_on_all_ranks
from .optim import LR_SCHEDULES, adamw, lr_scheduler
from .rl_primitives import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, RunningMeanStd,
                            clipped_value_loss, compute_gae, conservative_kl_penalty, explained_variance,
                            kl_penalty, masked_mean, masked_whiten, ppo_policy_loss, update_reference)
from .training_loop import LoopCounters, TrainingError, TrainingLoop, load_models, recent_means

log = logging.getLogger(__name__)

REWARD_NORMALIZATIONS = ("auto", "running", "model", "none")
REF_UPDATES = ("none", "copy", "ema")


class PPOTrainingError(TrainingError):
    """Training cannot go on (more than max_bad_steps steps in a row with non-finite updates)."""


@dataclass
class PPOConfig:
    """Everything PPOTrainer can be told. The guide's constructor arguments map onto the first fields.

    Defaults follow TRL/OpenRLHF where the guide is silent. `gamma` defaults to 1.0 here (the
    RLHF convention: the score arrives at the last token and should not be discounted by answer
    length); the guide's constructor keeps its 0.99 default for compatibility.
    """

    # optimisation
    learning_rate: float = 1e-5             # policy AdamW learning rate
    value_learning_rate: Optional[float] = None  # value AdamW learning rate (None: learning_rate)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"           # constant | linear | cosine, stepped once per PPO step
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0    # policy gradient clipping (None: off)
    value_max_grad_norm: Optional[float] = None  # value gradient clipping (None: max_grad_norm)
    # PPO objective
    clip_epsilon: float = 0.2               # policy ratio clip
    value_clip: Optional[float] = 0.2       # value clip around the rollout values (None: plain MSE)
    value_loss_coef: float = 0.5
    entropy_coef: float = 0.0               # entropy bonus (0: off)
    mini_batch_size: Optional[int] = None   # rows per update (None: the whole rollout batch)
    early_stop_kl: Optional[float] = None   # stop the epochs once approx KL(old||new) exceeds this
    conservative_kl_coef: float = 0.0       # coef * max(0, KL(pi||ref) - threshold)^2 in the loss
    conservative_kl_threshold: float = 0.05  # per-token KL (k3) threshold for that penalty
    # advantages
    gamma: float = 1.0
    gae_lambda: float = 0.95
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
    # bookkeeping
    max_bad_steps: int = 3                  # steps in a row with a non-finite loss/grad tolerated (training_loop)
    seed: int = 0                           # prompt sampling and mini-batch shuffling
    keep_last_checkpoints: int = 3
    log_file: Optional[str] = None          # append each step's metrics here as JSON lines

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"PPOConfig.{name} {what}, got {getattr(self, name)!r}")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.clip_epsilon > 0, "clip_epsilon", "must be > 0")
        need(self.value_clip is None or self.value_clip > 0, "value_clip", "must be > 0 or None")
        need(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        need(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
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
        need(self.target_kl > 0, "target_kl", "must be > 0")
        need(math.isfinite(self.judge_reward_weight), "judge_reward_weight", "must be a finite number (0: off)")
        need(self.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)")
        need(not (self.lora_r and self.ref_update != "none"), "ref_update",
             "must be 'none' with LoRA (the reference is the policy's frozen base weights)")
        need(not (self.share_reward_and_reference and self.ref_update != "none"), "ref_update",
             "must be 'none' with share_reward_and_reference (the shared backbone is the reward model's)")


# The guide's constructor arguments, in its order, with its defaults.
_GUIDE_DEFAULTS = {"learning_rate": 1e-5, "clip_epsilon": 0.2, "kl_penalty": 0.1, "gamma": 0.99,
                   "gae_lambda": 0.95, "value_loss_coef": 0.5, "max_grad_norm": 1.0}


@dataclass
class Rollout:
    """One batch of experience. Token tensors are (batch, R); R = answer width of the batch."""

    input_ids: torch.Tensor        # (batch, P + R) prompt left-padded + answer right-padded
    attention_mask: torch.Tensor   # (batch, P + R)
    prompt_width: int              # P
    mask: torch.Tensor             # (batch, R) float, 1 on answer tokens incl. end-of-turn
    finished: torch.Tensor         # (batch,) bool, ended with end-of-turn
    logprobs: torch.Tensor         # (batch, R) policy at sampling time (the "old" policy)
    ref_logprobs: torch.Tensor     # (batch, R)
    values: torch.Tensor           # (batch, R) value of the state that predicts each token
    scores: torch.Tensor           # (batch,) raw reward-model score
    texts: List[str] = field(default_factory=list)
    prompt_texts: List[str] = field(default_factory=list)
    judge_scores: Optional[torch.Tensor] = None  # (batch,) weighted judge term; None when the hook is off

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def total_scores(self) -> torch.Tensor:
        """The raw sequence score the trainer rewards: reward-model score + judge term (if on). (batch,)"""
        return self.scores if self.judge_scores is None else self.scores + self.judge_scores


def disable_dropout(model: nn.Module) -> None:
    """Dropout p -> 0 everywhere (nn.Dropout and HF attention dropout), as TRL does for PPO."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _vocab_size(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class PPOTrainer(LoopCounters):
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
        self.config = config
        self.device = torch.device(device) if device is not None else _device_of(policy_model)
        self.tokenizer = tokenizer
        self.reward_tokenizer = reward_tokenizer
        self.judge_reward = judge_reward
        if judge_reward is not None and not config.judge_reward_weight:
            log.warning("a judge_reward hook was given but judge_reward_weight is 0: the judge term is off")
        elif judge_reward is None and config.judge_reward_weight:
            log.warning("judge_reward_weight=%s but no judge_reward hook was given: the judge term is off",
                        config.judge_reward_weight)
        frozen_device = torch.device("cpu") if config.offload_frozen_to_cpu else self.device

        self.policy = policy_model.to(self.device)
        if value_model is None:
            value_model = ValueModel.from_causal_lm(policy_model, device=self.device)
        self.value_model = value_model.to(self.device)
        ddp.init_distributed()  # joins torchrun's process group; a no-op in a plain process
        for model in (self.policy, self.value_model):  # under torchrun: every rank starts from rank 0's
            ddp.broadcast_model(model)
        self.reward_model = reward_model.to(frozen_device)
        self.reward_model.requires_grad_(False).eval()
        self._check_reward_vocab()

        if config.lora_r:  # after the value model copied the base backbone
            add_lora(self.policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)

        # The reference: frozen, eval mode, never in an optimiser. Built once, before any update.
        self._shared_frozen = config.share_reward_and_reference
        self._ref_lm_head = None
        if self._shared_frozen:
            if ref_model is not None:
                raise ValueError("give either ref_model or share_reward_and_reference=True, not both")
            self.ref_model = None
            self._ref_lm_head = self._build_shared_reference()
        elif config.lora_r and ref_model is None:
            self.ref_model = None  # the policy with its adapters off: `_ref_and_scores`
        else:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(policy_model)
            self.ref_model.to(frozen_device).requires_grad_(False).eval()

        if config.disable_dropout:
            for model in (self.policy, self.value_model):
                disable_dropout(model)
        if config.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                enable_gradient_checkpointing(model)

        self.policy_optimizer = adamw(
            [p for p in self.policy.parameters() if p.requires_grad], lr=config.learning_rate,
            weight_decay=config.weight_decay, eps=config.adam_eps)
        self.value_optimizer = adamw(
            [p for p in self.value_model.parameters() if p.requires_grad],
            lr=config.value_learning_rate or config.learning_rate, weight_decay=config.weight_decay,
            eps=config.adam_eps)
        self.policy_scheduler = self.value_scheduler = None

        if config.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(config.kl_penalty, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_penalty)
        self.reward_stats = RunningMeanStd()
        self.sampler = torch.Generator().manual_seed(config.seed)  # prompts and mini-batch order
        self.history: List[Dict[str, float]] = []
        self.loop = TrainingLoop(self.algorithm, config.max_bad_steps, error=PPOTrainingError,
                                 advice="Lower the learning rate or check the reward model's outputs.",
                                 keep_last=config.keep_last_checkpoints, log_file=config.log_file)

    # -- setup helpers -----------------------------------------------------------------------
    def _check_reward_vocab(self) -> None:
        if self.reward_tokenizer is not None:
            return
        policy_vocab, reward_vocab = _vocab_size(self.policy), _vocab_size(self.reward_model)
        if policy_vocab is not None and reward_vocab is not None and policy_vocab != reward_vocab:
            raise ValueError(
                f"the reward model's vocabulary ({reward_vocab} tokens) differs from the policy's "
                f"({policy_vocab}): pass reward_tokenizer=<the reward model's tokenizer> so answers are "
                "re-tokenised for it")

    def _build_shared_reference(self) -> nn.Module:
        """Reference = the reward model's backbone + the policy's initial LM head (no deep copy).

        Valid only when that backbone *is* the initial policy's (a reward model trained head-only
        on the same base), which is checked tensor by tensor.
        """
        if self.reward_tokenizer is not None or not isinstance(self.reward_model, ScalarHeadModel):
            raise ValueError("share_reward_and_reference needs a RewardModel on the policy's own tokenizer")
        reward_backbone, policy_backbone = backbone_of(self.reward_model), backbone_of(self.policy)
        policy_state = policy_backbone.state_dict()
        for name, tensor in reward_backbone.state_dict().items():
            other = policy_state.get(name)
            if other is None or other.shape != tensor.shape or not torch.equal(other.cpu(), tensor.cpu()):
                raise ValueError(
                    f"share_reward_and_reference: the reward model's backbone differs from the policy's at "
                    f"{name!r}; sharing is only valid for a reward model whose backbone was not trained "
                    "(head-only). Leave the option off to deep-copy the reference instead.")
        head = self.policy.get_output_embeddings()
        embed = reward_backbone.get_input_embeddings()
        if head.weight.data_ptr() == self.policy.get_input_embeddings().weight.data_ptr():
            return embed  # tied embeddings: the reward backbone's own embedding matrix is the head
        frozen = copy.deepcopy(head).to(_device_of(self.reward_model))
        return frozen.requires_grad_(False)

    def _build_schedulers(self, total_steps: int) -> None:
        cfg = self.config
        self.policy_scheduler = lr_scheduler(self.policy_optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
        self.value_scheduler = lr_scheduler(self.value_optimizer, cfg.lr_schedule, cfg.warmup_steps, total_steps)
        self.loop.schedulers = [self.policy_scheduler, self.value_scheduler]  # stepped once per step (end_step)

    # -- frozen forwards ---------------------------------------------------------------------
    def _ref_and_scores(self, input_ids, attention_mask, response_len, temperature, prompt_texts, texts):
        """Reference log-probs (batch, R) and raw reward scores (batch,), one forward per frozen model."""
        frozen_device = _device_of(self.reward_model)
        ids, mask = input_ids.to(frozen_device), attention_mask.to(frozen_device)
        if self._shared_frozen:
            with autocast(frozen_device), attention_for(self.reward_model, ids):
                hidden = backbone_of(self.reward_model)(input_ids=ids, attention_mask=mask,
                                                      position_ids=position_ids_from_mask(mask),
                                                      use_cache=False).last_hidden_state
                # the head in the same precision as `lm_logits` gives the policy's log-probs
                logits = nn.functional.linear(hidden[:, -response_len - 1:-1], self._ref_lm_head.weight,
                                              getattr(self._ref_lm_head, "bias", None)).float()
            ref_logprobs = selective_log_softmax(logits / temperature, ids[:, -response_len:])
            token_scores = head_scores(self.reward_model, hidden)
            scores = token_scores.gather(1, last_token_index(mask)[:, None]).squeeze(1)
        elif self.ref_model is None:  # LoRA: the reference is the policy's base weights
            with adapters_disabled(self.policy):
                ref_logprobs = sequence_logprobs(self.policy, input_ids, attention_mask, response_len, temperature)
            scores = self._score(ids, mask, prompt_texts, texts)
        else:
            ref_logprobs = sequence_logprobs(self.ref_model, ids.to(_device_of(self.ref_model)),
                                             mask.to(_device_of(self.ref_model)), response_len, temperature)
            scores = self._score(ids, mask, prompt_texts, texts)
        return ref_logprobs.to(self.device), scores.to(self.device)

    def _score(self, ids, mask, prompt_texts, texts) -> torch.Tensor:
        if self.reward_tokenizer is not None:
            ids, mask = self._retokenise_for_reward(prompt_texts, texts)
        out = self.reward_model(ids.to(_device_of(self.reward_model)), mask.to(_device_of(self.reward_model)))
        out = getattr(out, "logits", out)
        if out.dim() == 2 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        if out.dim() != 1:
            raise TypeError(f"the reward model must return one score per sequence (batch,), got {tuple(out.shape)}")
        return out.float()

    def _judge_scores(self, prompt_texts, texts) -> Optional[torch.Tensor]:
        """judge_reward_weight * judge_reward(prompts, answers), (batch,) on the trainer's device; None when off."""
        weight = self.config.judge_reward_weight
        if self.judge_reward is None or not weight:
            return None
        out = torch.as_tensor(self.judge_reward(list(prompt_texts), list(texts))).float()
        if out.shape != (len(texts),):
            raise TypeError(f"judge_reward must return one value per answer, shape ({len(texts)},), "
                            f"got {tuple(out.shape)}")
        return (weight * out).to(self.device)

    def _retokenise_for_reward(self, prompts, texts):
        """The reward model's own chat format around the decoded answer (a different vocabulary)."""
        tok = self.reward_tokenizer
        rendered = []
        for prompt, answer in zip(prompts, texts):
            messages = to_messages(prompt, self.config.system_prompt) + [{"role": "assistant", "content": answer}]
            if getattr(tok, "chat_template", None):
                rendered.append(tok.apply_chat_template(messages, tokenize=False))
            else:
                rendered.append("".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages))
        tok.truncation_side = "left"  # keep the answer, lose the prompt's start if too long
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(rendered, return_tensors="pt", padding=True, truncation=True,
                  max_length=self.config.reward_max_tokens, add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"]

    def _token_values(self, input_ids, attention_mask, prompt_width, response_len) -> torch.Tensor:
        """Values aligned with answer tokens: column P-1+t for token t. (batch, R)"""
        if hasattr(self.value_model, "token_scores"):
            per_position = self.value_model.token_scores(input_ids, attention_mask)
        else:
            per_position = self.value_model(input_ids, attention_mask)
            per_position = getattr(per_position, "logits", per_position)
            if per_position.dim() == 3 and per_position.shape[-1] == 1:
                per_position = per_position.squeeze(-1)
            if per_position.dim() != 2:
                raise TypeError("the value model must return one value per token (batch, seq); a model that "
                                "scores only the last token cannot give per-token values for GAE. Use "
                                "src.models.ValueModel (ValueModel.from_causal_lm(policy)).")
        return per_position[:, prompt_width - 1:prompt_width - 1 + response_len].float()

    # -- rollout -----------------------------------------------------------------------------
    def rollout(self, prompts: Sequence, max_new_tokens: int = 150, temperature: float = 1.0) -> Rollout:
        """Sample answers and score them: one batched forward per model, under inference_mode."""
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                   do_sample=True, batch_size=len(prompts),
                                   max_prompt_tokens=self.config.max_prompt_tokens,
                                   system_prompt=self.config.system_prompt)
        # one generation batch = one log-prob forward of the policy inside `generate`
        out = generate(self.policy, self.tokenizer, list(prompts), gen_cfg, return_logprobs=True)
        P, R = out.prompt_ids.shape[1], out.response_ids.shape[1]
        ids, attn = out.input_ids, out.attention_mask
        self.policy.eval()
        self.value_model.eval()
        with torch.inference_mode():
            values = self._token_values(ids, attn, P, R)
            ref_logprobs, scores = self._ref_and_scores(ids, attn, R, temperature, list(prompts), out.texts)
            judge = self._judge_scores(list(prompts), out.texts)  # added to `scores` in `total_scores`
        mask = out.response_mask.float()
        # clone outside inference mode: inference tensors cannot be saved for backward later
        return Rollout(input_ids=ids.clone(), attention_mask=attn.clone(), prompt_width=P, mask=mask.clone(),
                       finished=out.finished.clone(), logprobs=(out.logprobs * mask).clone(),
                       ref_logprobs=(ref_logprobs * mask).clone(), values=(values * mask).clone(),
                       scores=scores.clone(), texts=out.texts, prompt_texts=out.prompt_texts,
                       judge_scores=judge.clone() if judge is not None else None)

    def normalise_scores(self, scores: torch.Tensor, finished: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        """Raw scores -> whitened scores (running or the reward model's saved stats), clip, missing-eos penalty."""
        mode = self.config.reward_normalization
        model_stats = getattr(self.reward_model, "reward_stats", None)
        if mode == "auto":
            mode = "model" if model_stats else "running"
        if mode == "model":
            if not model_stats:
                raise ValueError("reward_normalization='model' but the reward model has no saved reward_stats")
            mean, std = model_stats
            scores = (scores - mean) / max(std, 1e-8)
        elif mode == "running":
            if update_stats:  # with every rank's scores, so the statistics stay equal across ranks
                self.reward_stats.update(ddp.all_gather_cat(scores))
            scores = self.reward_stats.normalize(scores)
        if self.config.score_clip is not None:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~finished.bool()).to(scores.dtype)
        return scores

    def compute_token_rewards(self, rollout: Rollout, scores: torch.Tensor):
        """Per-token rewards: -beta * KL_t everywhere, + score at the last real token. (batch, R)"""
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.config.kl_estimator) * rollout.mask
        rewards = -self.kl_ctl.value * kl
        last = (rollout.mask.sum(1).long() - 1).clamp(min=0)  # answers are right-padded
        rewards[torch.arange(len(last)), last] += scores
        if self.config.whiten_rewards:
            rewards = masked_whiten(rewards, rollout.mask, shift_mean=False)
        return rewards, kl

    # -- the step ----------------------------------------------------------------------------
    def train_step(self, prompts: Sequence, num_epochs_per_batch: int = 4, max_length: int = 150,
                   temperature: float = 1.0) -> Dict[str, float]:
        """One PPO iteration on `prompts` (a batch). `max_length` = max new tokens per answer."""
        cfg = self.config
        t0 = time.perf_counter()
        rollout = self.rollout(prompts, max_new_tokens=max_length, temperature=temperature)
        t_rollout = time.perf_counter() - t0
        mask = rollout.mask
        batch = mask.shape[0]

        # rewards, GAE (no gradients anywhere here)
        scores = self.normalise_scores(rollout.total_scores, rollout.finished)  # RM score + judge term
        rewards, kl = self.compute_token_rewards(rollout, scores)
        advantages, returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
        raw_advantage_mean = masked_mean(advantages, mask).item()
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        rollout_finite = ddp.all_true(all(torch.isfinite(t).all() for t in (rewards, advantages, returns)))

        # update epochs over shuffled mini-batches
        self.policy.train()
        self.value_model.train()
        acc, skipped, epochs_done = self._update_epochs(
            batch, num_epochs_per_batch, rollout_finite,
            lambda idx: self._update_minibatch(rollout, idx, advantages[idx], returns[idx], temperature))
        self.policy.eval()
        self.value_model.eval()

        beta_used, kl_per_answer = self._close_update(rollout, mask, batch)
        self._maybe_update_reference(self.step + 1)

        mean = lambda k: float(sum(acc[k]) / len(acc[k])) if acc.get(k) else float("nan")  # noqa: E731
        stats = {
            "step": self.step + 1,
            "policy_loss": mean("policy_loss"),
            "value_loss": mean("value_loss"),
            "kl_divergence": kl_per_answer.mean().item(),   # nats per answer, k1, rollout vs reference
            "kl_per_token": masked_mean(kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1"), mask).item(),
            "mean_reward": (scores - beta_used * (kl * mask).sum(1)).mean().item(),  # score - beta*KL, per answer
            "mean_score": rollout.scores.mean().item(),      # raw reward-model score
            **self._judge_metrics(rollout),                  # judge_reward, when the hook is on
            "mean_normalized_score": scores.mean().item(),   # of RM score + judge term
            "mean_advantage": raw_advantage_mean,
            "approx_kl": mean("approx_kl"),
            "clipfrac": mean("clipfrac"),
            "value_clipfrac": mean("vf_clipfrac"),
            "ratio_mean": mean("ratio_mean"),
            "ratio_max": max(acc.get("ratio_max", [float("nan")])),
            "ratio_min": min(acc.get("ratio_min", [float("nan")])),
            "entropy": mean("entropy"),
            "explained_variance": explained_variance(rollout.values, returns, mask),
            "policy_grad_norm": mean("policy_grad_norm"),
            "value_grad_norm": mean("value_grad_norm"),
            **self._step_bookkeeping(rollout, beta_used, epochs_done, skipped, t_rollout, t0),
        }
        return self._record_step(stats, rollout, skipped)

    @staticmethod
    def _judge_metrics(rollout: Rollout) -> Dict[str, float]:
        """`judge_reward`: mean weighted judge term of the rollout (logged only when the hook is on)."""
        if rollout.judge_scores is None:
            return {}
        return {"judge_reward": rollout.judge_scores.mean().item()}

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
                       update: Callable[[torch.Tensor], Optional[Dict[str, float]]]):
        """`num_epochs` passes over the rollout in shuffled mini-batches; `update(idx)` takes one
        gradient step and returns its metrics, or None when it skipped a non-finite update. Stops
        early once approx KL(old || new) passes `early_stop_kl`. A non-finite rollout trains nothing.
        Returns (metric name -> values, skipped updates, epochs done)."""
        cfg = self.config
        acc: Dict[str, List[float]] = {}
        if not rollout_finite:
            log.warning("step %d: non-finite rewards/advantages in the rollout; skipping the update", self.step + 1)
            return acc, 1, 0
        mb_size = min(cfg.mini_batch_size or batch, batch)
        skipped = epochs_done = 0
        for _ in range(num_epochs):
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

    @property
    def algorithm(self) -> str:
        """ppo, or the policy-gradient config's grpo | rloo | reinforce (progress bar, checkpoint metadata)."""
        return getattr(self.config, "algorithm", "ppo")

    def _record_step(self, stats: Dict[str, Any], rollout: Rollout, skipped: int) -> Dict[str, Any]:
        """Keep the step's metrics, then the loop's end of step: schedules, counters, bad-step policy."""
        self.history.append(stats)
        self.last_rollout = rollout
        return self.loop.end_step(stats, skipped)

    def _update_minibatch(self, rollout: Rollout, idx, advantages, returns, temperature) -> Optional[Dict[str, float]]:
        """One gradient step on policy and value. Returns None (and changes nothing) if not finite."""
        cfg = self.config
        P, R = rollout.prompt_width, rollout.mask.shape[1]
        ids, attn, mask = rollout.input_ids[idx], rollout.attention_mask[idx], rollout.mask[idx]
        old_logprobs, ref_logprobs, old_values = rollout.logprobs[idx], rollout.ref_logprobs[idx], rollout.values[idx]

        new_logprobs, entropy = sequence_logprobs(self.policy, ids, attn, R, temperature, return_entropy=True,
                                                  entropy_grad=bool(cfg.entropy_coef))
        pg_loss, metrics = ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cfg.clip_epsilon)
        entropy_mean = masked_mean(entropy if cfg.entropy_coef else entropy.detach(), mask)
        policy_loss = pg_loss - cfg.entropy_coef * entropy_mean
        if cfg.conservative_kl_coef:
            kl_ref = masked_mean(kl_penalty(new_logprobs, ref_logprobs, "k3"), mask)
            policy_loss = policy_loss + conservative_kl_penalty(kl_ref, cfg.conservative_kl_threshold,
                                                                cfg.conservative_kl_coef)
        values = self._token_values(ids, attn, P, R)
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

    def _maybe_update_reference(self, step: int) -> None:
        cfg = self.config
        if cfg.ref_update == "none" or step % cfg.ref_update_every:
            return
        update_reference(self.ref_model, self.policy, cfg.ref_update, cfg.ref_ema_alpha)

    # -- the loop ----------------------------------------------------------------------------
    def train(self, prompts: Sequence, num_steps: int = 100, batch_size: int = 4, num_epochs_per_batch: int = 4,
              max_length: int = 150, temperature: float = 1.0, checkpoint_dir=None, checkpoint_freq: int = 10,
              resume_from=None, show_progress: bool = True) -> Dict[str, Any]:
        """Run PPO until `num_steps` total steps; returns {"final_stats": {...}, "history": [...]}.

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
        if ddp.world_size() > 1:  # ranks sample different answers (docs/distributed.md: seeding rule)
            torch.manual_seed(ddp.sampling_seed(self.config.seed + self.step))

        def step() -> Dict[str, float]:
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
        return {
            "history": self.history,
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "policy_scheduler": self.policy_scheduler.state_dict() if self.policy_scheduler else None,
            "value_scheduler": self.value_scheduler.state_dict() if self.value_scheduler else None,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_stats": self.reward_stats.state_dict(),
            "sampler": self.sampler.get_state(),
        }

    def save_checkpoint(self, checkpoint_dir, step: Optional[int] = None) -> Path:
        """`<checkpoint_dir>/checkpoint-<step>`: policy/ and value/ (HF format + tokenizer), optimisers,
        schedulers, KL controller, running stats, sampler, history, RNG states."""
        models = {"policy": self.policy, "value": self.value_model}  # a plain nn.Module rides in the state
        if self.config.ref_update != "none":
            models["reference"] = self.ref_model  # it moves: needed for an exact resume
        return self.loop.save(checkpoint_dir, models, self.tokenizer, self._trainer_state(),
                              metadata={"trainer": self.algorithm, "config": asdict(self.config)}, step=step)

    def load_checkpoint(self, checkpoint_path) -> int:
        """Restore everything `save_checkpoint` wrote (models in place, RNG states included); returns the step."""
        loaded = self.loop.resume(checkpoint_path)
        state = loaded.trainer_state
        named = {"policy": self.policy, "value": self.value_model}
        if (loaded.path / "reference").is_dir() or "reference" in state.get("module_states", {}):
            named["reference"] = self.ref_model
        load_models(loaded, named)
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        for scheduler, key in ((self.policy_scheduler, "policy_scheduler"), (self.value_scheduler, "value_scheduler")):
            if scheduler is not None and state.get(key) is not None:
                scheduler.load_state_dict(state[key])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.sampler.set_state(state["sampler"])
        self.history = list(state["history"])
        return self.step

    # -- the guide's helper API --------------------------------------------------------------
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

    def compute_kl_divergence(self, current_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean per-token KL(current || reference) estimate (the configured estimator); 0 if identical."""
        kl = kl_penalty(current_logprobs, reference_logprobs, self.config.kl_estimator)
        return masked_mean(kl, mask if mask is not None else torch.ones_like(kl))

    def compute_ppo_loss(self, old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clipped surrogate loss (to minimise). Metrics of the last call are in `self.last_loss_metrics`."""
        mask = mask if mask is not None else torch.ones_like(new_logprobs)
        loss, self.last_loss_metrics = ppo_policy_loss(new_logprobs, old_logprobs.detach(), advantages.detach(),
                                                       mask, self.config.clip_epsilon)
        return loss

    def generate_responses(self, prompts: Sequence, max_length: int = 150, temperature: float = 1.0):
        """(answer texts, log-probs (batch, R) of the sampled tokens, padding 0)."""
        cfg = GenerationConfig(max_new_tokens=max_length, temperature=temperature, top_p=1.0, top_k=0,
                               batch_size=max(1, len(prompts)), max_prompt_tokens=self.config.max_prompt_tokens,
                               system_prompt=self.config.system_prompt)
        out = generate(self.policy, self.tokenizer, list(prompts), cfg, return_logprobs=True)
        return out.texts, out.logprobs

    def _encode(self, prompts: Sequence, responses: Union[Sequence[str], GenerationOutput]):
        """Token batch for (prompt, answer-text) pairs; a text answer is taken as finished (end-of-turn appended)."""
        if isinstance(responses, GenerationOutput):
            return responses.input_ids, responses.attention_mask, responses.prompt_ids.shape[1], \
                responses.response_mask.float(), responses.texts
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        cfg = GenerationConfig(max_prompt_tokens=self.config.max_prompt_tokens, system_prompt=self.config.system_prompt)
        p_ids, p_mask, _ = tokenize_prompts(self.tokenizer, list(prompts), cfg, self.device)
        r_ids, r_mask = encode_answers(self.tokenizer, responses, device=self.device)
        return (torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], r_mask.float(),
                list(responses))

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
    def compute_values(self, prompts, responses) -> torch.Tensor:
        """Value of the state before each answer token. (batch, R), padding 0."""
        ids, attn, P, mask, _ = self._encode(prompts, responses)
        return self._token_values(ids, attn, P, mask.shape[1]) * mask

    @torch.no_grad()
    def compute_rewards(self, prompts, responses) -> torch.Tensor:
        """Raw reward-model score of each (prompt, answer). (batch,)"""
        ids, attn, _, _, texts = self._encode(prompts, responses)
        return self._score(ids.to(_device_of(self.reward_model)), attn.to(_device_of(self.reward_model)),
                           list(prompts), texts).to(self.device)


__all__ = ["PPOConfig", "PPOTrainer", "PPOTrainingError", "Rollout", "disable_dropout"]
