"""Model loading (default model offline, any local HF directory) and scalar-head models."""
from .device import resolve_device, resolve_dtype, seed_everything
from .threads import adapt_threads, configure_threads
from .heads import (RewardModel, ScalarHeadModel, ValueModel, backbone_of, last_token_index,
                    position_ids_from_mask, score_head)
from .loading import (DEFAULT_MODEL, TINY_MODEL, provision_tiny_model, ModelNotFoundError, cache_dir, default_model_dir, load_causal_lm,
                      load_tokenizer, provision_default_model, resolve_model_path)
from .quantize import int8_sampling_copy
from .tiny import build_tiny_llama, save_tiny_llama

__all__ = [
    "DEFAULT_MODEL", "TINY_MODEL", "ModelNotFoundError", "RewardModel", "ScalarHeadModel", "ValueModel",
    "backbone_of", "score_head", "provision_tiny_model",
    "build_tiny_llama", "cache_dir", "int8_sampling_copy", "adapt_threads", "configure_threads", "default_model_dir", "last_token_index",
    "load_causal_lm", "load_tokenizer", "position_ids_from_mask", "provision_default_model",
    "resolve_device", "resolve_dtype", "resolve_model_path", "save_tiny_llama", "seed_everything",
]
