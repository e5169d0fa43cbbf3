"""Evaluation tasks on local data: perplexity, classification, generation, preference, retrieval.

A task is a plugin registered by name in ``EVAL_TASKS`` (one module each in this package) with
``name``, ``formats`` (accepted record formats, the first is the default) and
``run(model, tokenizer, records, **opts) -> dict`` (metrics: floats, plus optional details such as a
confusion matrix; ``opts`` carries ``pooling``, the pooling the model folder was trained with, for tasks that
embed). :func:`evaluate` loads any model folder lmwright reads (run, checkpoint, HF or
adapter folder) and the records through ``lmwright.data.load_records`` (no network), and runs the
task. ``lm-eval:<task>`` runs a local lm-evaluation-harness task instead (optional extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lmwright.registry import Registry

EVAL_TASKS = Registry("eval task", package="lmwright.eval")
LM_EVAL_PREFIX = "lm-eval:"


class EvalTask(Protocol):
    name: str
    formats: tuple[str, ...]
    model_task: str | None  # load the model for this task (None: as the folder says)

    def run(self, model: Any, tokenizer: Any, records: list[dict], **opts: Any) -> dict[str, Any]: ...


def read_eval_records(data: str | Path | list[str], fmt: str, limit: int | None = None) -> list[dict]:
    """All records of ``data`` in ``fmt``, unsplit and not deduplicated (an eval set is taken as it is).

    A prepared folder (``lmwright data prepare``) contributes its validation split when it has one.
    """
    from lmwright.data import CleanConfig, DataConfig, load_records
    from lmwright.data.sources import is_prepared_dir

    paths = [str(p) for p in data] if isinstance(data, list) else [str(data)]
    cfg = DataConfig(path=paths, format=fmt, val_fraction=0.0, max_records=None,
                     clean=CleanConfig(normalize="none", whitespace=False, dedup=False))
    train, validation, _ = load_records(cfg)
    records = validation if len(paths) == 1 and is_prepared_dir(paths[0]) and validation else train
    return records[:limit] if limit else records


def evaluate(model: str | Path, task: str, data: str | Path | list[str] | None = None, fmt: str | None = None,
             limit: int | None = None, **opts: Any) -> dict[str, Any]:
    """Metrics of the model at ``model`` on ``task`` over the local records at ``data``.

    Without ``data``, ``model`` must be a run folder (or its ``final/`` or a checkpoint): the task is run
    on the run's own validation data by the stage's code, and the metrics carry run.json's names
    (``val_loss``, ``val_ppl``, ``val_exact_match``), with what the run recorded for that model as
    ``reference`` (run.json's ``after`` for ``final/``, metrics.jsonl's evaluation for a checkpoint)."""
    from lmwright.config import ConfigError

    if task.startswith(LM_EVAL_PREFIX):
        from lmwright.eval.lm_eval_bridge import run_lm_eval

        if data is None:
            raise ConfigError(f"--data is required for {task}: the folder of the local harness task")
        return run_lm_eval(model, task[len(LM_EVAL_PREFIX):], data, limit=limit, **opts)
    from lmwright.methods import load_trained

    t = EVAL_TASKS.get(task)()
    if data is None:
        from lmwright.eval.run_data import evaluate_run, has_default, load_run, no_default_message

        run = load_run(model)
        if not has_default(run, t):
            raise ConfigError(no_default_message(model, run, t))
        return evaluate_run(model, run, t, limit=limit, **opts)
    fmt = fmt or t.formats[0]
    if fmt not in t.formats:
        raise ConfigError(f"eval task '{task}' reads {', '.join(t.formats)} records, not '{fmt}'; pass --format "
                          f"{t.formats[0]} (or convert the data)")
    from lmwright.models.load import resolve_model_path
    from lmwright.models.pooling import read_pooling

    records = read_eval_records(data, fmt, limit)
    m, tok = load_trained(model, task=t.model_task)
    opts.setdefault("pooling", read_pooling(resolve_model_path(model)))  # embedding tasks: as it was trained
    metrics = t.run(m, tok, records, fmt=fmt, **opts)
    return {"task": task, "model": str(model), "data": str(data), "format": fmt, **metrics}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of a metrics dict (for tables); details such as confusion matrices are left out."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


__all__ = ["EVAL_TASKS", "EvalTask", "batches", "evaluate", "read_eval_records", "scalar_metrics"]
