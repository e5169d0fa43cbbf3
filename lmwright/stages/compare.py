"""``lmwright compare``: one stage config (sft or classify) trained once per method on the same data,
model and budget, then a decision table and plots.

Not a stage (nothing is registered): a tool that runs the stages in-process, one run folder per
method under one compare folder, and reads back what each run wrote. A method's presets (e.g. ``qlora``
= lora with ``model.quantize=nf4``, declared by the lora plugin) are accepted as method names.

Measured per method: trainable share of parameters, peak memory (CUDA: peak allocated; CPU: peak
resident memory above the level before the run, sampled every 20 ms), training tokens/s, wall time
of the whole run (data, training, evaluation, saving), size of ``final/`` and the validation metrics.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, from_dict, merge_sources, set_dotted
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.compare")

METRICS = {"sft": ["val_loss", "val_exact_match"], "classify": ["val_accuracy", "val_macro_f1", "val_loss"]}
COLUMNS = ["method", "trainable %", "peak mem MiB", "tokens/s", "wall s", "final/ MiB"]


def load(files: list[str], overrides: list[str]) -> tuple[str, list[str], dict[str, Any]]:
    """(stage name, methods, {method: stage config}); every config is built and checked before training."""
    from lmwright.methods import preset_names
    from lmwright.stages import STAGES

    raw, sources = merge_sources(files, overrides)
    methods = raw.pop("methods", None)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("no methods to compare: add methods=full,lora,... (or a `methods:` list in the config)")
    stage_name = raw.get("stage")
    if stage_name not in METRICS:
        raise ConfigError(f"compare runs the sft or classify stage; the config has stage: {stage_name!r}")
    stage = STAGES.get(stage_name)
    base_name = (raw.get("train") or {}).get("run_name") or f"compare-{stage_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    configs = {}
    for m in methods:
        r = copy.deepcopy(raw)
        name, preset = preset_names().get(m, (m, {}))  # e.g. qlora = lora + model.quantize=nf4
        r.setdefault("method", {})["name"] = name
        for key, value in preset.items():
            set_dotted(r, key, value)
        train = r.setdefault("train", {})
        train["output_dir"] = str(Path(train.get("output_dir", "runs")) / base_name)
        train["run_name"] = m
        try:
            configs[m] = from_dict(stage.Config, r, sources=sources)
        except ConfigError as e:
            raise ConfigError(f"methods={m}: {e}") from None
    return stage_name, methods, configs


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA peak allocated, else sampled resident memory."""

    def __enter__(self) -> PeakMemory:
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak_mb = 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak, _rss_mb()) - self.base


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def run_compare(files: list[str], overrides: list[str]) -> Path:
    """Train every method, then write compare.json, compare.md and report.html; returns the folder."""
    import gc

    import torch

    from lmwright.stages import STAGES

    stage_name, methods, configs = load(files, overrides)
    stage = STAGES.get(stage_name)
    for m, cfg in configs.items():  # fail before any training when a combination cannot work
        try:
            stage.check(cfg)
        except ConfigError as e:
            raise ConfigError(f"methods={m}: {e}") from None
    out = Path(next(iter(configs.values())).train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, cfg in configs.items():
        log.info("compare: training %s (%d/%d)", m, len(rows) + 1, len(methods))
        gc.collect()
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            run_dir = stage.run(cfg)
        wall = time.perf_counter() - t0
        info = json.loads((run_dir / "run.json").read_text())
        row = {"method": m, "trainable %": info.get("trainable_pct"), "peak mem MiB": mem.peak_mb,
               "tokens/s": info.get("tokens_per_s"), "wall s": wall,
               "final/ MiB": folder_mb(run_dir / "final"), "run": str(run_dir)}
        row.update({k: v for k, v in (info.get("after") or {}).items() if k in METRICS[stage_name]})
        rows.append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metric_keys = [k for k in METRICS[stage_name] if any(k in r for r in rows)]
    (out / "compare.json").write_text(json.dumps({"stage": stage_name, "rows": rows}, indent=2))
    md = markdown_table(rows, COLUMNS + metric_keys)
    (out / "compare.md").write_text(md + "\n")
    write_html(out, rows, metric_keys, stage_name, md)
    print(md)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _bars(rows: list[dict], key: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmwright.engine.report import fig_png

    pts = [(r["method"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar([p[0] for p in pts], [p[1] for p in pts], color="#4c72b0")
    ax.set_title(key)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", rotation=30)
    return fig_png(fig)


def write_html(out: Path, rows: list[dict], metric_keys: list[str], stage_name: str, md: str) -> Path:
    from lmwright.engine.report import table, write_report

    sections = [("Decision table", table(rows, COLUMNS + metric_keys)), ("Markdown", f"<pre>{md}</pre>")]
    for key in COLUMNS[1:] + metric_keys:
        img = _bars(rows, key)
        if img:
            sections.append((key, f"<img alt='{key}' src='{img}'>"))
    return write_report(out, f"lmwright compare ({stage_name}): {', '.join(r['method'] for r in rows)}", sections)
