"""An int8 copy of a causal LM for sampling-only work on CPU (evaluation, data generation).

Decoding a few sequences at a time on a CPU is bound by reading the weights, not by arithmetic:
each new token reads every Linear weight once. Dynamic int8 quantization of the Linear layers
(weights stored as int8, activations quantised on the fly, fbgemm kernels) reads 4x fewer bytes
and roughly doubles batch-8 decoding speed on a 2-core x86 machine (docs/performance.md).

The copy is approximate: its greedy answers are not the fp32 model's. Use it where answers are only
read (evaluation, critique/revision sampling), never where log-probs or gradients of the trained
model are needed (the RL rollout's ratio would be off-policy).
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


def int8_sampling_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with its Linear layers dynamically quantised to int8 (CPU only).

    On other devices the model is returned unchanged (use bf16 there)."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        log.info("int8 sampling copies are for CPU; using the %s model as it is", device.type)
        return model
    with warnings.catch_warnings():
        # torch.ao's eager quantization is marked for migration to torchao; it is what ships with torch
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).float().eval(), {nn.Linear},
                                                           dtype=torch.qint8)
    return quantized.requires_grad_(False)
