"""Sequence classification loss: cross-entropy over examples, optionally class-weighted."""

from __future__ import annotations

from lmwright.objectives.base import LossOutput


def classification_loss(weights=None):
    """Cross-entropy summed over examples; with class weights the count is the weight sum, so the
    engine's sum / count is the weighted mean."""
    import torch.nn.functional as F

    def loss(model, batch: dict) -> LossOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, C)
        y = batch["labels"]
        w = weights.to(logits.device) if weights is not None else None
        loss_sum = F.cross_entropy(logits, y, weight=w, reduction="sum")
        n = w[y].sum() if w is not None else y.new_tensor(y.numel(), dtype=logits.dtype)
        return LossOutput(loss_sum=loss_sum, n_targets=n)

    return loss
