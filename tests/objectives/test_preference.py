"""DPO family, SimPO, ORPO, KTO: hand-computed values on tiny tensors, edge cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lmwright.objectives.preference import (
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# policy chosen -1, rejected -3, reference -2 / -2, beta 0.5: chosen log-ratio 1, rejected -1, d = 2, beta*d = 1
PC, PR, RC, RR, BETA = t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", softplus(-1.0)),  # -log sigmoid(1)
    ("hinge", 0.0),  # relu(1 - 1)
    ("robust", (0.9 * softplus(-1.0) - 0.1 * softplus(1.0)) / (1 - 2 * 0.1)),
    ("label_smoothed", 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)),
])
def test_dpo_hand_values(loss_type, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=0.1)
    assert out.n_targets.item() == 1
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5)  # beta * 1
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.5)
    assert out.metrics["rewards/margins"].item() == pytest.approx(1.0)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_dpo_hinge_active():
    # d = 0.5 -> relu(1 - 0.5 * 0.5) = 0.75
    out = dpo_loss(t(-1.5), t(-2.0), t(-2.0), t(-2.0), beta=0.5, loss_type="hinge")
    assert out.loss_sum.item() == pytest.approx(0.75)


def test_ipo_is_length_normalised_like_trl():
    # chosen log-ratio 1 over 2 tokens -> 0.5; rejected -1 over 4 tokens -> -0.25; d = 0.75; 1/(2 beta) = 1
    out = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo", chosen_lengths=t(2), rejected_lengths=t(4))
    assert out.loss_sum.item() == pytest.approx((0.75 - 1.0) ** 2)
    raw = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo", ipo_length_normalize=False)
    assert raw.loss_sum.item() == pytest.approx((2.0 - 1.0) ** 2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo")


def test_sigmoid_dpo_equal_logps_is_log2_and_gradient():
    pc = t(-2.0, -5.0).requires_grad_()
    out = dpo_loss(pc, t(-2.0, -5.0), t(-2.0, -5.0), t(-2.0, -5.0), beta=0.1)
    assert out.loss_sum.item() == pytest.approx(2 * math.log(2))
    assert out.metrics["rewards/accuracies"].item() == 0.0  # ties are not correct
    out.loss_sum.backward()
    # d/dpc -log sigmoid(beta d) = -beta * sigmoid(-beta d) = -0.1 * 0.5
    assert torch.allclose(pc.grad, t(-0.05, -0.05))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "label_smoothed", "ipo"])
def test_dpo_extreme_margins_are_finite(loss_type):
    pc = torch.tensor([1e4, -1e4], requires_grad=True)
    z = torch.zeros(2)
    out = dpo_loss(pc, z, z, z, beta=1.0, loss_type=loss_type, label_smoothing=0.1,
                   chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(pc.grad).all()
    if loss_type == "sigmoid":
        assert out.loss_sum.item() == pytest.approx(1e4)  # softplus(1e4) + softplus(-1e4)


def test_dpo_rejects_unknown_type_and_bad_smoothing():
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(PC, PR, RC, RR, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)


def test_simpo_hand_value():
    # beta (avg_w - avg_l) - gamma = 2 * 1 - 0.5 = 1.5
    out = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert out.loss_sum.item() == pytest.approx(softplus(-1.5))
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-2.0)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2.0)
    smoothed = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert smoothed.loss_sum.item() == pytest.approx(0.8 * softplus(-1.5) + 0.2 * softplus(1.5))


def test_orpo_hand_value():
    # P(y_w) = 0.5 -> odds 1, log odds 0; P(y_l) = 0.25 -> odds 1/3; log odds ratio = log 3
    out = orpo_loss(t(1.2), t(math.log(0.5)), t(math.log(0.25)), beta=0.1)
    ratio = math.log(1 / (1 + 1 / 3))  # log sigmoid(log 3) = log 3/4
    assert out.loss_sum.item() == pytest.approx(1.2 - 0.1 * ratio)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(math.log(3))
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(ratio)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5))
    # a scalar (batch-level) nll broadcasts: loss_sum / n == nll - beta * mean(ratio)
    two = orpo_loss(t(1.2), t(math.log(0.5), math.log(0.5)), t(math.log(0.25), math.log(0.25)), beta=0.1)
    assert (two.loss_sum / two.n_targets).item() == pytest.approx(1.2 - 0.1 * ratio)


def test_orpo_near_certain_logps_are_finite():
    c = torch.tensor([-1e-9, -1e-3], requires_grad=True)
    out = orpo_loss(torch.tensor(0.0), c, torch.tensor([-50.0, -1e-7]), beta=0.1)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(c.grad).all()
    x = t(-1e-12, -0.5, -0.7, -30.0)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)


def test_kto_hand_value():
    # log-ratios r = [1, -1]; z0 = 0.25; beta 0.5
    # desirable: 1 - sigmoid(0.5 * (1 - 0.25)); undesirable (weight 2): 2 * (1 - sigmoid(0.5 * (0.25 + 1)))
    sig = lambda x: 1 / (1 + math.exp(-x))
    out = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.25, beta=0.5,
                   desirable_weight=1.0, undesirable_weight=2.0)
    assert out.n_targets.item() == 2
    assert out.loss_sum.item() == pytest.approx((1 - sig(0.375)) + 2 * (1 - sig(0.625)))
    assert out.means["rewards/chosen"].item() == pytest.approx(0.5)
    assert out.means["rewards/rejected"].item() == pytest.approx(-0.5)
    assert out.means["rewards/margins"].item() == pytest.approx(1.0)
    assert out.metrics["desirable"].item() == 1 and out.metrics["undesirable"].item() == 1


def test_kto_kl_clamped_and_detached_and_one_class():
    pol = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert kto_kl_estimate(pol, t(-1.5, -1.5).float()).item() == 0.0  # mean 0 -> clamp
    z = kto_kl_estimate(t(1.0, 0.0), t(0.0, 0.0))
    assert z.item() == pytest.approx(0.5) and not z.requires_grad
    # a negative estimate is clamped to 0: desirable loss with r = 0 is 1 - sigmoid(0) = 0.5
    out = kto_loss(pol, pol.detach(), torch.tensor([True, True]), -3.0, beta=0.1)
    assert out.loss_sum.item() == pytest.approx(1.0)
    assert "rewards/rejected" not in out.means
    out.loss_sum.backward()
    assert torch.allclose(pol.grad, torch.full((2,), -0.1 * 0.25))  # -beta * s(0) * (1 - s(0))


def test_kto_extreme_is_finite():
    pol = torch.tensor([1e4, -1e4], requires_grad=True)
    out = kto_loss(pol, torch.zeros(2), torch.tensor([True, False]), 0.0, beta=1.0)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(pol.grad).all()
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-6)
