"""Glue shared by the stages: the stage registry, tokenizer/model resolution, saving ``final/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.registry import Registry

STAGES = Registry("stage", package="lmwright.stages")


def resolve_tokenizer(model_cfg, tokenizer_path: str | None):
    """The tokenizer for a model: explicit path, else the model folder's (or its run's) tokenizer."""
    from lmwright.models.load import load_tokenizer, resolve_model_path

    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    if model_cfg.is_preset():
        raise ConfigError(f"model.name={model_cfg.name} is a preset built from scratch: set tokenizer=<folder> "
                          f"(train one with `lmwright data tokenizer`)")
    p = resolve_model_path(model_cfg.name)
    for cand in (p, p.parent / "tokenizer"):
        if (cand / "tokenizer_config.json").exists():
            return load_tokenizer(cand)
    raise ConfigError(f"no tokenizer found in {p}: set tokenizer=<folder>")


def save_final(model, tokenizer, out: Path, task: str, extra: dict[str, Any] | None = None,
               method_cfg=None, base_path: str | None = None) -> Path:
    """Write ``final/``: the model as its method saves it, the tokenizer, generation defaults and
    ``lmwright.json`` (task, method, base). Written to a temp folder beside ``out``, fsynced and renamed:
    a kill mid-save leaves the previous ``out`` (or none), never a half-written one."""
    import os
    import shutil

    from lmwright.utils.files import replace_dir

    dest = out
    out = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        _write_final(model, tokenizer, out, task, extra, method_cfg, base_path)
        replace_dir(out, dest)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return dest


def _write_final(model, tokenizer, out: Path, task: str, extra: dict[str, Any] | None, method_cfg,
                 base_path: str | None) -> None:
    from lmwright.methods import plain_method, save_trained, trains_all
    from lmwright.models.meta import read_meta, write_meta
    from lmwright.utils.logging import quiet_transformers

    quiet_transformers()
    if method_cfg is not None and not trains_all(method_cfg):
        save_trained(model, method_cfg, out, base_path=base_path, task=task)
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # keep what save_trained wrote (num_labels, id2label, quantize): load_trained needs it
    meta = read_meta(out)
    meta.update({"task": task, "method": method_cfg.name if method_cfg is not None else plain_method()})
    if base_path is not None or "base" not in meta:
        meta["base"] = str(Path(base_path).resolve()) if base_path is not None else None
    meta.update(extra or {})
    write_meta(out, meta, tokenizer=tokenizer)  # + generation_config.json of a causal LM


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (12 x layers x d x T)."""
    cfg = model.config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "wte" not in n
                   and "wpe" not in n and "lm_head" not in n)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    vocab = getattr(cfg, "vocab_size", 0)
    return 6.0 * n_params + 12.0 * layers * d * seq_len + 6.0 * d * vocab  # + the output projection


def data_texts(records: list[dict], fmt: str) -> list[str]:
    from lmwright.data import FORMATS

    f = FORMATS.get(fmt)
    return [f.text_of(r) for r in records]
