"""Knowledge distillation on logits: forward KL (Hinton et al. 2015), reverse KL (Gu et al. 2024, MiniLLM)
and the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), optionally mixed with
hard-label cross-entropy.

Works at token level for causal LMs (logits (B, T, V), labels (B, T) with -100 ignored, shifted) and at
example level for classifiers (logits (B, C), labels (B,)). One unit = one target token / example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmwright.objectives.base import IGNORE_INDEX, LossOutput

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; ``0 * log 0`` is 0 (``F.kl_div`` with log_target)."""
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions at ``temperature`` (no T^2).

    - ``forward_kl``: KL(teacher || student), mean-seeking (Hinton et al. 2015).
    - ``reverse_kl``: KL(student || teacher), mode-seeking (MiniLLM).
    - ``jsd``: ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)``, ``M = beta * teacher +
      (1 - beta) * student`` (GKD Eq. 1 as implemented in trl's ``GKDTrainer.generalized_jsd_loss``);
      ``beta=0`` gives forward KL and ``beta=1`` reverse KL, as in trl.

    Returns the input shape without the last (vocabulary / class) dim, in float32.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl_from_logprobs(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl_from_logprobs(s, t)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)  # log mixture
    return beta * kl_from_logprobs(t, m) + (1 - beta) * kl_from_logprobs(s, m)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                 *, kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0, beta: float = 0.5,
                 shift: bool | None = None, scale_by_t2: bool = True) -> LossOutput:
    """``alpha * T^2 * D(teacher, student; T) + (1 - alpha) * CE(student, labels)`` summed over target units.

    - causal LM: logits (B, T, V), labels (B, T); ``shift`` (default ``True`` for 3-D logits) drops the
      last position so position t is scored against label t+1; positions with label -100 are ignored.
    - classifier: logits (B, C), labels (B,); ``shift`` defaults to ``False``; -100 labels are ignored too.
    - ``labels=None``: every position is a unit (after the shift); ``alpha`` must be 1.

    ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015, Sec. 2);
    ``scale_by_t2=False`` leaves it out (trl's GKD uses no such factor; identical at T=1). The CE term
    is always at temperature 1. Metrics: ``kd`` (unscaled divergence) and ``ce`` (if labels), summed.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the vocabularies must match")
    if labels is None and alpha != 1.0:
        raise ValueError("alpha < 1 mixes in hard-label cross-entropy and needs labels")
    if shift is None:
        shift = student_logits.dim() == 3
    if shift:
        student_logits = student_logits[:, :-1, :]  # (B, T-1, V)
        teacher_logits = teacher_logits[:, :-1, :]  # (B, T-1, V)
        labels = labels[:, 1:] if labels is not None else None  # (B, T-1)
    V = student_logits.shape[-1]
    flat_s = student_logits.reshape(-1, V)  # (N, V)
    flat_t = teacher_logits.reshape(-1, V)  # (N, V)
    if labels is not None:
        keep = labels.reshape(-1) != IGNORE_INDEX  # (N,)
        flat_s, flat_t, flat_y = flat_s[keep], flat_t[keep], labels.reshape(-1)[keep]
    kd = divergence(flat_s, flat_t, kind, temperature, beta)  # (N,)
    scale = temperature ** 2 if scale_by_t2 else 1.0
    per_unit = alpha * scale * kd
    metrics = {"kd": kd.detach().sum()}
    if labels is not None:
        ce = F.cross_entropy(flat_s.float(), flat_y, reduction="none")  # (N,)
        metrics["ce"] = ce.detach().sum()
        if alpha != 1.0:
            per_unit = per_unit + (1 - alpha) * ce
    return LossOutput(loss_sum=per_unit.sum(), n_targets=torch.tensor(per_unit.shape[0], device=per_unit.device),
                      metrics=metrics)
