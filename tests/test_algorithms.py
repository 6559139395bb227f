"""The algorithm family beyond PPO: primitives at hand-computed values, GRPO/RLOO/REINFORCE and DPO
on a tiny random Llama (learning direction, resume), and the factory."""
import math

import pytest
import torch
from torch import nn

from src.models import build_tiny_llama
from src.safety.constitutional.common.pairs import PreferencePair
from src.safety.constitutional.rl.algorithms import make_config, make_rl_trainer
from src.safety.constitutional.rl.dpo import DPOConfig, DPOTrainer
from src.safety.constitutional.rl.policy_gradient import (GRPOConfig, PolicyGradientTrainer, REINFORCEConfig,
                                                          RLOOConfig)
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer
from src.safety.constitutional.rl.primitives import (conservative_kl_penalty, discounted_returns, dpo_loss,
                                                     group_advantages, importance_sampling_loss,
                                                     policy_gradient_loss, rloo_baseline, update_reference)
from conftest import kill_at_step

PROMPTS = ["Say hi", "Name a colour.", "What is two plus two?", "Tell me a short joke about cats."]


# -- primitives at hand-computed values -----------------------------------------------------------

def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: G2 = 2, G1 = 0 + .5*2 = 1, G0 = 1 + .5*1 = 1.5; row 1: padding (the 9) is ignored
    expected = torch.tensor([[1.5, 1.0, 2.0], [3.5, 1.0, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5), expected)


def test_group_advantages_and_rloo_baseline_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # prompt 0: 1,2,3; prompt 1: 5,5,5
    # group 0: mean 2, unbiased std 1; group 1 carries no signal
    torch.testing.assert_close(group_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0]), atol=1e-5,
                               rtol=0)
    # k = 2: mean 2, unbiased std sqrt(8) -> -+2/sqrt(8) = -+1/sqrt(2)
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 4.0]), 2),
                               torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0]))
    # leave-one-out: mean of the others
    torch.testing.assert_close(rloo_baseline(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([4.0, 3.5, 1.5]))
    torch.testing.assert_close(rloo_baseline(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([2.0, 1.0, 4.0, 3.0]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_baseline(torch.ones(4), 1)


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    # h = (-1 + 2) - (-3 + 2) = 2; beta h = 1
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)          # 0.313262
    assert m["chosen_reward"] == pytest.approx(0.5) and m["rejected_reward"] == pytest.approx(-0.5)
    assert m["reward_margin"] == pytest.approx(1.0) and m["reward_accuracy"] == 1.0
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)
    soft, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, labels=torch.tensor([0.8]))
    assert soft.item() == pytest.approx(0.8 * 0.3132617 + 0.2 * 1.3132617, abs=1e-6)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)


def test_importance_sampling_weight_clipping_by_hand():
    new = torch.log(torch.tensor([[3.0, 0.5]])).requires_grad_()
    behaviour, adv, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    loss, m = importance_sampling_loss(new, behaviour, adv, mask, clip_ratio=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)       # weight 3 held at 2
    assert m["clipped_fraction"] == 0.5 and m["is_ratio_max"] == pytest.approx(3.0)
    assert m["is_ratio_min"] == pytest.approx(0.5)
    loss.backward()
    # the clipped token passes no gradient; the other gets -w * A / n = -0.25
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.25]]))
    # sequence-level weights: w = exp(sum new - behaviour) = exp(log 1.5) = 1.5
    seq_loss, seq_m = importance_sampling_loss(new.detach(), torch.zeros(1), torch.tensor([2.0]), mask, None)
    assert seq_loss.item() == pytest.approx(-3.0) and seq_m["is_ratio_mean"] == pytest.approx(1.5)


def test_conservative_penalty_policy_gradient_loss_and_reference_update_by_hand():
    assert conservative_kl_penalty(torch.tensor(0.15), 0.05, 2.0).item() == pytest.approx(0.02)
    assert conservative_kl_penalty(torch.tensor(0.01), 0.05, 2.0).item() == 0.0
    lp, adv = torch.tensor([[-1.0, -2.0, -7.0]]), torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = policy_gradient_loss(lp, adv, mask, ref_logprobs=lp, kl_coef=1.0)
    assert loss.item() == pytest.approx((1.0 - 2.0) / 2) and m["kl_ref"] == 0.0   # -A*lp = 1, -2; padding out
    ent = torch.tensor([[2.0, 4.0, 100.0]])
    loss2, m2 = policy_gradient_loss(lp, adv, mask, entropy=ent, entropy_coef=0.1)
    assert loss2.item() == pytest.approx(-0.5 - 0.1 * 3.0) and m2["entropy"] == pytest.approx(3.0)
    ref, pol = nn.Linear(2, 1), nn.Linear(2, 1)
    nn.init.zeros_(ref.weight), nn.init.zeros_(ref.bias), nn.init.ones_(pol.weight), nn.init.ones_(pol.bias)
    update_reference(ref, pol, "ema", alpha=0.9)
    torch.testing.assert_close(ref.weight, torch.full((1, 2), 0.1))
    update_reference(ref, pol, "copy")
    torch.testing.assert_close(ref.bias, torch.ones(1))


# -- policy-gradient trainers -----------------------------------------------------------------------

BOOSTED = [1000 + i for i in range(8)]   # ordinary word pieces, not special tokens
TARGET = BOOSTED[0]


class TargetTokenReward(nn.Module):
    """The guide's reward interface, forward(input_ids, attention_mask) -> (batch,): the share of
    attended tokens that are TARGET. Trivially learnable by a policy that samples it now and then."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        hits = (input_ids == TARGET).float() * attention_mask
        return hits.sum(1) / attention_mask.sum(1)       # (batch,)


def boosted_policy(tokenizer):
    """The tiny random Llama, whose near-uniform 49k-token output would almost never sample TARGET,
    given an LM-head bias of +12 on 8 tokens: most answer tokens are one of them, 1 in 8 TARGET."""
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    old = policy.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[BOOSTED] = 12.0
    policy.lm_head = head
    policy.config.tie_word_embeddings = False
    return policy


def target_prob(model, tokenizer):
    """Mean probability of TARGET at the first answer token over PROMPTS (deterministic)."""
    from src.safety.constitutional.training.generation import GenerationConfig, tokenize_prompts
    ids, mask, _ = tokenize_prompts(tokenizer, PROMPTS, GenerationConfig())
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
    return logits.softmax(-1)[:, TARGET].mean().item()


def make_pg(tokenizer, algorithm, policy=None, **overrides):
    policy = policy if policy is not None else build_tiny_llama(tokenizer, seed=0)[0]
    base = dict(learning_rate=1e-2, seed=0)
    return make_rl_trainer(algorithm, policy, tokenizer, TargetTokenReward(), "cpu", config={**base, **overrides})


@pytest.mark.parametrize("algorithm,overrides", [
    ("grpo", dict(group_size=4)),
    ("rloo", dict(group_size=4, policy_loss="importance_sampling")),
    ("reinforce", dict(reinforce_baseline="batch_mean")),
])
def test_trainer_moves_the_reward_the_right_way(tokenizer, algorithm, overrides):
    torch.manual_seed(0)
    trainer = make_pg(tokenizer, algorithm, boosted_policy(tokenizer), **overrides)
    assert isinstance(trainer, PolicyGradientTrainer)
    assert trainer.value_model is None and trainer.value_optimizer is None  # no critic was built
    before = target_prob(trainer.policy, tokenizer)
    out = trainer.train(PROMPTS, num_steps=2, batch_size=4 if algorithm == "reinforce" else 2,
                        num_epochs_per_batch=2, max_length=8, temperature=1.0, show_progress=False)
    after = target_prob(trainer.policy, tokenizer)
    assert after > 1.5 * before, (algorithm, before, after)
    hist = out["history"]
    assert len(hist) == 2 and all(math.isfinite(h["policy_loss"]) for h in hist)
    rows = hist[0]["answer_length"]  # one rollout row per answer: k per prompt
    assert rows > 0 and trainer.last_rollout.mask.shape[0] == (2 * 4 if algorithm != "reinforce" else 4)
    if algorithm == "grpo":
        assert abs(hist[0]["kl_divergence"]) < 1e-6 and 0 <= hist[0]["clipfrac"] <= 1  # policy == reference
        assert math.isfinite(hist[1]["kl_ref_loss"])
    if algorithm == "rloo":
        assert 0 <= hist[0]["is_clipped_fraction"] <= 1


def test_group_layout_and_advantages_match_the_primitives(tokenizer):
    trainer = make_pg(tokenizer, "grpo", group_size=3, reward_normalization="none")
    torch.manual_seed(1)
    trainer.train_step(PROMPTS[:2], num_epochs_per_batch=1, max_length=4)
    ro = trainer.last_rollout
    assert ro.prompt_texts[0] == ro.prompt_texts[1] == ro.prompt_texts[2] != ro.prompt_texts[3]
    adv, _, _ = trainer.compute_advantages(ro, ro.scores)
    expected = group_advantages(ro.scores, 3)
    torch.testing.assert_close(adv[:, 0], expected)
    torch.testing.assert_close(adv, expected[:, None] * ro.mask)


def test_resume_gives_identical_weights_grpo(tokenizer, tmp_path):
    args = dict(num_steps=3, batch_size=2, num_epochs_per_batch=1, max_length=3, show_progress=False)
    cfg = dict(group_size=2, ref_update="ema", ref_update_every=1, lr_schedule="linear")
    straight = make_pg(tokenizer, "grpo", **cfg)
    torch.manual_seed(7)
    out = straight.train(PROMPTS, **args)

    first = make_pg(tokenizer, "grpo", **cfg)
    kill_at_step(first, 3)
    torch.manual_seed(7)
    with pytest.raises(KeyboardInterrupt):
        first.train(PROMPTS, **args, checkpoint_dir=tmp_path, checkpoint_freq=2)
    del first
    torch.manual_seed(999)
    resumed = make_pg(tokenizer, "grpo", **cfg)
    out2 = resumed.train(PROMPTS, **args, resume_from=tmp_path)
    for a, b in ((straight.policy, resumed.policy), (straight.ref_model, resumed.ref_model)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    assert [h["mean_score"] for h in out["history"]] == [h["mean_score"] for h in out2["history"]]


def test_factory_and_config_validation(tokenizer):
    assert isinstance(make_config("grpo"), GRPOConfig) and make_config("grpo").kl_loss_coef == 0.04
    # a PPOConfig drives GRPO: only its changed fields carry over
    moved = make_config("rloo", PPOConfig(learning_rate=3e-6))
    assert isinstance(moved, RLOOConfig) and moved.learning_rate == 3e-6 and moved.kl_penalty == 0.05
    assert make_config("reinforce", {"kl_penalty": 0.2}).kl_penalty == 0.2
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="policy_loss"):
        REINFORCEConfig(policy_loss="nope")
    with pytest.raises(ValueError, match="no field"):
        make_config("grpo", {"grup_size": 4})
    with pytest.raises(ValueError, match="unknown RL algorithm"):
        make_config("a2c")
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = TargetTokenReward()
    assert type(make_rl_trainer("ppo", policy, tokenizer, reward, "cpu", {"learning_rate": 1e-4})) is PPOTrainer
    with pytest.raises(ValueError, match="no value model"):
        make_rl_trainer("grpo", policy, tokenizer, reward, "cpu", value_model=nn.Linear(1, 1))


# -- DPO --------------------------------------------------------------------------------------------

PAIRS = [PreferencePair(prompt=[{"role": "user", "content": p}], chosen=c, rejected=r)
         for p, c, r in [("Say hi", "Hello there, friend.", "Go away."),
                         ("Name a colour.", "Blue is a colour.", "I will not answer."),
                         ("What is two plus two?", "Two plus two is four.", "Figure it out yourself."),
                         ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse.",
                          "No.")]]


def test_dpo_raises_the_margin(tokenizer):
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    trainer = DPOTrainer(policy, tokenizer, DPOConfig(learning_rate=3e-3, batch_size=2, num_epochs=3, beta=0.1,
                                                      lr_schedule="constant"))
    out = trainer.train(PAIRS, eval_pairs=PAIRS, show_progress=False)
    assert trainer.ref_model is None  # released after precomputation
    first, last = out["history"][0], out["eval"]
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)      # policy == reference at step 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert last["reward_margin"] > 0.05 and last["reward_accuracy"] == 1.0 and last["loss"] < math.log(2)


def test_dpo_resume_gives_identical_weights(tokenizer, tmp_path):
    cfg = dict(learning_rate=1e-3, batch_size=2, num_epochs=2, label_smoothing=0.1)
    straight = DPOTrainer(build_tiny_llama(tokenizer, seed=0)[0], tokenizer, DPOConfig(**cfg))
    straight.train(PAIRS, show_progress=False)
    first = DPOTrainer(build_tiny_llama(tokenizer, seed=0)[0], tokenizer,
                       DPOConfig(**cfg, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    kill_at_step(first, 3)
    with pytest.raises(KeyboardInterrupt):
        first.train(PAIRS, show_progress=False)
    resumed = DPOTrainer(build_tiny_llama(tokenizer, seed=0)[0], tokenizer, DPOConfig(**cfg))
    out = resumed.train(PAIRS, resume_from=tmp_path, show_progress=False)
    assert len(out["history"]) == 4
    for (name, p), q in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.7)
