"""Options of the one training loop (the ``train:`` section of every stage config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmwright.config import ConfigError, opt


@dataclass
class TrainConfig:
    output_dir: str = opt("runs", "folder that holds run folders")
    run_name: str | None = opt(None, "run folder name; default <stage>-<timestamp>, or the newest unfinished run of "
                                     "the same config. Reusing a name resumes it")
    seed: int = opt(0, "seed for model init, data order, dropout and masking")
    max_steps: int = opt(200, "optimizer steps to train (ignored when epochs is set)")
    epochs: float | None = opt(None, "train for this many passes over the data instead of max_steps")
    micro_batch_size: int = opt(8, "examples (or packed rows) per forward pass per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step; global batch = micro x accum x processes")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = opt(10, "linear warm-up steps")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate decay after warm-up")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "autocast precision; auto = bf16 where it trains this model faster: CUDA with bf16, a CPU "
                "with AMX, or a CPU with avx512_bf16 where a short cached probe on the model measures it >= 1.25x "
                "faster than fp32 (logged, in run.json); else fp32")
    compile: bool = opt(False, "torch.compile the model")
    log_every: int = opt(10, "log metrics every N optimizer steps")
    eval_every: int = opt(50, "evaluate on validation every N steps (0 = only at the end)")
    eval_max_batches: int | None = opt(None, "cap the validation batches per evaluation")
    save_every: int = opt(100, "write a checkpoint every N steps (0 = only at the end)")
    keep_last: int = opt(2, "keep the last K checkpoints (plus the best)")
    metric_for_best: str = opt("val_loss", "validation metric that selects the best checkpoint")
    greater_is_better: bool | None = opt(None, "direction of metric_for_best; default: false for *loss*/*ppl*, else true")
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0 = never)")
    load_best_at_end: bool = opt(True, "final/ holds the best checkpoint's weights, not the last")
    resume: str = opt("auto", "auto: continue the run's newest checkpoint if any (the newest unfinished run of this "
                              "config without run_name; a changed config or data is refused); force: continue "
                              "even if the config or data changed; never; or a checkpoint folder")
    tensorboard: bool = opt(False, "also write TensorBoard event files (needs tensorboard installed)")
    progress: bool = opt(True, "show a live progress bar")
    nproc: int = opt(1, "processes for data-parallel training (CLI --nproc launches them)")

    def check(self) -> None:
        import math

        for name in ("epochs", "lr", "min_lr_ratio", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"train.{name} must be a finite number, got {v}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}; leave it unset to train max_steps")
        if self.max_steps < 1 and not self.epochs:
            raise ConfigError("train.max_steps must be >= 1 (or set train.epochs)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0 (max_grad_norm 0 = no "
                              "clipping)")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {self.betas}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1 (the checkpoint to resume from), got {self.keep_last}")
        for name in ("warmup_steps", "eval_every", "save_every", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError(f"train.eval_max_batches must be >= 1 (or unset), got {self.eval_max_batches}")
        if self.nproc < 1:
            raise ConfigError(f"train.nproc must be >= 1, got {self.nproc}")

    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        m = self.metric_for_best.lower()
        return not ("loss" in m or "ppl" in m or "perplexity" in m)
