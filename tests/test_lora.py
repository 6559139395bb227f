"""LoRA on the PPO policy and in SFT: adapters only train, the reference is the base weights, export merges."""
import pytest
import torch

from src.models import RewardModel, build_tiny_llama, load_causal_lm
from src.models.lora import adapters_disabled, add_lora, has_lora, merge_lora
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer

PROMPTS = ["Say hi", "Name a colour.", "What is two plus two?", "Tell me a short joke about cats."]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_start_at_zero_train_alone_and_merge_into_a_plain_model(tokenizer, tmp_path):
    model, _ = build_tiny_llama(tokenizer, seed=0)
    ids = torch.randint(3, 1000, (2, 9))
    before = _logits(model, ids)
    add_lora(model, r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(_logits(model, ids), before)            # B = 0 at the start
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, before)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, ids), before)        # the base weights alone
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored
    merge_lora(model)
    assert not has_lora(model)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    plain, _ = load_causal_lm(tmp_path / "merged", device="cpu")
    torch.testing.assert_close(_logits(plain, ids), adapted, atol=1e-5, rtol=1e-5)


def _trainer(tokenizer, **cfg):
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = RewardModel.from_causal_lm(build_tiny_llama(tokenizer, seed=1)[0], device="cpu", head_init_std=0.5)
    return PPOTrainer(policy, None, reward, tokenizer, "cpu",
                      config=PPOConfig(learning_rate=1e-2, lora_r=4, mini_batch_size=2, **cfg))


def test_ppo_with_lora_trains_adapters_only_against_the_base_as_reference(tokenizer, tmp_path):
    trainer = _trainer(tokenizer)
    assert trainer.ref_model is None                            # no reference copy
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    value_before = [p.detach().clone() for p in trainer.value_model.parameters()]
    torch.manual_seed(0)
    first = trainer.train_step(PROMPTS, max_length=5, num_epochs_per_batch=2)
    # adapters at zero: policy == reference, up to float rounding (the two forwards batch differently)
    assert abs(first["kl_divergence"]) < 1e-6
    second = trainer.train_step(PROMPTS, max_length=5, num_epochs_per_batch=2)
    assert abs(second["kl_divergence"]) > 1e-4                  # the adapters moved the policy off its base
    for name, p in trainer.policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name            # frozen base weights
    assert any(not torch.equal(a, b) for a, b in zip(value_before, trainer.value_model.parameters()))
    # the reference log-probs are exactly the base model's
    ro = trainer.last_rollout
    fresh, _ = build_tiny_llama(tokenizer, seed=0)
    from src.safety.constitutional.training.logprobs import sequence_logprobs
    with torch.no_grad():
        base_lp = sequence_logprobs(fresh, ro.input_ids, ro.attention_mask, ro.mask.shape[1]) * ro.mask
    torch.testing.assert_close(ro.ref_logprobs, base_lp, atol=1e-6, rtol=1e-6)

    # checkpoint and resume restore the adapters
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = _trainer(tokenizer)
    resumed.load_checkpoint(path)
    for (n, a), (_, b) in zip(trainer.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), n


def test_lora_with_a_moving_reference_is_refused(tokenizer):
    import pytest
    with pytest.raises(ValueError, match="LoRA"):
        PPOConfig(lora_r=4, ref_update="copy", ref_update_every=2)


def test_grpo_with_lora_uses_the_base_as_reference(tokenizer):
    from src.safety.constitutional.rl.algorithms import make_rl_trainer
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = RewardModel.from_causal_lm(build_tiny_llama(tokenizer, seed=1)[0], device="cpu", head_init_std=0.5)
    trainer = make_rl_trainer("grpo", policy, tokenizer, reward, "cpu",
                              config={"learning_rate": 1e-2, "lora_r": 4, "group_size": 2})
    assert trainer.ref_model is None and has_lora(trainer.policy)
    torch.manual_seed(0)
    first = trainer.train_step(PROMPTS[:2], max_length=5, num_epochs_per_batch=1)
    second = trainer.train_step(PROMPTS[:2], max_length=5, num_epochs_per_batch=1)
    assert abs(first["kl_divergence"]) < 1e-6 and abs(second["kl_divergence"]) > 1e-4  # zero adapters, then moved


def test_sft_with_lora_lowers_the_loss_through_the_adapters_alone(tokenizer, tmp_path):
    from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer
    records = [{"prompt": "Name a colour.", "response": "Blue."}, {"prompt": "Say hi", "response": "Hi!"},
               {"prompt": "What is two plus two?", "response": "Four."}, {"prompt": "Greet me.", "response": "Hello!"}]
    model, _ = build_tiny_llama(tokenizer, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), num_epochs=3, batch_size=2, learning_rate=1e-2, lora_r=8,
                    eval_fraction=0.0, warmup_ratio=0.0, show_progress=False, gradient_checkpointing=True)
    trainer = SFTTrainer(model, tokenizer, cfg)
    from src.safety.constitutional.training.sft import tokenize_records
    examples = tokenize_records(tokenizer, records, cfg.max_seq_len, cfg.system_prompt)
    loss_before = trainer.evaluate(examples)
    trainer.train(records, eval_records=[])
    loss_after = trainer.evaluate(examples)
    assert loss_after < loss_before
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name   # only the adapters moved
    merged = merge_lora(model)
    assert not has_lora(merged)
    assert SFTTrainer(merged, tokenizer, SFTConfig(output_dir=str(tmp_path / "x"))).evaluate(examples) == \
        pytest.approx(loss_after, rel=1e-4)   # the same loss once the adapters are folded in
