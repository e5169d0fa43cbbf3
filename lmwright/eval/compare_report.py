"""``report.html`` comparing runs: a metrics table across runs and their loss curves overlaid.

``compare_runs`` is what ``lmwright compare`` calls. A run's value for a metric key is the last one
logged in its ``metrics.jsonl``, else the value in a ``metrics.json`` / ``eval*.json`` file in the run
folder (what ``lmwright eval --out`` writes), so training and evaluation metrics sit in one table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def run_values(run_dir: Path, keys: list[str]) -> dict[str, Any]:
    from lmwright.engine.run import read_metrics

    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    extra: dict[str, Any] = {}
    for f in sorted(run_dir.glob("eval*.json")) + [run_dir / "metrics.json"]:
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                extra.update(data)
    row: dict[str, Any] = {"run": run_dir.name}
    for k in keys:
        vals = [m[k] for m in metrics if k in m]
        row[k] = vals[-1] if vals else extra.get(k, "")
    return row


def overlaid_curves(runs: list[Path], key: str = "loss", eval_key: str = "val_loss") -> str | None:
    """One PNG data URI: train ``key`` (solid) and ``eval_key`` (dashed, dots) per run, same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmwright.engine.report import _png
    from lmwright.engine.run import read_metrics

    fig, ax = plt.subplots(figsize=(7.5, 4))
    drawn = False
    for i, d in enumerate(runs):
        metrics = read_metrics(d) if (d / "metrics.jsonl").exists() else []
        color = f"C{i % 10}"
        train = [(m["step"], m[key]) for m in metrics if key in m and "lr" in m and "step" in m]
        val = [(m["step"], m[eval_key]) for m in metrics if eval_key in m and "step" in m]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{d.name} {key}")
            drawn = True
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{d.name} {eval_key}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(f"{key} across runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def compare_runs(run_dirs: list[str | Path], out_html: str | Path, metric_keys: list[str] | None = None) -> Path:
    """Write a self-contained comparison page for ``run_dirs`` and return its path."""
    from lmwright.config import ConfigError
    from lmwright.engine.report import CSS, table

    runs = [Path(d) for d in run_dirs]
    missing = [str(d) for d in runs if not d.is_dir()]
    if missing:
        raise ConfigError(f"run folder(s) not found: {', '.join(missing)}")
    keys = list(metric_keys or ["loss", "val_loss"])
    rows = [run_values(d, keys) for d in runs]
    parts = [f"<!doctype html><meta charset='utf-8'><title>run comparison</title><style>{CSS}</style>",
             "<h1>Run comparison</h1>", "<h2>Metrics</h2>", table(rows, ["run", *keys])]
    img = overlaid_curves(runs)
    if img:
        parts += ["<h2>Loss</h2>", f"<img alt='loss curves' src='{img}'>"]
    parts += ["<h2>Runs</h2>", "<ul>" + "".join(f"<li>{html.escape(str(d.resolve()))}</li>" for d in runs) + "</ul>"]
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
