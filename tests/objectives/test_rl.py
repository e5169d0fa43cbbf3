"""PPO / GRPO maths: masked statistics, GAE, clipped surrogates, value clipping, KL estimators, entropy."""

from __future__ import annotations

import math

import pytest
import torch

from lmwright.objectives.rl import (
    entropy_from_logits,
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def test_masked_mean_and_whiten():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert torch.allclose(masked_mean(x, m, dim=1), torch.tensor([2.0]))
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    w = masked_whiten(x, m)
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, m, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: its reward and value are ignored
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 + 0.9 * 0.0 - 0.7  # episode ends: V_3 = 0
    a1 = (0.0 + 0.9 * 0.7 - 0.6) + 0.9 * 0.8 * a2
    a0 = (0.0 + 0.9 * 0.6 - 0.5) + 0.9 * 0.8 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]), atol=1e-6)
    # gamma = lam = 1: advantage = sum of future rewards - V_t
    adv1, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.tensor([[0.5, 0.4, 0.3, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2.2
    assert out.loss_sum.item() == pytest.approx(-1.2 + 0.8 - 2.2, abs=1e-6)
    assert out.n_targets.item() == 3
    assert out.metrics["clipfrac"].item() == 2
    assert out.metrics["approx_kl"].item() == pytest.approx(
        0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2), abs=1e-6)
    out.loss_sum.backward()
    # clipped tokens get no gradient; the unclipped one gets -A * ratio
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -2.2, 0.0]]), atol=1e-6)


def test_ppo_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 1.5]])
    old = torch.tensor([[0.5, 2.0, 1.0]])
    returns = torch.tensor([[0.0, 3.0, 2.0]])
    mask = torch.ones(1, 3)
    out = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # t0: max(1, 0.7^2) = 1; t1: max(1, 1) = 1; t2: max(0.25, (1.2 - 2)^2 = 0.64) = 0.64 (clipped)
    assert out.loss_sum.item() == pytest.approx(0.5 * (1 + 1 + 0.64), abs=1e-6)
    assert out.metrics["vf_clipfrac"].item() == 1
    assert ppo_value_loss(values, old, returns, mask, None).loss_sum.item() == pytest.approx(0.5 * (1 + 1 + 0.25))


def test_kl_estimators():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(lp, lp, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(lp, ref, "k4")
    # k1 and k3 are unbiased: their mean under samples of pi approaches KL(pi || ref)
    pi, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    true_kl = (pi * (pi / q).log()).sum()
    for kind in ("k1", "k3"):
        exact = (pi * kl_penalty(pi.log(), q.log(), kind)).sum()
        assert exact.item() == pytest.approx(true_kl.item(), rel=1e-5)


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, group_size=4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # Bessel-corrected group std = 0.5
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(grpo_advantages(r, 4, scale_rewards=False), torch.tensor([0.75, -0.25, -0.25, -0.25] + [0.0] * 4))
    batch_std = r.std().item()
    assert torch.allclose(grpo_advantages(r, 4, "batch")[:1], torch.tensor([0.75 / (batch_std + 1e-4)]))
    with pytest.raises(ValueError, match="groups"):
        grpo_advantages(r, 3)


def test_grpo_loss_aggregations():
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -3.0])
    # on-policy: ratio = 1, per-token loss = -A
    dapo = grpo_loss(logp, adv, mask)
    assert dapo.loss_sum.item() == pytest.approx(-1 - 1 + 3) and dapo.n_targets.item() == 3
    seq = grpo_loss(logp, adv, mask, loss_type="grpo")
    assert seq.loss_sum.item() == pytest.approx(-1 + 3) and seq.n_targets.item() == 2
    dr = grpo_loss(logp, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert dr.loss_sum.item() == pytest.approx(-2 / 4 + 3 / 4) and dr.n_targets.item() == 2
    dapo.loss_sum.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0, 0.0], [3.0, 0.0, 0.0]]))


def test_grpo_loss_with_kl_and_clipping():
    logp = torch.log(torch.tensor([[0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.9]]))  # ratio 2 on token 0 (clipped at 1.2), 1 on token 1
    ref = torch.log(torch.tensor([[0.25, 0.45]]))
    out = grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 2), old_logprobs=old, ref_logprobs=ref, beta=0.1)
    k3_0 = 0.5 - math.log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log 0.5
    assert out.loss_sum.item() == pytest.approx((-1.2 + 0.1 * k3_0) + (-1.0 + 0.1 * k3_0), abs=1e-6)
    assert out.metrics["clip_ratio/high"].item() == 1 and out.metrics["clip_ratio/low"].item() == 0
    assert out.metrics["kl"].item() == pytest.approx(2 * k3_0, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1)


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    z = torch.tensor([[1e4, 0.0, -float("inf")], [0.0, 0.0, -float("inf")]], requires_grad=True)
    h = entropy_from_logits(z)
    h.sum().backward()
    assert h[0].item() == pytest.approx(0.0, abs=1e-6) and h[1].item() == pytest.approx(math.log(2))
    assert torch.isfinite(z.grad).all()
