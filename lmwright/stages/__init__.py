"""Stages: one file per stage, each registered in ``STAGES`` as an object with ``name``, ``Config``
(its dataclass), ``check(cfg)`` (everything `lmwright validate` can verify without training) and
``run(cfg) -> Path`` (the run folder)."""

from lmwright.stages.common import STAGES

__all__ = ["STAGES"]
