"""``full``: every parameter trains; saved as a plain Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmwright.methods.base import METHODS, MethodConfig


@METHODS.register("full")
class Full:
    name = "full"
    merges = True

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def merge(self, model: Any) -> Any:
        return model
