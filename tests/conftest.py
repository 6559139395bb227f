"""Shared fixtures: the real tokenizer, a tiny random Llama built on it, and the real default model."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

from src.models import build_tiny_llama, configure_threads, load_causal_lm, load_tokenizer  # noqa: E402
from src.models.threads import available_cpus  # noqa: E402

# Tests compare numbers across code paths at fp32 tolerances, so they run in fp32 whatever the CPU;
# the bf16 path has its own tests (test_precision.py), which ask for it explicitly.
os.environ.setdefault("CAI_PRECISION", "fp32")
# A fixed thread count, never the adaptive default: many tests compare two runs bit for bit, and fp32
# reductions round differently at different thread counts (src/models/threads.py). CAI_NUM_THREADS=1 is
# much faster when other processes share the cores.
# The variable is set too, so that a script's main() run in-process (it calls configure_threads() with
# no number) keeps the fixed count instead of turning adaptive threads on for the rest of the session
# (which made a bit-exact resume test fail on a busy machine), and subprocesses inherit it.
THREADS = int(os.environ.get("CAI_NUM_THREADS", "").strip() or 0) or available_cpus()
os.environ["CAI_NUM_THREADS"] = str(THREADS)
configure_threads(THREADS)


def kill_at_step(trainer, step: int) -> None:
    """Make `trainer.train_step` raise KeyboardInterrupt as it starts step `step` (after step - 1 were
    done): a simulated kill mid-run, for the crash-and-resume tests."""
    real_step = trainer.train_step

    def killed(*args, **kwargs):
        if trainer.step == step - 1:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)
    trainer.train_step = killed


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Every test starts at the fixed count, whatever the test before it set."""
    configure_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh tiny Llama (same weights every time: seeded)."""
    model, _ = build_tiny_llama(tokenizer, seed=0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    from src.models import save_tiny_llama
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (shared: tests must not train it in place)."""
    model, tok = load_causal_lm("default", device="cpu")
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def hh_pairs_path():
    path = SHARED_DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
