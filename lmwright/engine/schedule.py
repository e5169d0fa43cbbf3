"""Learning-rate schedules: linear warm-up then cosine / linear decay to ``min_lr_ratio``; one home."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup: int, total: int, kind: str, min_ratio: float):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, kind, min_ratio))
