"""Mixed precision: fp32 weights, bf16 matmuls under autocast, a bf16 twin for decoding.

These tests ask for bf16 explicitly (the rest of the suite runs in fp32, see conftest.py); bf16
autocast works on every x86 CPU, natively fast only with AVX512-BF16/AMX.
"""
import copy

import pytest
import torch

from src.models import RewardModel, ValueModel, build_tiny_llama
from src.models import precision
from src.models.precision import autocast, compute_dtype, sampling_twin, set_precision
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer
from src.safety.constitutional.training.generation import GenerationConfig, generate
from src.safety.constitutional.training.logprobs import sequence_logprobs

PROMPTS = ["Say hi", "Name a colour.", "What is two plus two?", "Tell me a short joke about cats."]


@pytest.fixture()
def bf16():
    set_precision("bf16")
    yield
    set_precision(None)


def test_the_setting_decides_autocast_and_bad_values_are_named(monkeypatch):
    try:
        set_precision("fp32")
        assert compute_dtype("cpu") is None
        with autocast("cpu") as dtype:
            assert dtype is None and not torch.is_autocast_enabled("cpu")
        set_precision("bf16")
        assert compute_dtype("cpu") == torch.bfloat16 and compute_dtype("meta") is None
        with autocast("cpu") as dtype:
            assert dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        set_precision("auto")
        assert (compute_dtype("cpu") == torch.bfloat16) == precision.native_bf16("cpu")
        with pytest.raises(ValueError, match="fp8"):
            set_precision("fp8")
        set_precision(None)
        monkeypatch.setenv("CAI_PRECISION", "half")
        with pytest.raises(ValueError, match="CAI_PRECISION"):
            compute_dtype("cpu")
    finally:
        set_precision(None)


def test_sampling_twin_is_bf16_and_follows_the_live_weights(tokenizer, bf16):
    model, _ = build_tiny_llama(tokenizer, seed=0)
    twin = sampling_twin(model)
    assert twin is not model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())          # the trained weights stay fp32
    assert all(b.dtype == torch.float32 for b in twin.buffers() if b.is_floating_point())  # rotary frequencies
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    again = sampling_twin(model)
    assert again is twin                                                     # built once, refreshed in place
    assert torch.equal(again.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))
    set_precision("fp32")
    assert sampling_twin(model) is model


def test_bf16_logprobs_track_fp32_on_the_real_model(default_model):
    model, tok = default_model
    msgs = [{"role": "user", "content": "How do I make bread at home?"},
            {"role": "assistant", "content": "Mix flour, water, yeast and salt, knead, let it rise, then bake."}]
    ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=False)])
    attn = torch.ones_like(ids)
    try:
        with torch.no_grad():
            set_precision("fp32")
            lp32 = sequence_logprobs(model, ids, attn, 20)
            set_precision("bf16")
            lp16 = sequence_logprobs(model, ids, attn, 20)
    finally:
        set_precision(None)
    err = (lp16 - lp32).abs()
    assert lp16.dtype == torch.float32
    assert 0 < err.mean() < 0.05 and err.max() < 0.3, (err.mean(), err.max())  # bf16 ran, and stayed close


def test_ppo_in_bf16_starts_at_ratio_one_and_trains_fp32_weights(tokenizer, bf16):
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = RewardModel.from_causal_lm(build_tiny_llama(tokenizer, seed=1)[0], device="cpu", head_init_std=0.5)
    trainer = PPOTrainer(policy, ValueModel.from_causal_lm(policy, device="cpu"), reward, tokenizer, "cpu",
                         config=PPOConfig(learning_rate=1e-3))
    torch.manual_seed(0)
    ro = trainer.rollout(PROMPTS, max_new_tokens=6)
    R = ro.mask.shape[1]
    with torch.no_grad():  # the update's first forward reproduces the rollout's log-probs exactly: ratio 1
        again = sequence_logprobs(trainer.policy, ro.input_ids, ro.attention_mask, R) * ro.mask
    assert torch.equal(again, ro.logprobs)

    before = copy.deepcopy(trainer.policy.state_dict())
    torch.manual_seed(0)
    stats = trainer.train_step(PROMPTS, max_length=6, num_epochs_per_batch=2)
    assert stats["kl_divergence"] == 0.0          # policy == reference at the first rollout, bf16 or not
    assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("policy_loss", "value_loss", "approx_kl"))
    for name, tensor in trainer.policy.state_dict().items():
        assert tensor.dtype == torch.float32, name
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def _greedy_equals_hf_generate(model, reference, tokenizer, max_new_tokens: int):
    """`generate`'s greedy answers from `model` are HF generate's from `reference`; returns them."""
    out = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                               batch_size=4), return_logprobs=True)
    P, n = out.prompt_ids.shape[1], out.response_ids.shape[1]
    with torch.inference_mode():
        expected = reference.generate(input_ids=out.prompt_ids, attention_mask=out.attention_mask[:, :P],
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[:, P:P + n]
    real = out.response_mask.bool()
    assert torch.equal(expected[real], out.response_ids[real])
    return out


def test_generation_samples_from_the_twin_and_scores_with_the_policy(tokenizer, bf16):
    model, _ = build_tiny_llama(tokenizer, seed=0)
    out = _greedy_equals_hf_generate(model, sampling_twin(model), tokenizer, max_new_tokens=6)
    with torch.no_grad():
        lp = sequence_logprobs(model, out.input_ids, out.attention_mask, out.response_ids.shape[1]) * out.response_mask
    assert torch.equal(lp, out.logprobs)


def test_packed_linear_gives_the_bf16_linear_numbers_and_follows_refreshes(monkeypatch):
    monkeypatch.setattr(precision, "_PACK_OK", None)
    state = torch.get_rng_state()
    can_pack = precision._can_pack(torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())  # the probe leaves sampling alone (exact resumes)
    if not can_pack:
        pytest.skip("this torch build has no oneDNN packed bf16 linear")
    source = torch.nn.Linear(32, 24)
    packed = precision.PackedLinear(source)
    x = torch.randn(2, 5, 32)
    expected = torch.nn.functional.linear(x.bfloat16(), source.weight.bfloat16(), source.bias.bfloat16())
    assert torch.equal(packed(x), expected)
    with torch.no_grad():
        source.weight.mul_(2)
    packed.refresh(source)
    assert torch.equal(packed(x), torch.nn.functional.linear(x.bfloat16(), source.weight.bfloat16(),
                                                             source.bias.bfloat16()))


def test_a_lora_policy_decodes_from_a_merged_bf16_twin(tokenizer, bf16):
    from src.models.lora import add_lora, has_lora
    model, _ = build_tiny_llama(tokenizer, seed=0)
    add_lora(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    twin = sampling_twin(model)
    assert has_lora(model) and not has_lora(twin)   # adapters folded into the copy, the policy untouched
    out = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=4, do_sample=False, batch_size=4),
                   return_logprobs=True)
    assert out.logprobs.shape == out.response_ids.shape and torch.isfinite(out.logprobs).all()


def test_shared_frozen_reference_computes_like_a_separate_one_in_bf16(tokenizer, bf16):
    # the shared path applies the LM head itself: it must use the same precision as `lm_logits`
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = RewardModel.from_causal_lm(policy, device="cpu", head_init_std=0.5)  # backbone == policy's
    shared = PPOTrainer(policy, None, reward, tokenizer, "cpu", config=PPOConfig(share_reward_and_reference=True))
    separate = PPOTrainer(policy, None, reward, tokenizer, "cpu")
    torch.manual_seed(0)
    ro = shared.rollout(PROMPTS, max_new_tokens=5)
    with torch.no_grad():
        ref, _ = separate._ref_and_scores(ro.input_ids, ro.attention_mask, ro.mask.shape[1], 1.0, PROMPTS, ro.texts)
    assert torch.equal(ro.ref_logprobs, ref * ro.mask)  # an fp32 head here differed by up to 8.5e-4


def test_decoding_matmuls_give_linear_numbers_in_the_weight_major_layout_and_undo_themselves(tokenizer):
    """fp32 on CPU: few-row inputs take (W @ x^T)^T, one row and large inputs F.linear; the numbers are
    F.linear's to float rounding; greedy decoding through `generate` picks the tokens HF's own
    generate picks without it; on leaving, every layer is a plain Linear again (training never sees it)."""
    model, _ = build_tiny_llama(tokenizer, seed=0)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    layer = torch.nn.Linear(32, 24)
    calls = []
    real_mm = torch.Tensor.__matmul__
    with precision.decoding_matmuls(layer), torch.no_grad():
        assert "forward" in vars(layer)
        for rows in (1, 8, precision.DECODE_ROWS, precision.DECODE_ROWS + 1):
            x = torch.randn(rows, 1, 32)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                       atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(layer)

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b)

    with precision.decoding_matmuls(layer), torch.no_grad():
        torch.Tensor.__matmul__ = spy
        try:
            layer(torch.randn(8, 32))
            layer(torch.randn(1, 32))
        finally:
            torch.Tensor.__matmul__ = real_mm
    assert calls == [((24, 32), (32, 8))]  # only the 8-row input, weight first

    _greedy_equals_hf_generate(model, model, tokenizer, max_new_tokens=8)  # HF's generate outside the block
    assert all("forward" not in vars(m) for m in linears)
