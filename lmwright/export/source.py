"""What an export starts from: resolve the folder, check it cheaply, load it, fold adapters in.

``inspect_source`` reads only JSON files, so every "cannot export this" error (no tokenizer, an
adapter whose method cannot merge, a missing base folder) is raised before a weight is loaded or a
byte is written. (A GGUF file as the model or an adapter's base is the exception: it is converted to
a Hugging Face folder first, once, and cached; see ``lmwright.models.gguf_import``.) ``load_source`` goes through ``lmwright.methods.load_trained`` so that every folder
lmwright writes (plain, peft adapter, bottleneck adapter, qat) loads the way it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.export import ExportError, Source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def inspect_source(model: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(resolved folder, lmwright.json metadata + derived keys, the base model's config.json).

    ``meta`` gains ``task``, ``adapter`` (the method whose adapter folder it is, or None) and ``base_dir``.
    """
    from lmwright.config import ConfigError
    from lmwright.methods import METHODS, folder_method, get_method
    from lmwright.models.introspect import task_of
    from lmwright.models.load import resolve_model_path
    from lmwright.models.meta import META_FILE

    try:
        p = resolve_model_path(model)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    meta = _read_json(p / META_FILE) if (p / META_FILE).exists() else {}
    base = meta.get("base")
    try:
        folder = folder_method(p)  # the method whose files the folder holds (JSON only), None for a plain model
    except ConfigError as e:
        raise ExportError(str(e)) from None
    exact = folder is not None and folder.reads(p) == 2  # else a folder its loader reads, written by another tool
    adapter = None if folder is None else folder.name if exact else "unrecognised adapter"
    if folder is not None:
        base = base or folder.base_of(p)
        if exact and not folder.merges:
            raise ExportError(_no_merge(p, folder.name))
    method = meta.get("method")
    if adapter and method in METHODS and not get_method(method).merges:
        raise ExportError(_no_merge(p, method))
    if adapter:
        if base and Path(base).is_file():  # a .gguf base: the folder converted from it (cached)
            try:
                base = str(resolve_model_path(base))
            except ConfigError as e:
                raise ExportError(f"{p}: its base {e}") from None
        if not base or not Path(base).is_dir():
            raise ExportError(f"{p} is an adapter whose base model folder '{base}' does not exist; export needs "
                              "the base weights to merge into (fix 'base' in lmwright.json or "
                              "base_model_name_or_path in adapter_config.json)")
        config_dir = Path(base)
    else:
        config_dir = p
    if not (config_dir / "config.json").exists():
        raise ExportError(f"{config_dir} has no config.json: not a model folder (give a run, checkpoint, Hugging "
                          "Face or adapter folder)")
    config = _read_json(config_dir / "config.json")
    tok_dirs = [d for d in (p, p.parent / "tokenizer", Path(base) if base else None) if d is not None]
    if not any((d / "tokenizer_config.json").exists() for d in tok_dirs):
        raise ExportError(f"no tokenizer found for {p} (looked in {', '.join(str(d) for d in tok_dirs)}); an "
                          "exported model must ship its tokenizer: save one next to the model "
                          "(tokenizer.save_pretrained) and export again")
    meta = {**meta, "task": task_of(meta, config), "adapter": adapter, "base_dir": str(config_dir)}
    return p, meta, config


def _no_merge(p: Path, method: str) -> str:
    from lmwright.methods import get_method
    from lmwright.methods.base import mergeable_names

    return (f"{p}: method '{method}' cannot be merged into the base weights ({get_method(method).no_merge_reason}), "
            f"so it cannot be exported as a plain model; serve the adapter folder as it is, or train with "
            f"{mergeable_names()}")


def load_source(model: str | Path, meta: dict[str, Any]) -> Source:
    """Load the model for inference (adapter attached, eval mode) with its tokenizer."""
    from lmwright.config import ConfigError
    from lmwright.methods import load_trained
    from lmwright.models.load import resolve_model_path
    from lmwright.utils.logging import quiet_transformers

    quiet_transformers()
    try:
        m, tok = load_trained(model, task=meta["task"])
    except ConfigError as e:
        raise ExportError(str(e)) from None
    merged_from = (meta.get("method") or meta.get("adapter")) if meta.get("adapter") else None
    return Source(path=resolve_model_path(model), task=meta["task"], model=m, tokenizer=tok, meta=meta,
                  merged_from=merged_from)


def merge_model(src: Source) -> Any:
    """A plain transformers model with any adapter folded in (float weights, eval mode).

    peft adapters merge through their lmwright method (which dequantizes a bitsandbytes base first,
    so a QLoRA update is not re-quantized away) or, for adapters lmwright did not write, through
    peft's ``merge_and_unload``.
    """
    from lmwright.config import ConfigError
    from lmwright.methods import METHODS

    model = src.model
    if not hasattr(model, "merge_and_unload"):
        return model.eval()
    method = src.meta.get("method")
    try:
        merged = METHODS.get(method)().merge(model) if method in METHODS else model.merge_and_unload()
    except ConfigError as e:
        raise ExportError(f"{src.path}: {e}") from None
    return merged.eval()
