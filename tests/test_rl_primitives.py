"""RL primitives against hand-computed numbers."""
import math

import pytest
import torch

from src.safety.constitutional.rl.primitives import (AdaptiveKLController, FixedKLController, RunningMeanStd,
                                                     clipped_value_loss, compute_gae, conservative_kl_penalty,
                                                     explained_variance, kl_penalty, masked_mean, masked_whiten,
                                                     ppo_policy_loss)


def test_gae_hand_computed_with_variable_lengths():
    gamma, lam = 0.9, 0.5
    # row 0: 3 real tokens; row 1: 2 real tokens + padding holding garbage that must be ignored
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    # row 0: d2 = 1 - .8 = .2; d1 = .9*.8 - .4 = .32; d0 = .9*.4 - .5 = -.14
    #        A2 = .2; A1 = .32 + .45*.2 = .41; A0 = -.14 + .45*.41 = .0445
    # row 1: last real token bootstraps from nothing: d1 = -1 - .1 = -1.1; d0 = .5 + .9*.1 - .2 = .39
    #        A1 = -1.1; A0 = .39 + .45*(-1.1) = -.105
    expected_adv = torch.tensor([[0.0445, 0.41, 0.2], [-0.105, -1.1, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.5445, 0.81, 1.0], [0.095, -1.0, 0.0]]), atol=1e-6, rtol=0)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 0.2]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0]])
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_clipped_policy_loss_both_sides_and_signs():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # last token is padding with absurd values
    old = torch.zeros_like(ratio)
    new = ratio.log().requires_grad_(True)
    loss, m = ppo_policy_loss(new, old, adv, mask, eps)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A>0, r=0.5: max(-0.5, -0.8) = -0.5
    # A<0, r=1.5: max(1.5, 1.2) = 1.5               A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx(1.0)
    assert m["approx_kl"] == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    loss.backward()
    # clipped terms pass no gradient; unclipped: d/dlogp (-A * r) / 4 = -A * r / 4
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]]))


def test_ratio_one_is_plain_policy_gradient():
    adv = torch.tensor([[0.3, -0.7]])
    loss, m = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0


def test_clipped_value_loss_hand_values():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, -0.1, 0.5]])
    ret = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, m = clipped_value_loss(new, old, ret, mask, clip=0.2)
    # tok0: unclipped (.5-1)^2=.25, clipped (.2-1)^2=.64 -> .64; tok1: (-.1-1)^2=1.21 both;
    # tok2: (.5+1)^2=2.25 vs (.2+1)^2=1.44 -> 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 2.25) / 3)
    assert m["vf_clipfrac"] == pytest.approx(1 / 3)
    plain, _ = clipped_value_loss(new, old, ret, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 1.21 + 2.25) / 3)


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    for est in ("k1", "k3", "abs", "mse"):
        assert torch.equal(kl_penalty(lp, lp.clone(), est), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), lp - ref)
    log_r = ref - lp
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), log_r.exp() - 1 - log_r)
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k2")


def test_conservative_penalty_is_zero_inside_threshold():
    assert conservative_kl_penalty(torch.tensor(0.01), 0.05, 10.0).item() == 0.0
    assert conservative_kl_penalty(torch.tensor(0.15), 0.05, 10.0).item() == pytest.approx(10 * 0.1 ** 2)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.5]))
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    real = w[mask.bool()]
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, as whitening uses
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(2.5, abs=1e-5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_hand_values_and_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=8)            # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 8 / 10000))
    before = ctl.value
    ctl.update(5.0, n_steps=8)            # error 5/6 - 1 = -1/6, inside the clip
    assert ctl.value == pytest.approx(before * (1 - (1 / 6) * 8 / 10000))
    ctl.update(float("nan"), 8)           # ignored
    assert ctl.value == pytest.approx(before * (1 - (1 / 6) * 8 / 10000))
    other = AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, 8) == 0.3


def test_running_mean_std_matches_batch_statistics():
    rms = RunningMeanStd(epsilon=0.0)
    data = torch.tensor([1.0, 2.0, 4.0, 8.0, -3.0, 0.5])
    rms.update(data[:2])
    rms.update(data[2:])
    assert rms.mean == pytest.approx(data.mean().item())
    assert rms.var == pytest.approx(data.var(unbiased=False).item())
    clone = RunningMeanStd()
    clone.load_state_dict(rms.state_dict())
    torch.testing.assert_close(clone.normalize(data), rms.normalize(data))
