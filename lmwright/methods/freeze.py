"""``freeze``: train only the last N transformer blocks, named extra parameters and the task head.

Why a method of its own: on small data, training the top of a network (plus a new head) adapts it
with far less forgetting and memory than full fine-tuning, and the result is still a plain model, so
it saves as a full Hugging Face folder and "merges" trivially.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.methods.base import METHODS, MethodConfig, find_blocks, head_module_names


@METHODS.register("freeze")
class Freeze:
    name = "freeze"
    merges = True

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any:
        blocks = find_blocks(model)
        if cfg.freeze_last_n > len(blocks):
            raise ConfigError(f"method.freeze_last_n={cfg.freeze_last_n} but the model has {len(blocks)} blocks")
        model.requires_grad_(False)
        for block in blocks[len(blocks) - cfg.freeze_last_n:]:
            block.requires_grad_(True)
        for head in head_module_names(model, task) + list(cfg.modules_to_save):
            model.get_submodule(head).requires_grad_(True)
        matched = set()
        for name, p in model.named_parameters():
            for pattern in cfg.trainable_modules:
                if pattern in name:
                    p.requires_grad_(True)
                    matched.add(pattern)
        unmatched = [m for m in cfg.trainable_modules if m not in matched]
        if unmatched:
            raise ConfigError(f"method.trainable_modules {unmatched} match no parameter name")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("method.name=freeze leaves nothing to train: set method.freeze_last_n >= 1 or "
                              "method.trainable_modules")
        return model

    def save(self, model: Any, out_dir: Path, base_path: str | None = None) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def merge(self, model: Any) -> Any:
        return model
