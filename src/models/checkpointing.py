"""Gradient (activation) checkpointing: recompute each layer's activations in the backward pass
instead of keeping them, about a third more compute for much less activation memory."""
from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn it on for an HF model (or a ScalarHeadModel's inner one), non-reentrant: that variant also
    works when the embeddings are frozen (LoRA) and with inputs that do not require grad."""
    if not hasattr(model, "gradient_checkpointing_enable"):  # a ScalarHeadModel: its inner HF model
        model = getattr(model, "model", model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} does not support gradient checkpointing")


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether any layer recomputes its activations during backward (outside the forward's context)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


__all__ = ["enable_gradient_checkpointing", "uses_gradient_checkpointing"]
