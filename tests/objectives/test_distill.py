"""Knowledge distillation: forward / reverse KL, GKD's generalized JSD, T^2 scaling, CE mixing, masking."""

from __future__ import annotations

import math

import pytest
import torch

from lmwright.objectives.distill import distill_loss, divergence

# student uniform over 2 classes, teacher [0.75, 0.25]
S = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
TEACH = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
FWD = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
REV = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
# beta = 0.5: M = 0.5 teacher + 0.5 student = [0.625, 0.375]
JSD = 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)) \
    + 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))


@pytest.mark.parametrize("kind, expected", [("forward_kl", FWD), ("reverse_kl", REV), ("jsd", JSD)])
def test_classifier_divergences(kind, expected):
    out = distill_loss(S, TEACH, kind=kind)
    assert out.n_targets.item() == 1
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-6)


def test_jsd_endpoints_are_the_kls():
    assert divergence(S, TEACH, "jsd", beta=0.0).item() == pytest.approx(FWD, abs=1e-6)
    assert divergence(S, TEACH, "jsd", beta=1.0).item() == pytest.approx(REV, abs=1e-6)


def test_temperature_scaling_and_ce_mixing():
    # T = 2: teacher logits / 2 = [log 3 / 2, 0] -> p = [sqrt3, 1] / (1 + sqrt3); student stays uniform
    r3 = math.sqrt(3.0)
    p = [r3 / (1 + r3), 1 / (1 + r3)]
    kl_t2 = sum(pi * math.log(pi / 0.5) for pi in p)
    out = distill_loss(S, TEACH, kind="forward_kl", temperature=2.0)
    assert out.loss_sum.item() == pytest.approx(4 * kl_t2, abs=1e-6)
    assert distill_loss(S, TEACH, temperature=2.0, scale_by_t2=False).loss_sum.item() == pytest.approx(kl_t2)
    # alpha = 0.3 with label 0: 0.3 * KL + 0.7 * CE, CE of uniform student = log 2
    mixed = distill_loss(S, TEACH, torch.tensor([0]), alpha=0.3)
    assert mixed.loss_sum.item() == pytest.approx(0.3 * FWD + 0.7 * math.log(2), abs=1e-6)
    assert mixed.metrics["ce"].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="labels"):
        distill_loss(S, TEACH, alpha=0.5)


def test_causal_lm_shift_and_ignore():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    # position t predicts label t+1: labels[0, 2] = 3 makes position 1 of row 0 a target, labels[1, 3]
    # makes position 2 of row 1 a target; every other label is ignored
    labels = torch.full((2, 4), -100)
    labels[0, 2], labels[1, 3] = 3, 1
    out = distill_loss(student, teacher, labels, kind="reverse_kl")
    assert out.n_targets.item() == 2
    expected = divergence(student[0, 1], teacher[0, 1], "reverse_kl") + divergence(student[1, 2], teacher[1, 2],
                                                                                    "reverse_kl")
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    same = distill_loss(student, student.clone(), labels)
    assert same.loss_sum.item() == pytest.approx(0.0, abs=1e-6)
    unlabelled = distill_loss(student, teacher)  # every shifted position counts
    assert unlabelled.n_targets.item() == 2 * 3


def test_gradients_and_extreme_logits():
    student = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 0.0, 1e4]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        student.grad = None
        out = distill_loss(student, teacher, torch.tensor([1]), kind=kind, alpha=0.5, temperature=2.0)
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum) and torch.isfinite(student.grad).all(), kind
        assert student.grad.abs().sum() > 0
