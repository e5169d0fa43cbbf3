"""The one training loop, checkpoint/resume, run folders and metrics."""

from lmwright.engine.config import TrainConfig
from lmwright.engine.loop import TrainingDiverged, TrainResult, evaluate_loss, train
from lmwright.engine.run import Run, read_metrics

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "Run", "evaluate_loss", "read_metrics", "train"]
