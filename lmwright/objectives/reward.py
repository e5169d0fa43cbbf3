"""Pairwise reward-model loss (Bradley-Terry), as in InstructGPT (Ouyang et al. 2022, Eq. 1) and trl's
``RewardTrainer.compute_loss``; the margin term is Llama 2's (Touvron et al. 2023, Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmwright.objectives.base import LossOutput


def pairwise_reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                         margin: torch.Tensor | float | None = None,
                         center_rewards_coefficient: float | None = None) -> LossOutput:
    """``-log sigmoid(r_c - r_r - margin)`` summed over pairs; one unit per pair.

    ``rewards_*`` are (B,) or (B, 1) scalar rewards. ``margin`` (scalar or (B,)) asks the chosen reward to
    exceed the rejected one by at least that much. ``center_rewards_coefficient`` adds
    ``c * (r_c + r_r)^2`` per pair (Eisenstein et al. 2023), which keeps rewards centred on zero; trl adds
    ``c * mean((r_c + r_r)^2)``, the same thing after dividing by the number of pairs.
    Metrics (sums over pairs): ``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r).
    """
    r_c = rewards_chosen.reshape(-1).float()  # (B,)
    r_r = rewards_rejected.reshape(-1).float()  # (B,)
    diff = r_c - r_r
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (r_c + r_r) ** 2
    metrics = {"accuracy": (diff > 0).float().detach().sum(), "margin": diff.detach().sum()}
    return LossOutput(loss_sum=losses.sum(), n_targets=torch.tensor(losses.shape[0], device=losses.device),
                      metrics=metrics)


def pairwise_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen reward is strictly higher (ties count as wrong, as in trl)."""
    return (rewards_chosen.reshape(-1) > rewards_rejected.reshape(-1)).float().mean()
