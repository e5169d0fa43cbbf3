"""Preference-optimisation losses on per-sequence log-probs: the DPO family, SimPO, ORPO and KTO.

Every function is pure tensor maths: the caller computes the (summed or averaged) log-probs of each
completion, e.g. with :func:`lmwright.objectives.base.sequence_logprobs`. Each loss returns a
:class:`LossOutput` whose unit is one *record*: one (chosen, rejected) pair for the paired losses, one
completion for KTO. Reward metrics are sums over the same records (the engine divides by the count).

Definitions follow trl 1.16 (``trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss``,
``trl/trainer/kto_trainer.py::KTOTrainer._compute_loss``,
``trl/experimental/orpo/orpo_trainer.py::ORPOTrainer.odds_ratio_loss``,
``trl/experimental/cpo/cpo_trainer.py::CPOTrainer.cpo_loss``); the tests compare with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmwright.objectives.base import LossOutput

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "label_smoothed")


def _paired_output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                   extra: dict[str, torch.Tensor] | None = None) -> LossOutput:
    """LossOutput over pairs: loss and reward metrics summed over the batch of pairs."""
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    metrics = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
    }
    metrics.update(extra or {})
    return LossOutput(loss_sum=losses.sum(), n_targets=torch.tensor(losses.shape[0], device=losses.device),
                      metrics=metrics)


def dpo_per_example(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                    ipo_length_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards ``beta * (log pi - log pi_ref)``.

    All inputs are (B,) sequence log-probs summed over completion tokens. With
    ``d = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    - ``sigmoid``: DPO, Rafailov et al. 2023, Eq. 7: ``-log sigmoid(beta d)``.
    - ``hinge``: SLiC-style hinge, Zhao et al. 2023: ``relu(1 - beta d)``.
    - ``ipo``: Azar et al. 2023, Eq. 17: ``(d - 1 / (2 beta))^2``. trl divides each log-ratio by the
      completion length before taking the difference (confirmed with the IPO authors, see the comment in
      ``DPOTrainer._compute_loss``); ``ipo_length_normalize=True`` (default) does the same and needs
      ``chosen_lengths`` / ``rejected_lengths`` (token counts, clamped to >= 1). Set it to ``False`` to use
      the log-probs as given (e.g. when they are already averages).
    - ``robust``: Chowdhury et al. 2024 (rDPO), Eq. 8, unbiased under label-flip rate ``eps``:
      ``((1 - eps) * -log s(beta d) - eps * -log s(-beta d)) / (1 - 2 eps)``.
    - ``label_smoothed``: conservative DPO (cDPO, Mitchell 2023): the expected DPO loss when a label is
      flipped with probability ``eps``: ``(1 - eps) * -log s(beta d) + eps * -log s(-beta d)``.

    Rewards (for metrics) are ``beta * log-ratio`` without length normalisation, as in trl.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type '{loss_type}'; choose one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if ipo_length_normalize:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("loss_type='ipo' averages log-ratios per token (as trl does): pass "
                                 "chosen_lengths and rejected_lengths, or set ipo_length_normalize=False")
            delta = (chosen_logratios / chosen_lengths.clamp(min=1)
                     - rejected_logratios / rejected_lengths.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:  # label_smoothed
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"loss_type='label_smoothed' needs 0 <= label_smoothing <= 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ipo_length_normalize: bool = True) -> LossOutput:
    """DPO-family loss summed over pairs (see :func:`dpo_per_example` for the formulas)."""
    losses, chosen_rewards, rejected_rewards = dpo_per_example(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing, chosen_lengths, rejected_lengths, ipo_length_normalize)
    return _paired_output(losses, chosen_rewards, rejected_rewards)


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free on length-averaged log-probs (B,):
    ``-log sigmoid(beta * (avg_w - avg_l) - gamma)``; ``label_smoothing`` gives the conservative form as in
    trl's ``CPOTrainer.cpo_loss(loss_type='simpo')``. Rewards are ``beta * avg log-prob``."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _paired_output(losses, beta * chosen_avg_logps, beta * rejected_avg_logps)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -log 2 (Maechler 2012). Each branch gets a safe
    input where it is not selected, so the unused branch cannot put ``0 * inf = NaN`` into the gradient."""
    small = x < -0.6931471805599453
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, -1.0))))
    near = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, -0.5), x)))
    return torch.where(small, far, near)


def orpo_loss(chosen_nll: torch.Tensor, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, Eqs. 4-7): ``L = L_SFT - beta * log sigmoid(log odds(y_w) - log odds(y_l))``
    with ``odds(y) = P(y) / (1 - P(y))`` and ``log P(y)`` the length-averaged log-prob (B,).

    ``chosen_nll`` is the SFT term on the chosen completions: either per pair (B,) (e.g. each
    completion's mean token NLL) or a scalar (trl uses the token-mean NLL over the whole batch, in
    which case ``loss_sum / n_targets`` equals trl's loss). The odds are computed in log space with
    :func:`log1mexp`, so log-probs close to 0 do not produce NaN. Rewards are ``beta * avg log-prob``.
    """
    chosen_avg_logps = chosen_avg_logps.float()
    rejected_avg_logps = rejected_avg_logps.float()
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    ratio = F.logsigmoid(log_odds)  # (B,)
    losses = chosen_nll - beta * ratio  # (B,), a scalar nll broadcasts
    extra = {"log_odds_ratio": ratio.detach().sum(), "log_odds_chosen": log_odds.detach().sum(),
             "nll_loss": torch.broadcast_to(chosen_nll.detach(), ratio.shape).sum()}
    return _paired_output(losses, beta * chosen_avg_logps, beta * rejected_avg_logps, extra)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 (Ethayarajh et al. 2024, Eq. 7): the batch mean of
    ``log pi(y'|x) - log pi_ref(y'|x)`` over mismatched (x, y') pairs, clamped at 0 and detached.
    Under data parallelism, average the unclamped mean over processes before clamping (as trl does)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, is_desirable: torch.Tensor,
             kl_estimate: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO on unpaired records (Ethayarajh et al. 2024, Eq. 7), one unit per record (B,):

    - desirable: ``w_D * (1 - sigmoid(beta * (r - z0)))``
    - undesirable: ``w_U * (1 - sigmoid(beta * (z0 - r)))``

    with ``r = log pi(y|x) - log pi_ref(y|x)`` and ``z0 = kl_estimate`` (see :func:`kto_kl_estimate`; used
    detached and clamped at 0). ``1 - sigmoid(x)`` is computed as ``sigmoid(-x)``. The loss mean over
    records equals trl's ``losses.nanmean()``. Per-class reward means go to ``means`` (they are means
    over the desirable / undesirable records of this batch, absent when a class is absent).
    """
    desirable = is_desirable.bool()
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - ref_logps  # (B,)
    losses = torch.where(desirable, desirable_weight * torch.sigmoid(-beta * (logratios - z0)),
                         undesirable_weight * torch.sigmoid(-beta * (z0 - logratios)))
    rewards = beta * logratios.detach().float()
    n_d, n_u = desirable.sum(), (~desirable).sum()
    means: dict[str, torch.Tensor] = {"kl": z0.float()}
    if n_d > 0:
        means["rewards/chosen"] = rewards[desirable].mean()
    if n_u > 0:
        means["rewards/rejected"] = rewards[~desirable].mean()
    if n_d > 0 and n_u > 0:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    metrics = {"desirable": n_d.float(), "undesirable": n_u.float()}
    return LossOutput(loss_sum=losses.sum(), n_targets=torch.tensor(losses.shape[0], device=losses.device),
                      metrics=metrics, means=means)
