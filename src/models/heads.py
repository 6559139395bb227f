"""Scalar-head models: the reward model (one score per sequence) and the value model (one per token).

Both wrap a plain `AutoModelForSequenceClassification` with `num_labels=1`, the ecosystem's
convention, so a saved reward model opens in transformers, TRL or vLLM without this code.
We compute the scores ourselves instead of calling the HF head's forward because HF picks the
"last non-pad token" by comparing ids with `pad_token_id`; with SmolLM2 the pad token *is* the
end-of-turn token, so HF would silently score the token before it. The attention mask is the truth.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .attention import attention_for
from .device import resolve_device, resolve_dtype
from .loading import resolve_model_path
from .precision import autocast


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, matching what `generate` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, under left or right padding. (batch,)"""
    seq_len = attention_mask.shape[-1]
    positions = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values.clamp(min=0)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer trunk (no LM or score head) of an HF model or a ScalarHeadModel."""
    inner = getattr(model, "model", model) if isinstance(model, ScalarHeadModel) else model
    prefix = getattr(inner, "base_model_prefix", None)
    return getattr(inner, prefix) if prefix and hasattr(inner, prefix) else inner


def score_head(model: nn.Module) -> nn.Module:
    """The linear scalar head of an HF sequence-classification model or a ScalarHeadModel."""
    model = getattr(model, "model", model) if isinstance(model, ScalarHeadModel) else model
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no scalar head named score/classifier")


def head_scores(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states, in fp32 outside any autocast (a 1-output matmul costs
    nothing, and bf16 would round rewards and values to 3 significant digits). (batch, seq)"""
    head = score_head(model)
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def _keep_config_layers(config, num_layers: int) -> None:
    """A model config describing only its bottom `num_layers` decoder layers (per-layer lists, such as
    `layer_types` in some configs, shrink with the count)."""
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]


class ScalarHeadModel(nn.Module):
    """Backbone + linear head giving one scalar per token; subclasses choose which tokens matter."""

    per_token: bool = False

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a scalar head needs num_labels=1, got {model.config.num_labels}")
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def keep_bottom_layers(self, num_layers: Optional[int]) -> "ScalarHeadModel":
        """Keep only the bottom `num_layers` decoder layers (in place; embeddings, final norm and head
        stay). None, 0 or at least the current depth: unchanged. The result is still a plain HF model
        (config.num_hidden_layers follows), so it saves, loads and checkpoints like any other.
        Returns self."""
        backbone = backbone_of(self)
        layers = getattr(backbone, "layers", None)
        if not num_layers or layers is None or num_layers >= len(layers):
            if num_layers and layers is None:
                raise TypeError(f"{type(backbone).__name__} has no `layers` list to truncate")
            return self
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0 (0: all layers), got {num_layers}")
        backbone.layers = nn.ModuleList(list(layers)[:num_layers])
        _keep_config_layers(self.config, num_layers)
        return self

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar at every position. (batch, seq)"""
        with autocast(input_ids.device), attention_for(self.model, input_ids):
            hidden = backbone_of(self.model)(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state
        return head_scores(self.model, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        scores = self.token_scores(input_ids, attention_mask)
        if self.per_token:
            return scores
        return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    # -- persistence: plain HF directories ---------------------------------------------------
    def save_pretrained(self, path: Union[str, os.PathLike], tokenizer=None, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device=None, dtype=None):
        """Load a scalar model saved by `save_pretrained` (or any HF sequence-classification dir)."""
        from transformers import AutoModelForSequenceClassification

        device = resolve_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(
            Path(path), num_labels=1, dtype=resolve_dtype(device, dtype))
        return cls(model).to(device)

    @classmethod
    def from_causal_lm(cls, base: Union[str, os.PathLike, nn.Module, None], device=None, dtype=None,
                       head_init_std: Optional[float] = None, pad_token_id: Optional[int] = None,
                       keep_layers: Optional[int] = None):
        """A fresh scalar head on the backbone of a causal LM (a loaded model, a path, or "default").

        The backbone weights are copied, never shared, so training the head model leaves the
        policy untouched. The head starts near zero so early values/rewards are small.
        `keep_layers=k`: only the bottom k decoder layers (`keep_bottom_layers`; None/0: all).
        """
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        device = resolve_device(device)
        if isinstance(base, nn.Module):
            lm = base
        else:
            lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32)
        config = lm.config.__class__.from_dict(lm.config.to_dict())
        config.num_labels = 1
        config.problem_type = "regression"
        if keep_layers is not None and keep_layers < 0:
            raise ValueError(f"keep_layers must be >= 0 (0 or None: all layers), got {keep_layers}")
        depth = getattr(config, "num_hidden_layers", None)
        if keep_layers and depth is not None and keep_layers < depth:  # build (and copy) only the kept layers
            _keep_config_layers(config, keep_layers)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        prefix = model.base_model_prefix
        backbone_state = getattr(lm, prefix).state_dict()
        if config.num_hidden_layers != depth:  # drop the layers above keep_layers
            wanted = getattr(model, prefix).state_dict().keys()
            backbone_state = {k: v for k, v in backbone_state.items() if k in wanted}
        getattr(model, prefix).load_state_dict(backbone_state)
        head = score_head(model)
        std = head_init_std if head_init_std is not None else 1.0 / (config.hidden_size + 1) ** 0.5
        with torch.no_grad():
            nn.init.normal_(head.weight, std=std)
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        return cls(model).to(device=device, dtype=resolve_dtype(device, dtype))


class RewardModel(ScalarHeadModel):
    """Score at the last real token. (batch,)

    Normalisation statistics (mean/std over a reference set) travel in config.json as
    `reward_mean`/`reward_std`, so PPO can whiten rewards with the numbers the trainer measured.
    """

    per_token = False

    @property
    def reward_stats(self) -> Optional[tuple]:
        mean, std = getattr(self.config, "reward_mean", None), getattr(self.config, "reward_std", None)
        return None if mean is None or std is None else (float(mean), float(std))

    def set_reward_stats(self, mean: float, std: float) -> None:
        self.config.reward_mean = float(mean)
        self.config.reward_std = float(std)


class ValueModel(ScalarHeadModel):
    """Value estimate at every token. (batch, seq)"""

    per_token = True
