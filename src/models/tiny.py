"""A tiny randomly initialised Llama with the real SmolLM2 tokenizer: for tests and smoke runs."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .device import seed_everything
from .loading import load_tokenizer


def build_tiny_llama(tokenizer=None, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """Returns (model, tokenizer); same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or load_tokenizer("default")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seed_everything(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_tiny_llama(path: Union[str, Path], **kwargs) -> Path:
    """Write the tiny model as a normal HF directory, so code paths that take a path can be tested."""
    model, tokenizer = build_tiny_llama(**kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
