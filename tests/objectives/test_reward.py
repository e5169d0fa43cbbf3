"""Pairwise Bradley-Terry reward loss: hand-computed values, margin, centring, stability."""

from __future__ import annotations

import math

import pytest
import torch

from lmwright.objectives.reward import pairwise_accuracy, pairwise_reward_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_values():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([[1.0], [1.0]])  # (B,) and (B, 1) both accepted
    out = pairwise_reward_loss(rc, rr)
    # -log sigmoid(1) - log sigmoid(-1)
    assert out.loss_sum.item() == pytest.approx(softplus(-1.0) + softplus(1.0))
    assert out.n_targets.item() == 2
    assert out.metrics["accuracy"].item() == 1.0 and out.metrics["margin"].item() == pytest.approx(0.0)
    with_margin = pairwise_reward_loss(rc, rr, margin=torch.tensor([0.5, 0.5]))
    assert with_margin.loss_sum.item() == pytest.approx(softplus(-0.5) + softplus(1.5))
    centred = pairwise_reward_loss(rc, rr, center_rewards_coefficient=0.1)
    assert centred.loss_sum.item() == pytest.approx(softplus(-1.0) + softplus(1.0) + 0.1 * (3 ** 2 + 1 ** 2))


def test_equal_rewards_give_log2_and_gradients():
    rc = torch.zeros(3, requires_grad=True)
    out = pairwise_reward_loss(rc, torch.zeros(3))
    assert out.loss_sum.item() == pytest.approx(3 * math.log(2))
    out.loss_sum.backward()
    assert torch.allclose(rc.grad, torch.full((3,), -0.5))  # -sigmoid(-0)
    assert pairwise_accuracy(torch.zeros(3), torch.zeros(3)).item() == 0.0
    assert pairwise_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 0.5


def test_extreme_rewards_finite():
    rc = torch.tensor([1e4, -1e4], requires_grad=True)
    out = pairwise_reward_loss(rc, torch.zeros(2))
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(1e4) and torch.isfinite(rc.grad).all()
