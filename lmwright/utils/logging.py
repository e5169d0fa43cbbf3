"""Logging set-up and the silencing of noisy third-party import-time messages."""

from __future__ import annotations

import logging
import os
import warnings

_DONE = False


def quiet_third_party() -> None:
    """Silence import-time noise that says nothing to our users (idempotent).

    torchao, when installed, is imported by transformers' quantizer registry and logs missing
    CUDA kernels on CPU machines; torch's pytree logs a deprecation for torchao's enums. Remove
    when torchao stops logging on import (checked with torchao 0.18).
    """
    global _DONE
    if _DONE:
        return
    _DONE = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # bitsandbytes on AVX512-BF16 CPUs offers a hub-downloaded kernel; we never download, so the
    # warning that it is missing is noise (bitsandbytes 0.50; its built-in CPU path is used).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")
    # peft 0.21 calls transformers' deprecated is_gradient_checkpointing (transformers 5.x)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def get_logger(name: str = "lmwright") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("lmwright").handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("lmwright")
        root.addHandler(h)
        root.setLevel(os.environ.get("LMWRIGHT_LOG", "INFO"))
        root.propagate = False
    return logger


def quiet_transformers() -> None:
    """No per-save 'Writing model shards' bars inside our own progress bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
