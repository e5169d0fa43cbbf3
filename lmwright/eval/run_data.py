"""A run's own validation data, for ``lmwright eval`` without ``--data``.

A run folder keeps its resolved ``config.yaml``: the data config (with its deterministic split), the
row length, packing and micro-batch. The stage module builds the validation rows and measures them
(``pretrain.validation_set`` / ``validation_metrics``, ``sft.validation_data`` / ``validation_metrics``),
so ``lmwright eval --model RUN --task perplexity`` prints the ``val_loss``/``val_ppl`` of run.json's
``after`` and ``--task generation`` on an SFT run its ``val_exact_match``: the same code, not a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunData:
    dir: Path
    stage: str
    cfg: Any
    info: dict[str, Any]


def find_run(model: str | Path) -> Path | None:
    """The run folder of a run, its ``final/``, a checkpoint or a checkpoint's ``model/``; None otherwise."""
    p = Path(model).resolve()
    for d in (p, *list(p.parents)[:3]):
        if (d / "run.json").is_file() and (d / "config.yaml").is_file():
            return d
    return None


def load_run(model: str | Path) -> RunData | None:
    from lmwright.config import load_config, load_yaml
    from lmwright.stages import STAGES

    d = find_run(model)
    if d is None:
        return None
    info = json.loads((d / "run.json").read_text(encoding="utf-8"))
    stage = info.get("stage")
    if not stage or stage not in STAGES:
        return None
    raw = load_yaml(d / "config.yaml")
    _rebase_paths(raw, d)
    return RunData(dir=d, stage=stage, cfg=load_config(STAGES.get(stage).Config, base=raw), info=info)


def _rebase_paths(raw: dict, run_dir: Path) -> None:
    """Relative paths in config.yaml are relative to the directory training ran in; find it from the run
    folder (``<there>/<train.output_dir>/<run_name>``) so that eval works from any directory."""
    out = Path((raw.get("train") or {}).get("output_dir") or "runs")
    depth = len(out.parts) + 1
    if out.is_absolute() or depth > len(run_dir.parents):
        return
    origin = run_dir.parents[depth - 1]

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or not p:
            return p
        q = Path(p)
        return str(origin / q) if not q.is_absolute() and not q.exists() and (origin / q).exists() else p

    data = raw.get("data") or {}
    for key in ("path", "val_path"):
        if isinstance(data.get(key), list):
            data[key] = [fix(p) for p in data[key]]
    if "tokenizer" in raw:
        raw["tokenizer"] = fix(raw["tokenizer"])
    for key in ("name", "tokenizer"):
        if key in (raw.get("model") or {}):
            raw["model"][key] = fix(raw["model"][key])


def has_default(run: RunData | None, task: Any) -> bool:
    """Whether ``task`` (an EVAL_TASKS instance) knows the validation metrics of ``run``'s stage."""
    return run is not None and run.stage in getattr(task, "run_stages", ())


def no_default_message(model: str | Path, run: RunData | None, task: Any) -> str:
    if run is None:
        return (f"--data is required: {model} is not a run folder (no run.json + config.yaml), so there is "
                f"no validation split to default to")
    stages = getattr(task, "run_stages", ())
    hint = f" (it defaults to the run's validation data on {' and '.join(stages)} runs)" if stages else ""
    return f"--data is required for --task {task.name} on a {run.stage} run{hint}"


def evaluate_run(model: str | Path, run: RunData, task: Any, limit: int | None = None,
                 batch_size: int | None = None, seq_len: int | None = None, max_new_tokens: int | None = None,
                 **_: Any) -> dict[str, Any]:
    """``task`` (an EVAL_TASKS instance with ``on_run``) on the run's own validation data; the task calls
    the stage's functions and returns run.json's keys. Options given explicitly override the run's."""
    import torch

    from lmwright.utils.hardware import choose_mixed_precision

    cfg = run.cfg
    if batch_size:
        cfg.train.micro_batch_size = batch_size
    if seq_len:
        cfg.seq_len = seq_len
    if max_new_tokens and hasattr(cfg, "max_new_tokens"):
        cfg.max_new_tokens = max_new_tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = run.info.get("mixed_precision") or choose_mixed_precision(cfg.train.mixed_precision, model)
    with precision_of(precision, device):
        metrics = task.on_run(model, run, device, limit)
    data = {"split": "validation", "path": list(cfg.data.path), "val_path": list(cfg.data.val_path),
            "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed}
    where, ref = reference(model, run)
    return {"task": task.name, "model": str(model), "run": str(run.dir), "stage": run.stage, "data": data,
            "precision": precision, **metrics,
            "reference": {"source": where, **{k: v for k, v in ref.items() if k in metrics}}}


def reference(model: str | Path, run: RunData) -> tuple[str, dict[str, Any]]:
    """What the run recorded for this model: run.json's ``after`` for ``final/``, the evaluation logged
    at step N in metrics.jsonl for checkpoint step-N."""
    from lmwright.engine.run import read_metrics
    from lmwright.models.load import resolve_model_path

    p = resolve_model_path(model).resolve()
    if p == (run.dir / "final").resolve():
        return "run.json after", run.info.get("after") or {}
    ckpt = p.parent if p.name == "model" else p
    if ckpt.parent.name == "checkpoints" and ckpt.name.startswith("step-") and ckpt.name[5:].isdigit():
        step = int(ckpt.name[5:])
        evals = [r for r in read_metrics(run.dir)
                 if r.get("step") == step and any(k.startswith("val_") for k in r)]
        if evals:
            return f"metrics.jsonl step {step}", evals[-1]
    return "", {}


def precision_of(mixed_precision: str, device: str):
    """The autocast of the run's training forward. The engine's accelerator runs the model's forward
    under it, and run.json's ``after`` (measured on the trained model) with it: evaluating in another
    precision gives slightly different numbers (bf16 vs fp32: ~1e-5 relative on a loss)."""
    from lmwright.utils.hardware import autocast_for

    return autocast_for(mixed_precision, device)


def capped(items: list, limit: int | None) -> list:
    return items[:limit] if limit else items
