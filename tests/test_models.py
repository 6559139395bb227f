import subprocess
import sys

import pytest
import torch

from src.models import (ModelNotFoundError, RewardModel, ValueModel, default_model_dir, last_token_index,
                        load_causal_lm, resolve_device, resolve_dtype, resolve_model_path, seed_everything)
from src.safety.constitutional.training.generation import GenerationConfig, generate

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_default_model_answers_chat_prompt_with_real_text(default_model):
    model, tok = default_model
    out = generate(model, tok, ["What is the capital of France?"],
                   GenerationConfig(max_new_tokens=16, do_sample=False))
    assert "Paris" in out.texts[0]
    assert bool(out.finished[0])


def test_cached_default_model_is_reused_not_reconverted():
    # Load time itself is measured in scripts/benchmark.py (timed tests are flaky on shared CPUs);
    # here we check that a second provisioning reuses the safetensors cache untouched.
    from src.models import provision_default_model
    weights = default_model_dir() / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert provision_default_model() == default_model_dir()
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_concurrent_first_runs_convert_once(tmp_path):
    # Two processes provision an empty cache at once: the file lock makes the second wait and reuse.
    code = ("import os; from src.models.loading import provision_default_model, default_model_dir; "
            "p = provision_default_model(); print(os.stat(p / 'model.safetensors').st_ino)")
    env = dict(__import__("os").environ, CAI_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    inodes = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert inodes[0] == inodes[1]  # one conversion, one file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_missing_model_gives_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_any_local_hf_directory_loads(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, device="cpu")
    assert model.config.num_hidden_layers == 2 and tok.padding_side == "left"


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(torch.device("cpu"), "float7")


def test_last_token_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert last_token_index(left).tolist() == [3, 3]
    assert last_token_index(right).tolist() == [1, 2]


def _batch(tokenizer, texts, side):
    tokenizer.padding_side = side
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_head_scores_last_real_token_under_padding(tiny_model, tokenizer, side):
    rm = RewardModel.from_causal_lm(tiny_model).eval()
    texts = ["a short one", "a much longer sentence that needs more tokens than the first"]
    ids, mask = _batch(tokenizer, texts, side)
    with torch.no_grad():
        batched = rm(ids, mask)
        singles = torch.stack([rm(*_batch(tokenizer, [t], side)) for t in texts]).squeeze(-1)
    assert batched.shape == (2,)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_value_head_gives_one_value_per_token(tiny_model, tokenizer):
    vm = ValueModel.from_causal_lm(tiny_model)
    ids, mask = _batch(tokenizer, ["hello there", "hi"], "left")
    values = vm(ids, mask)
    assert values.shape == ids.shape
    values.sum().backward()
    assert vm.model.score.weight.grad is not None


def test_scalar_heads_round_trip_bit_for_bit(tiny_model, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel.from_causal_lm(tiny_model).eval()
    rm.set_reward_stats(0.25, 2.0)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    loaded = RewardModel.from_pretrained(tmp_path / "rm", device="cpu").eval()
    for (k, a), (_, b) in zip(rm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.reward_stats == (0.25, 2.0)
    ids, mask = _batch(tokenizer, ["check the scores"], "left")
    with torch.no_grad():  # same numbers (up to 1 ulp: matmul kernels may differ with memory alignment)
        torch.testing.assert_close(rm(ids, mask), loaded(ids, mask), atol=1e-6, rtol=1e-6)
    # plain transformers reads it too
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert plain.config.num_labels == 1


def test_head_backbone_is_a_copy_not_shared(tiny_model):
    vm = ValueModel.from_causal_lm(tiny_model)
    p_vm = next(vm.model.model.parameters())
    p_lm = next(tiny_model.model.parameters())
    assert torch.equal(p_vm, p_lm) and p_vm.data_ptr() != p_lm.data_ptr()


def test_seeding_repeats(tokenizer):
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_int8_sampling_copy_is_close_and_leaves_the_model_alone(tokenizer):
    from src.models import build_tiny_llama, int8_sampling_copy
    model, _ = build_tiny_llama(tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = int8_sampling_copy(model)
    assert "quantized" in type(quantized.model.layers[0].mlp.up_proj).__module__
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.tensor([tokenizer("How do vaccines work?")["input_ids"]])
    with torch.inference_mode():
        exact, approx = model(ids).logits, quantized(ids).logits
    # int8 weights: small relative error, same next-token choice almost everywhere
    assert (exact - approx).abs().max() < 0.05 * exact.abs().max()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.8


def test_short_cpu_sequences_use_eager_attention_with_the_same_numbers(tiny_model):
    from src.models.attention import EAGER_MAX_TOKENS, attention_for

    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        with attention_for(tiny_model, ids) as kernel:
            assert kernel == "eager" and tiny_model.config._attn_implementation == "eager"
            eager = tiny_model(input_ids=ids, attention_mask=mask).logits
        assert tiny_model.config._attn_implementation == "sdpa"  # restored
        sdpa = tiny_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[mask.bool()], sdpa[mask.bool()], atol=1e-5, rtol=1e-5)
    with attention_for(tiny_model, torch.zeros(1, EAGER_MAX_TOKENS + 1, dtype=torch.long)) as kernel:
        assert kernel == "sdpa"  # long sequences: (T, T) probabilities would cost too much memory
    from src.models.checkpointing import enable_gradient_checkpointing
    enable_gradient_checkpointing(tiny_model)
    with attention_for(tiny_model, ids) as kernel:
        assert kernel == "sdpa"  # the recomputation in backward must see the forward's kernel
