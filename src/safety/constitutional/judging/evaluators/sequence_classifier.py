"""Any local Hugging Face sequence-classification model as an evaluator: a reward model or a guard classifier.

    guard = SequenceClassifierEvaluator.load("path/to/guard", safe_labels=["safe"])
    ConstitutionalFramework(guard_model=guard)   # or guard_model="path/to/guard" + a `guard:` block

- One label (`num_labels=1`): a reward model, read exactly as `RewardModelEvaluator` reads one
  (score sigmoid((r - mean) / std) with the stats saved beside it, else mean 0 and std 1;
  comparison sigmoid(r_a - r_b)).
- Several labels: a guard classifier. Which labels mean "safe" (or "unsafe") is given by name, from
  the model's `config.id2label`, in code or in the constitution's `guard:` block. The score is
  P(safe) = sum of the softmax over the safe labels (or 1 - the sum over the unsafe ones; with both
  lists, safe / (safe + unsafe)). The model is wrapped so that it returns the log-odds
  r = logit(P(safe)) per answer, and the reward-model reading then gives score = sigmoid(r) = P(safe)
  and comparison sigmoid(logit(P_a) - logit(P_b)), symmetric by construction.

The input is the one the toolkit's reward models are trained and scored on
(`reward_scoring.reward_scores`): the prompt through the tokenizer's chat template (plain
"User: ...\nAssistant:" without one), then the answer and the end-of-turn token, truncated from
the left (the start of the prompt goes first), batched, without gradients. Decoder models (a `score`
head) are read at the last real token, as `RewardModel` reads them; encoder classifiers (BERT-like,
a `classifier` head) get their special tokens and right padding and use their own pooling.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import PrincipleScore, make_score
from .reward_model import RewardModelEvaluator

log = logging.getLogger(__name__)

_MAX_LOG_ODDS = 30.0  # P(safe) within 1e-13 of 0 or 1: keeps logit(1) - logit(1) from being inf - inf


def label_indices(config, labels: Optional[Sequence[str]], field: str) -> List[int]:
    """Indices of the named labels in `config.id2label`; raises naming the unknown ones and the known."""
    if not labels:
        return []
    by_name = {str(name): int(i) for i, name in config.id2label.items()}
    unknown = [label for label in labels if label not in by_name]
    if unknown:
        raise ValueError(f"guard {field}: label(s) {unknown} are not labels of this model; its config.id2label "
                         f"has {list(by_name)}")
    return [by_name[label] for label in labels]


def special_tokens_around(tokenizer) -> Tuple[List[int], List[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] / [SEP], <s> / </s>), found by
    encoding a probe with and without special tokens (works for every tokenizer class)."""
    bare = tokenizer("safe", add_special_tokens=False)["input_ids"]
    full = tokenizer("safe", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class SafeLogOdds(nn.Module):
    """A multi-label sequence classifier as a scalar model: logit(P(safe)) per sequence. (batch,)

    Takes left-padded (ids, mask) like `RewardModel`, so `reward_scoring.reward_scores` reads it unchanged."""

    reward_stats = None  # logit(P) is already centred on 0 (P = 0.5) with scale 1

    def __init__(self, model: nn.Module, tokenizer, safe: Sequence[int], unsafe: Sequence[int]):
        super().__init__()
        if not safe and not unsafe:
            raise ValueError("a guard classifier needs safe or unsafe label indices")
        self.model, self.tokenizer = model, tokenizer
        self.safe, self.unsafe = list(safe), list(unsafe)
        self.decoder = isinstance(getattr(model, "score", None), nn.Module)  # HF decoder classifiers' head
        self.prefix, self.suffix = ([], []) if self.decoder else special_tokens_around(tokenizer)

    @property
    def config(self):
        return self.model.config

    def label_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The classifier's logits per sequence, in fp32. (batch, num_labels)"""
        from src.models.attention import attention_for
        from src.models.heads import backbone_of, head_scores, last_token_index, position_ids_from_mask
        from src.models.precision import autocast

        if self.decoder:  # read at the last real token (HF would pick by pad id, wrong when pad == eos)
            with autocast(input_ids.device), attention_for(self.model, input_ids):
                hidden = backbone_of(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                                 position_ids=position_ids_from_mask(attention_mask),
                                                 use_cache=False).last_hidden_state
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
            return head_scores(self.model, last[:, None]).reshape(len(last), -1)
        # Encoder: its own special tokens ([CLS] ... [SEP]) and pooling, right-padded so positions start at 0.
        rows = [self.prefix + ids[mask.bool()].tolist() + self.suffix for ids, mask in zip(input_ids, attention_mask)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        with autocast(input_ids.device):
            return self.model(input_ids=ids.to(input_ids.device), attention_mask=mask.to(input_ids.device)).logits.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logp = torch.log_softmax(self.label_logits(input_ids, attention_mask), dim=-1)  # (batch, num_labels)
        log_safe = torch.logsumexp(logp[:, self.safe], dim=-1) if self.safe else None
        log_unsafe = torch.logsumexp(logp[:, self.unsafe], dim=-1) if self.unsafe else None
        if log_safe is None:
            log_safe = _log1mexp(log_unsafe)
        elif log_unsafe is None:
            log_unsafe = _log1mexp(log_safe)
        return (log_safe - log_unsafe).clamp(-_MAX_LOG_ODDS, _MAX_LOG_ODDS)


class SequenceClassifierEvaluator(RewardModelEvaluator):
    """A local sequence-classification model judging whole answers: a reward model (one label) or a
    guard classifier (several, mapped with `safe_labels` / `unsafe_labels`). Registered as "guard"."""

    name = "guard"
    weight = 2.0

    def __init__(self, model, tokenizer, safe_labels: Optional[Sequence[str]] = None,
                 unsafe_labels: Optional[Sequence[str]] = None, batch_size: int = 16,
                 max_length: Optional[int] = None, weight: Optional[float] = None):
        from src.models.heads import RewardModel, ScalarHeadModel

        num_labels = getattr(model.config, "num_labels", 1)
        self.labelled = num_labels > 1
        if not self.labelled:
            if safe_labels or unsafe_labels:
                log.warning("guard: the model has one label (a reward model); safe_labels/unsafe_labels are ignored")
            scalar = model if isinstance(model, ScalarHeadModel) else RewardModel(model)
        else:
            if not safe_labels and not unsafe_labels:
                raise ValueError(f"guard: the model has {num_labels} labels {list(model.config.id2label.values())}; "
                                 "say which mean safe or unsafe: safe_labels=[...] / unsafe_labels=[...], or a "
                                 "`guard: {safe_labels: [...]}` block in the constitution")
            scalar = SafeLogOdds(model, tokenizer, label_indices(model.config, safe_labels, "safe_labels"),
                                 label_indices(model.config, unsafe_labels, "unsafe_labels"))
            if not scalar.decoder and max_length is None:  # encoders: position limit, less their special tokens
                limit = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
                max_length = limit - len(scalar.prefix) - len(scalar.suffix)
        scalar.train(model.training)  # a new wrapper starts in training mode: keep the model's (dropout off)
        self.safe_labels, self.unsafe_labels = list(safe_labels or []), list(unsafe_labels or [])
        super().__init__(scalar, tokenizer, batch_size=batch_size, max_length=max_length, weight=weight)

    @classmethod
    def load(cls, path, device=None, dtype=None, **kwargs) -> "SequenceClassifierEvaluator":
        """Any local `AutoModelForSequenceClassification` folder (with its tokenizer), in eval mode."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from src.models import load_tokenizer, resolve_device, resolve_dtype, resolve_model_path
        from src.models.heads import RewardModel

        path, device = resolve_model_path(path), resolve_device(device)
        if getattr(AutoConfig.from_pretrained(path), "num_labels", 1) == 1:
            model = RewardModel.from_pretrained(path, device=device, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=resolve_dtype(device, dtype)).to(device)
        model.eval().requires_grad_(False)
        return cls(model, load_tokenizer(path), **kwargs)

    def rewards(self, prompts: Sequence, responses: Sequence[str]) -> List[float]:
        """Reward (one label) or logit(P(safe)) (several) per answer."""
        with torch.inference_mode():
            return super().rewards(prompts, responses)

    def score_batch(self, prompts, responses, principles, kinds=None) -> List[List[PrincipleScore]]:
        if not self.labelled:
            return super().score_batch(prompts, responses, principles, kinds)
        rows = []
        for r in self.rewards(prompts, responses):
            p_safe = 1.0 / (1.0 + math.exp(-r))
            rows.append([make_score(p_safe, f"guard P(safe)={p_safe:.2f}") for _ in principles])
        return rows
