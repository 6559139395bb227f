"""The rollout side of online RL, shared by PPO (with a critic) and GRPO/RLOO/REINFORCE (without).

A trainer holds these as components; none of them knows about a value model or a loss:

  FrozenReference   the frozen reference policy in its three modes: a separate frozen model (a copy of
                    the initial policy by default; it may move by "copy"/"ema" updates), the policy
                    itself with its LoRA adapters off, or the reward model's backbone plus the policy's
                    initial LM head (`share_reward_and_reference`: one frozen forward gives both);
  RewardScorer      the reward model's score at the last real token (re-tokenised from the decoded
                    text when it reads another vocabulary), the optional judge term, and normalisation
                    (running or the reward model's saved statistics, clip, missing-eos penalty);
  RolloutCollector  samples answers through `generation.generate` (which also gives the old policy's
                    log-probs through the one log-prob path), then ONE batched forward per frozen model
                    under inference_mode, into a `Rollout`; the trainer's critic, if it has one, is a
                    `values` callback;
  kl_shaped_rewards r_t = -beta * KL_t at every answer token, + the score at the last one.

Token alignment: with prompt width P (left-padded) and answer width R (right-padded), answer token t
sits at column P + t and is *predicted* at column P - 1 + t.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from src.models.attention import attention_for
from src.models.heads import ScalarHeadModel, backbone_of, head_scores, last_token_index, position_ids_from_mask
from src.models.lora import adapters_disabled
from src.models.precision import autocast

from ..common import distributed as ddp
from ..training.generation import (GenerationConfig, GenerationOutput, encode_answers, encode_prompt_answers, generate, left_pad,
                                   tokenize_prompts)
from ..training.logprobs import selective_log_softmax, sequence_logprobs
from .primitives import RunningMeanStd, kl_penalty, masked_whiten, update_reference

log = logging.getLogger(__name__)

# values(input_ids, attention_mask, prompt_width, response_len) -> (batch, R): a critic's per-token values
ValuesFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class Rollout:
    """One batch of experience. Token tensors are (batch, R); R = answer width of the batch."""

    input_ids: torch.Tensor        # (batch, P + R) prompt left-padded + answer right-padded
    attention_mask: torch.Tensor   # (batch, P + R)
    prompt_width: int              # P
    mask: torch.Tensor             # (batch, R) float, 1 on answer tokens incl. end-of-turn
    finished: torch.Tensor         # (batch,) bool, ended with end-of-turn
    logprobs: torch.Tensor         # (batch, R) policy at sampling time (the "old" policy); PPO may fill it in later
    ref_logprobs: torch.Tensor     # (batch, R)
    values: Optional[torch.Tensor]  # (batch, R) value of the state that predicts each token; None without a critic
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


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


# -- the reward ------------------------------------------------------------------------------------

class RewardScorer:
    """The frozen reward model's raw score, the judge term, and score normalisation.

    `config` is read for: system_prompt, reward_max_tokens, reward_normalization, score_clip,
    missing_eos_penalty, judge_reward_weight. `stats` is the running mean/std (checkpointed).
    """

    def __init__(self, reward_model: nn.Module, config, device: torch.device, reward_tokenizer=None,
                 judge_reward: Optional[Callable[[List[str], List[str]], Any]] = None,
                 frozen_device: Optional[torch.device] = None):
        self.config, self.device = config, device
        self.reward_model = reward_model.to(frozen_device or device)
        self.reward_model.requires_grad_(False).eval()
        self.reward_tokenizer = reward_tokenizer
        self.judge_reward = judge_reward
        self.stats = RunningMeanStd()
        if judge_reward is not None and not config.judge_reward_weight:
            log.warning("a judge_reward hook was given but judge_reward_weight is 0: the judge term is off")
        elif judge_reward is None and config.judge_reward_weight:
            log.warning("judge_reward_weight=%s but no judge_reward hook was given: the judge term is off",
                        config.judge_reward_weight)

    def check_vocab(self, policy: nn.Module) -> None:
        """Without a reward tokenizer the reward model reads the policy's token ids: same vocabulary."""
        if self.reward_tokenizer is not None:
            return
        policy_vocab, reward_vocab = _vocab_size(policy), _vocab_size(self.reward_model)
        if policy_vocab is not None and reward_vocab is not None and policy_vocab != reward_vocab:
            raise ValueError(
                f"the reward model's vocabulary ({reward_vocab} tokens) differs from the policy's "
                f"({policy_vocab}): pass reward_tokenizer=<the reward model's tokenizer> so answers are "
                "re-tokenised for it")

    def score(self, ids, mask, prompt_texts, texts) -> torch.Tensor:
        """Raw score of each (prompt, answer), (batch,), on the reward model's device."""
        if self.reward_tokenizer is not None:
            ids, mask = self.retokenise(prompt_texts, texts)
        out = self.reward_model(ids.to(device_of(self.reward_model)), mask.to(device_of(self.reward_model)))
        out = getattr(out, "logits", out)
        if out.dim() == 2 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        if out.dim() != 1:
            raise TypeError(f"the reward model must return one score per sequence (batch,), got {tuple(out.shape)}")
        return out.float()

    def retokenise(self, prompts, texts):
        """The decoded answers in the reward model's own chat format and vocabulary, laid out as reward
        training lays them out (`encode_prompt_answers`: ends at end-of-turn; the prompt's start is
        cut first when longer than reward_max_tokens)."""
        tok = self.reward_tokenizer
        encoded = [encode_prompt_answers(tok, prompt, [answer], self.config.reward_max_tokens,
                                         system_prompt=self.config.system_prompt)[0][0]
                   for prompt, answer in zip(prompts, texts)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return left_pad(encoded, pad)

    def judge_scores(self, prompt_texts, texts) -> Optional[torch.Tensor]:
        """judge_reward_weight * judge_reward(prompts, answers), (batch,) on the trainer's device; None when off."""
        weight = self.config.judge_reward_weight
        if self.judge_reward is None or not weight:
            return None
        out = torch.as_tensor(self.judge_reward(list(prompt_texts), list(texts))).float()
        if out.shape != (len(texts),):
            raise TypeError(f"judge_reward must return one value per answer, shape ({len(texts)},), "
                            f"got {tuple(out.shape)}")
        return (weight * out).to(self.device)

    def normalise(self, scores: torch.Tensor, finished: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        """Raw scores -> whitened scores (running or the reward model's saved stats), clip, missing-eos penalty."""
        cfg = self.config
        mode = cfg.reward_normalization
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
                self.stats.update(ddp.all_gather_cat(scores))
            scores = self.stats.normalize(scores)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~finished.bool()).to(scores.dtype)
        return scores


# -- the reference -----------------------------------------------------------------------------------

class FrozenReference:
    """The frozen reference policy: frozen, eval mode, never in an optimiser, built once before any update.

    Modes (`mode`): "model" (a separate model: `ref_model`, default a deep copy of the policy),
    "lora" (the policy with its adapters off: no copy), "shared" (the reward model's backbone + the
    policy's initial LM head: `scorer`'s forward gives reference log-probs and scores at once).
    `config` is read for: share_reward_and_reference, lora_r, ref_update, ref_update_every, ref_ema_alpha.
    Build it after LoRA adapters were added to the policy.
    """

    def __init__(self, policy: nn.Module, scorer: RewardScorer, config, ref_model: Optional[nn.Module] = None,
                 frozen_device: Optional[torch.device] = None):
        self.policy, self.scorer, self.config = policy, scorer, config
        self.lm_head = None
        if config.share_reward_and_reference:
            if ref_model is not None:
                raise ValueError("give either ref_model or share_reward_and_reference=True, not both")
            self.mode, self.model = "shared", None
            self.lm_head = self._build_shared_head()
        elif config.lora_r and ref_model is None:
            self.mode, self.model = "lora", None
        else:
            self.mode = "model"
            self.model = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.model.to(frozen_device or device_of(policy)).requires_grad_(False).eval()

    def _build_shared_head(self) -> nn.Module:
        """Reference = the reward model's backbone + the policy's initial LM head (no deep copy).

        Valid only when that backbone *is* the initial policy's (a reward model trained head-only
        on the same base), which is checked tensor by tensor.
        """
        reward_model = self.scorer.reward_model
        if self.scorer.reward_tokenizer is not None or not isinstance(reward_model, ScalarHeadModel):
            raise ValueError("share_reward_and_reference needs a RewardModel on the policy's own tokenizer")
        reward_backbone, policy_backbone = backbone_of(reward_model), backbone_of(self.policy)
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
        frozen = copy.deepcopy(head).to(device_of(reward_model))
        return frozen.requires_grad_(False)

    def logprobs_and_scores(self, input_ids, attention_mask, response_len, temperature, prompt_texts, texts,
                            device: torch.device):
        """Reference log-probs (batch, R) and raw reward scores (batch,) on `device`, one forward per frozen model."""
        reward_model = self.scorer.reward_model
        frozen_device = device_of(reward_model)
        ids, mask = input_ids.to(frozen_device), attention_mask.to(frozen_device)
        if self.mode == "shared":
            with autocast(frozen_device), attention_for(reward_model, ids):
                hidden = backbone_of(reward_model)(input_ids=ids, attention_mask=mask,
                                                   position_ids=position_ids_from_mask(mask),
                                                   use_cache=False).last_hidden_state
                # the head in the same precision as `lm_logits` gives the policy's log-probs
                logits = nn.functional.linear(hidden[:, -response_len - 1:-1], self.lm_head.weight,
                                              getattr(self.lm_head, "bias", None)).float()
            ref_logprobs = selective_log_softmax(logits / temperature, ids[:, -response_len:])
            token_scores = head_scores(reward_model, hidden)
            scores = token_scores.gather(1, last_token_index(mask)[:, None]).squeeze(1)
        elif self.mode == "lora":  # the reference is the policy's base weights
            with adapters_disabled(self.policy):
                ref_logprobs = sequence_logprobs(self.policy, input_ids, attention_mask, response_len, temperature)
            scores = self.scorer.score(ids, mask, prompt_texts, texts)
        else:
            ref_logprobs = sequence_logprobs(self.model, ids.to(device_of(self.model)),
                                             mask.to(device_of(self.model)), response_len, temperature)
            scores = self.scorer.score(ids, mask, prompt_texts, texts)
        return ref_logprobs.to(device), scores.to(device)

    @property
    def moves(self) -> bool:
        """Whether the reference changes during training (then it is checkpointed)."""
        return self.config.ref_update != "none"

    def maybe_update(self, step: int) -> None:
        """After step `step`: "copy" or "ema" the policy into the reference every `ref_update_every` steps."""
        cfg = self.config
        if cfg.ref_update == "none" or step % cfg.ref_update_every:
            return
        update_reference(self.model, self.policy, cfg.ref_update, cfg.ref_ema_alpha)


# -- the rollout -------------------------------------------------------------------------------------

class RolloutCollector:
    """Generation of the rollout batch and its frozen forwards. `config` is read for: max_prompt_tokens,
    system_prompt (and what `reference` and `scorer` read)."""

    def __init__(self, policy: nn.Module, tokenizer, config, device: torch.device, reference: FrozenReference,
                 scorer: RewardScorer):
        self.policy, self.tokenizer, self.config, self.device = policy, tokenizer, config, device
        self.reference, self.scorer = reference, scorer

    def collect(self, prompts: Sequence, max_new_tokens: int = 150, temperature: float = 1.0,
                values: Optional[ValuesFn] = None, policy_logprobs: bool = True) -> Rollout:
        """Sample answers and score them: one batched forward per model, under inference_mode.
        `values` (a critic, or None): per-token values for the rollout, computed first.
        `policy_logprobs=False`: no forward of the policy for the old log-probs (`Rollout.logprobs`
        is then None, for a trainer that takes them from its first update's forward)."""
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                   do_sample=True, batch_size=len(prompts),
                                   max_prompt_tokens=self.config.max_prompt_tokens,
                                   system_prompt=self.config.system_prompt)
        # one generation batch = one log-prob forward of the policy inside `generate`
        out = generate(self.policy, self.tokenizer, list(prompts), gen_cfg, return_logprobs=policy_logprobs)
        P, R = out.prompt_ids.shape[1], out.response_ids.shape[1]
        ids, attn = out.input_ids, out.attention_mask
        self.policy.eval()
        with torch.inference_mode():
            token_values = values(ids, attn, P, R) if values is not None else None
            ref_logprobs, scores = self.reference.logprobs_and_scores(ids, attn, R, temperature, list(prompts),
                                                                      out.texts, self.device)
            judge = self.scorer.judge_scores(list(prompts), out.texts)  # added to `scores` in `total_scores`
        mask = out.response_mask.float()
        # clone outside inference mode: inference tensors cannot be saved for backward later
        return Rollout(input_ids=ids.clone(), attention_mask=attn.clone(), prompt_width=P, mask=mask.clone(),
                       finished=out.finished.clone(),
                       logprobs=(out.logprobs * mask).clone() if out.logprobs is not None else None,
                       ref_logprobs=(ref_logprobs * mask).clone(),
                       values=(token_values * mask).clone() if token_values is not None else None,
                       scores=scores.clone(), texts=out.texts, prompt_texts=out.prompt_texts,
                       judge_scores=judge.clone() if judge is not None else None)

    # -- the guide's helper API: (prompt, answer) pairs given as text ------------------------------
    def generate_texts(self, prompts: Sequence, max_length: int = 150, temperature: float = 1.0):
        """(answer texts, log-probs (batch, R) of the sampled tokens, padding 0)."""
        cfg = GenerationConfig(max_new_tokens=max_length, temperature=temperature, top_p=1.0, top_k=0,
                               batch_size=max(1, len(prompts)), max_prompt_tokens=self.config.max_prompt_tokens,
                               system_prompt=self.config.system_prompt)
        out = generate(self.policy, self.tokenizer, list(prompts), cfg, return_logprobs=True)
        return out.texts, out.logprobs

    def encode(self, prompts: Sequence, responses: Union[Sequence[str], GenerationOutput]):
        """(input_ids, attention_mask, P, answer mask (batch, R) float, answer texts) for (prompt, answer)
        pairs; a text answer is taken as finished (end-of-turn appended)."""
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


def kl_shaped_rewards(rollout: Rollout, scores: torch.Tensor, beta: float, estimator: str = "k1",
                      whiten: bool = False):
    """Per-token rewards: -beta * KL_t everywhere, + score at the last real token. Returns
    (rewards, KL_t), each (batch, R); `whiten` rescales the rewards (mean kept), TRL's option."""
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator) * rollout.mask
    rewards = -beta * kl
    last = (rollout.mask.sum(1).long() - 1).clamp(min=0)  # answers are right-padded
    rewards[torch.arange(len(last)), last] += scores
    if whiten:
        rewards = masked_whiten(rewards, rollout.mask, shift_mean=False)
    return rewards, kl


__all__ = ["Rollout", "RewardScorer", "FrozenReference", "RolloutCollector", "kl_shaped_rewards",
           "disable_dropout", "device_of", "ValuesFn"]
