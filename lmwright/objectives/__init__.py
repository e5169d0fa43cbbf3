"""Losses, each written once. A loss returns a :class:`LossOutput` holding a *sum* over its target
units (tokens, pairs, examples) and the number of those units; the engine divides by the number of
units in the whole optimizer step (all micro-batches, all processes), so gradient accumulation
and packing never change the maths."""

from lmwright.objectives.base import LossOutput, token_cross_entropy

__all__ = ["LossOutput", "token_cross_entropy"]
