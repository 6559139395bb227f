"""Bradley-Terry reward training: loss, batching, truncation, caching, resume, toy separability."""
import math
import os

import pytest
import torch

from src.models import RewardModel, build_tiny_llama
from src.models.heads import backbone_of
from src.safety.constitutional.common.checkpoint import checkpoint_path
from src.safety.constitutional.common.pairs import PreferencePair, load_pairs
from src.safety.constitutional.training.generation import left_pad
from src.safety.constitutional.training.reward_scoring import (bradley_terry_loss, encode_pair, pair_rewards,
                                                               pairwise_accuracy)
from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig, bottom_features


def _reward_model(tokenizer, num_layers=4, seed=0):
    lm, _ = build_tiny_llama(tokenizer, num_layers=num_layers, seed=seed)
    torch.manual_seed(seed + 1)
    return RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)


def _toy_pairs(n, offset=0):
    """Chosen answers say 'yes', rejected ones 'no': trivially separable."""
    topics = ["cats", "dogs", "rain", "tea", "maps", "jazz", "code", "bread", "boats", "stars", "salt", "snow"]
    pairs = []
    for i in range(offset, offset + n):
        question = f"Question {i} about {topics[i % len(topics)]}?"
        pairs.append(PreferencePair([{"role": "user", "content": question}], f"yes {topics[i % 5]}",
                                    f"no {topics[i % 5]}"))
    return pairs


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "rm"), batch_size=4, max_length=48, learning_rate=1e-3,
                eval_fraction=0.0, show_progress=False, log_every=1, warmup_ratio=0.0)
    base.update(kw)
    return RewardTrainerConfig(**base)


def test_loss_matches_formula_hard_soft_and_margin():
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    d = [1.0, -1.0, -0.5]
    hard = sum(-math.log(sig(x)) for x in d) / 3
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(hard, rel=1e-6)
    with_margin = sum(-math.log(sig(x - 0.3)) for x in d) / 3
    assert bradley_terry_loss(rc, rr, margin=0.3).item() == pytest.approx(with_margin, rel=1e-6)
    p = [0.9, 0.6, 1.0]
    soft = sum(-(pi * math.log(sig(x)) + (1 - pi) * math.log(sig(-x))) for pi, x in zip(p, d)) / 3
    assert bradley_terry_loss(rc, rr, torch.tensor(p)).item() == pytest.approx(soft, rel=1e-6)
    # label 1 is the hard form
    assert bradley_terry_loss(rc, rr, torch.ones(3)).item() == pytest.approx(hard, rel=1e-6)


def test_truncation_keeps_the_end_of_the_answer(tokenizer):
    long_prompt = [{"role": "user", "content": "background " * 200 + "FINAL QUESTION?"}]
    answer = "start " * 100 + "the very end"
    pair = PreferencePair(long_prompt, answer, "short answer")
    chosen, rejected = encode_pair(tokenizer, pair, max_length=64)
    assert len(chosen) == 64 and len(rejected) < 64
    assert chosen[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(chosen[:-1]).endswith("the very end")
    # A short answer leaves room for the prompt's end (the last user turn), cut from the left.
    short = PreferencePair(long_prompt, "ok", "no")
    c, r = encode_pair(tokenizer, short, max_length=64)
    assert len(c) == len(r) == 64 and c[:-3] == r[:-3]
    assert "FINAL QUESTION?" in tokenizer.decode(c)
    assert "assistant" in tokenizer.decode(c[-8:])


def test_a_prompt_that_fits_is_kept_whole(tokenizer):
    # Regression: with spare room between one and two prompt lengths, the old cut kept only the
    # prompt's last (room - length) tokens (a negative slice start), so training and scoring differed.
    from src.safety.constitutional.training.generation import render_prompt

    pair = PreferencePair([{"role": "user", "content": "How do I bake bread at home?"}], "Mix flour and water.", "No.")
    prompt_ids = tokenizer(render_prompt(tokenizer, pair.prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    max_length = len(answer_ids) + len(prompt_ids) + len(prompt_ids) // 2  # room in (len, 2 len)
    chosen, _ = encode_pair(tokenizer, pair, max_length)
    assert chosen == prompt_ids + answer_ids


def test_reward_scorer_retokenises_in_the_training_layout(tokenizer):
    # A reward model with its own tokenizer reads what reward training fed it: template + answer + eos
    # (no trailing newline after the end-of-turn, where the score is read).
    from types import SimpleNamespace

    from src.safety.constitutional.rl.rollout import RewardScorer

    config = SimpleNamespace(system_prompt=None, reward_max_tokens=40, judge_reward_weight=0.0)
    scorer = RewardScorer(_reward_model(tokenizer), config, torch.device("cpu"), reward_tokenizer=tokenizer)
    prompts, answers = ["How do I bake bread?", "background " * 60 + "Why?"], ["Mix flour and water.", "Because."]
    ids, mask = scorer.retokenise(prompts, answers)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        expected, _ = encode_pair(tokenizer, PreferencePair(p, a, a), 40)
        assert ids[row][mask[row].bool()].tolist() == expected
        assert ids[row, -1].item() == tokenizer.eos_token_id


def test_concatenated_batch_equals_separate_forwards(tokenizer):
    model = _reward_model(tokenizer).eval()
    encoded = [encode_pair(tokenizer, p, 48) for p in _toy_pairs(3)]
    chosen, rejected = [e[0] for e in encoded], [e[1] + [13, 14, 15] for e in encoded]  # unequal lengths
    with torch.no_grad():
        together = model(*left_pad(chosen + rejected, tokenizer.pad_token_id))
        alone = torch.cat([model(*left_pad([s], tokenizer.pad_token_id)) for s in chosen + rejected])
    assert torch.allclose(together, alone, atol=1e-5)


def test_shared_prompt_runs_once_with_the_numbers_and_gradients_of_whole_sequences(tokenizer, monkeypatch):
    """pair_rewards runs each pair's shared prompt once, both answers beside it in one packed row:
    rewards and gradients equal one forward per whole sequence; so do the cached bottom features."""
    model = _reward_model(tokenizer)
    pairs = _toy_pairs(3) + [
        PreferencePair([{"role": "user", "content": "A much longer question, with several more words in it?"}],
                       "Sure, the same opening then a different ending.", "Sure, the same opening but no."),
        PreferencePair([{"role": "user", "content": "Same?"}], "identical", "identical")]  # only the last token differs: none
    encoded = [encode_pair(tokenizer, p, 96) for p in pairs]
    seqs = [c for c, _ in encoded] + [r for _, r in encoded]
    n = len(pairs)
    backbone = backbone_of(model)
    tokens = []
    backbone.embed_tokens.register_forward_hook(lambda m, inp, out: tokens.append(int(inp[0].numel())))
    c, r = pair_rewards(model, encoded, tokenizer.pad_token_id)
    packed = list(tokens)
    (c.sum() - 2 * r.sum()).backward()
    shared = [g.detach().clone() for g in (p.grad for p in model.parameters())]
    model.zero_grad()
    alone = torch.cat([model(*left_pad([s], tokenizer.pad_token_id)) for s in seqs])
    (alone[:n].sum() - 2 * alone[n:].sum()).backward()
    assert torch.allclose(torch.cat([c, r]), alone, atol=1e-5)
    for g_shared, p in zip(shared, model.parameters()):
        assert torch.allclose(g_shared, p.grad, atol=1e-5, rtol=1e-4)
    # one forward in which each pair's shared tokens appear once: packed rows as wide as the widest
    # pair, fewer tokens (padding included) than the sequences hold
    cuts = [len(os.path.commonprefix([c_, r_])) for c_, r_ in encoded]
    cuts[-1] -= 1  # identical sequences: the last token runs with the answers, where the reward is read
    prompt_len = len(encode_pair(tokenizer, PreferencePair(pairs[3].prompt, "", ""), 96)[0]) - 1  # + end-of-turn
    assert cuts[3] > prompt_len + 3  # the answers' common opening is shared too
    sizes = [len(c_) + len(r_) - k for (c_, r_), k in zip(encoded, cuts)]
    assert len(packed) == 1 and packed[0] % max(sizes) == 0
    assert sum(sizes) <= packed[0] < sum(map(len, seqs))
    # a kernel that reads no 4-D mask (flash-attention 2): one padded row per sequence, same rewards
    import src.models.prefix as prefix
    monkeypatch.setattr(prefix, "takes_4d_masks", lambda model: False)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(pair_rewards(model, encoded, tokenizer.pad_token_id)), alone.detach(),
                                   atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    # frozen-bottom features (cached features' path): as one forward per sequence, below layer 2
    with torch.no_grad():
        features = bottom_features(model, encoded, tokenizer.pad_token_id, 2)
        for (f_c, f_r), (s_c, s_r) in zip(features, encoded):
            for f, s in ((f_c, s_c), (f_r, s_r)):
                ids, mask = left_pad([s], tokenizer.pad_token_id)
                full = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2][0]
                assert f.shape == full.shape and torch.allclose(f, full, atol=1e-5)


def test_toy_preferences_are_learned_to_full_accuracy(tokenizer, tmp_path):
    model = _reward_model(tokenizer, num_layers=2)
    train, held = _toy_pairs(32), _toy_pairs(12, offset=100)
    trainer = RewardTrainer(model, tokenizer, _config(tmp_path, num_epochs=4, batch_size=8))
    summary = trainer.train(train, held)
    assert summary["eval_accuracy"] == 1.0 and summary["eval_mean_margin"] > 0
    assert pairwise_accuracy(model, tokenizer, held, batch_size=4, max_length=48) == 1.0
    # stats travel with the saved model, for PPO's reward whitening
    saved = RewardModel.from_pretrained(tmp_path / "rm" / "reward_model", device="cpu")
    mean, std = saved.reward_stats
    assert std > 0 and mean == pytest.approx(summary["eval_reward_mean"])


def test_reward_stats_come_from_training_forwards_without_an_extra_pass(tokenizer, tmp_path):
    """No eval set: the normalisation stats are the last epoch's own rewards, so training makes
    exactly epochs x batches forwards; with a negligible learning rate they equal a separate scoring pass."""
    pairs = _toy_pairs(10)
    model = _reward_model(tokenizer, num_layers=2)
    calls = []
    backbone_of(model).register_forward_hook(lambda *a: calls.append(1))
    trainer = RewardTrainer(model, tokenizer, _config(tmp_path, num_epochs=2, batch_size=4, learning_rate=1e-12))
    summary = trainer.train(pairs)
    assert len(calls) == 2 * 3  # 2 epochs x ceil(10 / 4) batches, nothing after training
    scored = trainer.evaluate(pairs)
    assert summary["eval_reward_mean"] == pytest.approx(scored["reward_mean"], abs=1e-5)
    assert summary["eval_reward_std"] == pytest.approx(scored["reward_std"], rel=1e-4)
    assert model.reward_stats == pytest.approx((scored["reward_mean"], scored["reward_std"]), rel=1e-4, abs=1e-5)


def test_cached_features_match_full_forward_training(tokenizer, tmp_path):
    pairs = _toy_pairs(8)
    results = []
    for cache in (True, False):
        model = _reward_model(tokenizer)
        trainer = RewardTrainer(model, tokenizer, _config(tmp_path / str(cache), trainable_layers=2,
                                                          cache_frozen_features=cache))
        trainer.train(pairs)
        top = model.model.model.layers[-1].mlp.down_proj.weight.detach().clone()
        frozen = model.model.model.layers[0].mlp.down_proj.weight
        assert not frozen.requires_grad
        results.append(([h["loss"] for h in trainer.history if "loss" in h], top))
    (loss_c, top_c), (loss_f, top_f) = results
    assert loss_c[0] == pytest.approx(loss_f[0], abs=1e-5)
    assert loss_c == pytest.approx(loss_f, abs=1e-4)
    assert torch.allclose(top_c, top_f, atol=1e-5)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tokenizer, tmp_path):
    pairs = _toy_pairs(16)
    config = dict(num_epochs=2, checkpoint_every=3, keep_checkpoints=10, trainable_layers=2)
    full = _reward_model(tokenizer)
    RewardTrainer(full, tokenizer, _config(tmp_path / "a", **config)).train(pairs)
    resumed = _reward_model(tokenizer)
    ckpt = checkpoint_path(tmp_path / "a" / "rm" / "checkpoints", 3)  # "crashed" after step 3 (mid-epoch 1)
    trainer = RewardTrainer(resumed, tokenizer, _config(tmp_path / "b", **config))
    summary = trainer.train(pairs, resume_from=ckpt)
    assert summary["steps"] == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_steps_are_skipped_then_stop(tokenizer, tmp_path):
    pairs = _toy_pairs(8)
    pairs[0].label = float("nan")
    trainer = RewardTrainer(_reward_model(tokenizer), tokenizer,
                            _config(tmp_path / "a", batch_size=8, max_bad_steps=5, num_epochs=2))
    assert trainer.train(pairs)["bad_steps"] == 2
    trainer = RewardTrainer(_reward_model(tokenizer), tokenizer, _config(tmp_path / "b", batch_size=8, max_bad_steps=0))
    with pytest.raises(RuntimeError, match="max_bad_steps"):
        trainer.train(pairs)


def test_truncated_backbone_saves_and_loads(tokenizer, tmp_path):
    model = _reward_model(tokenizer).keep_bottom_layers(2)
    assert len(model.model.model.layers) == 2 and model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    again = RewardModel.from_pretrained(tmp_path / "rm", device="cpu")
    ids, mask = left_pad([[5, 6, 7], [8, 9]], tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), again(ids, mask), atol=1e-6)


def test_hh_pairs_train_end_to_end(tokenizer, tmp_path, hh_pairs_path):
    train = load_pairs(hh_pairs_path, limit=8, split="train")
    held = load_pairs(hh_pairs_path, limit=4, split="heldout")
    trainer = RewardTrainer(_reward_model(tokenizer), tokenizer,
                            _config(tmp_path, trainable_layers=1, max_length=64, log_file=str(tmp_path / "m.jsonl")))
    summary = trainer.train(train, held)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_pairs"] == 4
    assert (tmp_path / "m.jsonl").read_text().count("\n") >= 2
