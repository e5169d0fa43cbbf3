"""``lmwright.json``: what lmwright writes into every model folder it saves ({task, method, base,
num_labels, id2label, quantize, attn_implementation, objective, pooling, ...}; see
``lmwright.methods.save_trained`` and ``lmwright.stages.common.save_final``) and the one reader of it.

Every command that rebuilds a model for inference (``lmwright.methods.load_trained``, ``lmwright.load``,
``lmwright serve``, ``lmwright embed``, ``lmwright eval``) reads it here, so they agree on what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "lmwright.json"


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``lmwright.json`` of a resolved model folder (run folders resolve to ``final/`` first, see
    ``lmwright.models.resolve_model_path``); ``{}`` for folders lmwright did not write."""
    from lmwright.config import ConfigError

    f = Path(folder) / META_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f}: not readable JSON ({e}); restore it from the run or delete it to load the folder "
                          "as a plain Hugging Face model") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{f}: expected a JSON object, got {type(meta).__name__}")
    return meta
