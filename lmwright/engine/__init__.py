"""The one training loop, checkpoint/resume, run folders and metrics.

Names are resolved lazily so that importing a config class (``lmwright.engine.config``) does not
import torch: `lmwright --help` builds every stage's options without loading it.
"""

from typing import Any

from lmwright.engine.config import TrainConfig
from lmwright.engine.run import Run, read_metrics

__all__ = ["Run", "TrainConfig", "TrainResult", "TrainingDiverged", "evaluate_loss", "read_metrics", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "TrainingDiverged", "evaluate_loss", "train"):
        from lmwright.engine import loop

        return getattr(loop, name)
    raise AttributeError(name)
