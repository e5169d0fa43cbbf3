"""``lmwright.json``: what lmwright writes into every model folder it saves ({task, method, base,
num_labels, id2label, quantize, attn_implementation, objective, pooling, ...}; see
``lmwright.methods.save_trained``, ``lmwright.stages.common.save_final`` and the ``hf`` exporter), with the
one writer of it (:func:`write_meta`, which also writes a causal LM's ``generation_config.json``) and the
one reader of it (:func:`read_meta`).

Every command that rebuilds a model for inference (``lmwright.methods.load_trained``, ``lmwright.load``,
``lmwright serve``, ``lmwright embed``, ``lmwright eval``) reads it here, so they agree on what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "lmwright.json"
GENERATION_FILE = "generation_config.json"
LABEL_TASKS = ("classification", "reward")  # the tasks whose head has named labels (id2label)
# the sampling defaults of a folder lmwright writes (where the model it came from has none)
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128}


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


def id2label_json(config: Any) -> dict[str, Any]:
    """A config's ``id2label`` with string keys, as JSON holds it (readers turn the keys back into ints)."""
    return {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}


def label_meta(config: Any, task: str | None) -> dict[str, Any]:
    """``num_labels`` and ``id2label`` of a classification or reward model's config; ``{}`` for other tasks."""
    if task not in LABEL_TASKS or not getattr(config, "id2label", None):
        return {}
    return {"num_labels": config.num_labels, "id2label": id2label_json(config)}


def write_generation_config(tokenizer: Any, folder: str | Path, source: str | Path | None = None) -> None:
    """``generation_config.json`` of a causal LM: the sampling defaults of ``source``'s generation config
    (a folder; lmwright's ``SAMPLING_DEFAULTS`` where it has none), with eos extended by the chat template's
    stop tokens and the tokenizer's pad and bos ids, so that ``generate`` stops where the model was trained
    to stop."""
    from transformers import GenerationConfig

    from lmwright.data.chat import stop_token_ids

    if source is not None and (Path(source) / GENERATION_FILE).exists():
        gc = GenerationConfig.from_pretrained(str(source))
    else:
        gc = GenerationConfig(**SAMPLING_DEFAULTS)
    eos = gc.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    gc.eos_token_id = eos + [s for s in stop_token_ids(tokenizer) if s not in eos]
    if tokenizer.pad_token_id is not None:
        gc.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gc.bos_token_id = tokenizer.bos_token_id
    gc.save_pretrained(str(folder))


def write_meta(folder: str | Path, meta: dict[str, Any], config: Any = None, tokenizer: Any = None,
               generation_from: str | Path | None = None) -> dict[str, Any]:
    """The one writer of what lmwright adds to a saved model folder: ``lmwright.json`` (``meta``, plus
    ``num_labels``/``id2label`` of ``config`` when given and ``meta["task"]`` has labels) and, given a
    ``tokenizer`` and a causal-lm task, ``generation_config.json`` (see :func:`write_generation_config`;
    ``generation_from`` is the folder whose sampling defaults it keeps). Returns what ``lmwright.json`` holds."""
    meta = {**meta, **label_meta(config, meta.get("task"))}
    if tokenizer is not None and meta.get("task") == "causal-lm":
        write_generation_config(tokenizer, folder, generation_from)
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta
