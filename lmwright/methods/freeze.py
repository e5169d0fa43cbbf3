"""``freeze``: train only the last N transformer blocks, named extra parameters and the task head.

Why a method of its own: on small data, training the top of a network (plus a new head) adapts it
with far less forgetting and memory than full fine-tuning, and the result is still a plain model, so
it saves as a full Hugging Face folder and "merges" trivially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmwright.config import ConfigError, opt
from lmwright.methods.base import (
    ALL_TASKS,
    FLOAT,
    METHODS,
    Compat,
    PlainModelMethod,
    find_blocks,
    head_module_names,
)


@dataclass
class FreezeOptions:
    freeze_last_n: int = opt(2, "train only the last N transformer blocks (0 = none)")
    trainable_modules: list[str] = opt(  # noqa: RUF009 (opt gives lists a default_factory)
        [], "extra parameters to train, matched by name substring, e.g. [norm, embed_tokens]")
    modules_to_save: list[str] = opt([], "")  # noqa: RUF009 (a common key: help in CommonOptions)

    def check(self) -> None:
        if self.freeze_last_n < 0:
            raise ConfigError(f"method.freeze_last_n must be >= 0, got {self.freeze_last_n}")


@METHODS.register("freeze")
class Freeze(PlainModelMethod):
    name = "freeze"
    Options = FreezeOptions
    compat = Compat(ALL_TASKS, FLOAT, "last method.freeze_last_n blocks + method.trainable_modules + task head")

    def check_model(self, opts: FreezeOptions, meta_model: Any, task: str, where: str) -> None:
        n_blocks = len(find_blocks(meta_model))
        if opts.freeze_last_n > n_blocks:
            raise ConfigError(f"method.freeze_last_n={opts.freeze_last_n} but the model has {n_blocks} "
                              f"blocks; set method.freeze_last_n <= {n_blocks}")

    def apply(self, model: Any, opts: FreezeOptions, task: str) -> Any:
        blocks = find_blocks(model)
        if opts.freeze_last_n > len(blocks):
            raise ConfigError(f"method.freeze_last_n={opts.freeze_last_n} but the model has {len(blocks)} blocks")
        model.requires_grad_(False)
        for block in blocks[len(blocks) - opts.freeze_last_n:]:
            block.requires_grad_(True)
        for head in head_module_names(model, task) + list(opts.modules_to_save):
            model.get_submodule(head).requires_grad_(True)
        matched = set()
        for name, p in model.named_parameters():
            for pattern in opts.trainable_modules:
                if pattern in name:
                    p.requires_grad_(True)
                    matched.add(pattern)
        unmatched = [m for m in opts.trainable_modules if m not in matched]
        if unmatched:
            raise ConfigError(f"method.trainable_modules {unmatched} match no parameter name")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"method.name={self.name} leaves nothing to train: set method.freeze_last_n >= 1 or "
                              "method.trainable_modules")
        return model
