"""``report.html``: a self-contained page (plots embedded as PNG data URIs) readable offline."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from lmwright.engine.run import read_metrics


def fig_png(fig) -> str:
    """A matplotlib figure as an inline ``data:image/png`` URL (closes the figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curves_png(metrics: list[dict[str, Any]], keys: tuple[str, ...] = ("loss",),
               eval_keys: tuple[str, ...] = ("val_loss",), title: str = "") -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for k in keys:
        pts = [(m["step"], m[k]) for m in metrics if k in m and "lr" in m]
        if pts:
            ax.plot(*zip(*pts), label=f"train {k}")
            drawn = True
    for k in eval_keys:
        pts = [(m["step"], m[k]) for m in metrics if k in m]
        if pts:
            ax.plot(*zip(*pts), "o-", label=k)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig_png(fig)


def table(rows: list[dict[str, Any]] | dict[str, Any], headers: list[str] | None = None) -> str:
    if isinstance(rows, dict):
        rows = [{"metric": k, "value": v} for k, v in rows.items()]
    if not rows:
        return "<p>(none)</p>"
    headers = headers or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{fmt(r.get(h, ''))}</td>" for h in headers) + "</tr>")
    return "\n".join(out) + "</table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;white-space:pre-wrap}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}"""


def write_report(run_dir: str | Path, title: str, sections: list[tuple[str, str]] | None = None,
                 summary: dict[str, Any] | None = None) -> Path:
    """Write ``report.html``: summary, curves from metrics.jsonl, extra sections, config, run info."""
    d = Path(run_dir)
    metrics = read_metrics(d)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts += ["<h2>Summary</h2>", table(summary)]
    img = curves_png(metrics, title="loss")
    if img:
        parts += ["<h2>Loss</h2>", f"<img alt='loss curve' src='{img}'>"]
    eval_keys = sorted({k for m in metrics if "lr" not in m for k in m if k.startswith("val_") and k != "val_loss"})
    if eval_keys:
        img = curves_png(metrics, keys=(), eval_keys=tuple(eval_keys), title="validation metrics")
        if img:
            parts += ["<h2>Validation metrics</h2>", f"<img alt='validation metrics' src='{img}'>"]
    for head, body in sections or []:
        parts += [f"<h2>{html.escape(head)}</h2>", body]
    if (d / "config.yaml").exists():
        parts += ["<h2>Config</h2>", f"<pre>{html.escape((d / 'config.yaml').read_text())}</pre>"]
    if (d / "run.json").exists():
        info = json.loads((d / "run.json").read_text())
        parts += ["<h2>Run</h2>", f"<pre>{html.escape(json.dumps(info, indent=2, default=str))}</pre>"]
    out = d / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
