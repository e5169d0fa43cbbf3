"""``full``: every parameter trains; saved as a plain Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmwright.methods.base import ALL_TASKS, FLOAT, METHODS, Compat, PlainModelMethod


@dataclass
class FullOptions:
    """``full`` has no options."""


@METHODS.register("full")
class Full(PlainModelMethod):
    name = "full"
    Options = FullOptions
    compat = Compat(ALL_TASKS, FLOAT, "every weight trains; quantized weights cannot take gradient steps")
    trains_all = True

    def apply(self, model: Any, opts: FullOptions, task: str) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
