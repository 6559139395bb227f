"""LoRA adapters (Hu et al. 2021, via peft) for a policy trained with little memory.

`add_lora` injects adapters into the model *in place* (peft's `inject_adapter_in_model`): the model
keeps its class, so every path of the toolkit (log-probs, generation, checkpoints) works on it
unchanged, and only the adapter weights train. What that buys in PPO: no reference copy (the
reference is the same model with its adapters switched off, `adapters_disabled`), optimiser state
for the adapters only, and no weight gradients for the frozen matrices in the backward pass.
`merge_lora` folds the adapters into the weights for export as a plain Hugging Face model.

peft is imported only when LoRA is used (it takes seconds to import).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from torch import nn


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def add_lora(model: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Optional[List[str]] = None) -> nn.Module:
    """Inject rank-`r` adapters into `model` (default: every Linear but the LM head) and freeze
    everything else. Returns `model` itself. The adapters start at zero: outputs are unchanged."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_modules or "all-linear")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft names the modules it could not find
        raise ValueError(f"cannot add LoRA adapters to {type(model).__name__}: {exc}") from exc
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing as its base weights alone (the frozen reference of a LoRA policy)."""
    layers = [m for _, m in _lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # also makes the adapter weights trainable again


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back, in place; returns `model`.
    A no-op for a model without adapters."""
    if not has_lora(model):
        return model
    for name, layer in _lora_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


__all__ = ["add_lora", "adapters_disabled", "has_lora", "merge_lora"]
