"""A frozen base held in bf16 while an adapter trains under bf16 autocast.

Under ``mixed_precision: bf16`` every matmul of a frozen fp32 weight runs on a bf16 copy that autocast makes
again in every forward (and keeps for the backward); holding the frozen weights in bf16 in the first place
gives the same matmuls without the casts and halves the base's memory (SmolLM2-135M: 538 -> 269 MB). Only
weights that do not train and that the run does not save change: an adapter method writes its own parameters
(fp32) and points at the base folder, so what ``final/`` loads is unchanged. The norms' weights, also frozen,
are then bf16 too: their products are rounded to bf16 as autocast's matmul inputs are.
"""

from __future__ import annotations


def hold_frozen_in(model, dtype) -> int:
    """Cast every frozen floating-point fp32 parameter of ``model`` to ``dtype`` in place; the bytes saved."""
    import torch

    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved
