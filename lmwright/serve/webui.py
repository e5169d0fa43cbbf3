"""A browser UI (Gradio): chat with runs (side by side), look at runs' metrics, start training stages.

Gradio is imported only in :func:`build_ui`, so the rest of lmwright never pays for it. The handlers
are plain functions over run folders so tests can call them without a browser; chat goes through
``LoadedModel.stream_chat``, i.e. the same chat template, sampling code and guardrails as the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lmwright.serve.guardrails import Guardrails

STAGES = ["pretrain", "sft", "classify", "upft", "reward", "dpo", "ppo", "grpo", "distill"]


def list_runs(runs_dir: str | Path) -> list[str]:
    """Run folders (run.json, final/ or checkpoints/) and model folders (config.json) under ``runs_dir``."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and any((p / f).exists() for f in ("run.json", "config.json", "adapter_config.json", "final")):
            out.append(p.name)
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (bad lines, e.g. one being written, are skipped)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    rows = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


def loss_points(rows: list[dict]) -> list[dict]:
    """(step, loss, series) points for a plot: train loss and any eval loss."""
    pts = []
    for i, r in enumerate(rows):
        step = r.get("step", i)
        for key in ("loss", "train/loss", "eval_loss", "eval/loss"):
            if isinstance(r.get(key), (int, float)):
                pts.append({"step": step, "loss": float(r[key]), "series": "eval" if "eval" in key else "train"})
    return pts


class ModelCache:
    """Loaded models by run name, loaded on first use (loading takes seconds; chatting should not)."""

    def __init__(self, runs_dir: str | Path, guardrails: Guardrails | None = None):
        self.runs_dir = Path(runs_dir)
        self.guardrails = guardrails or Guardrails()
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, run: str):
        from lmwright.serve.api import load

        with self._lock:
            if run not in self._models:
                self._models[run] = load(self.runs_dir / run, guardrails=self.guardrails, name=run)
            return self._models[run]


def chat_stream(cache: ModelCache, run: str, history: list[dict], message: str, temperature: float, top_p: float,
                max_tokens: int, seed: int | None):
    """Yield the growing history (messages format) while the reply streams in."""
    if not run:
        yield history + [{"role": "assistant", "content": "(pick a run first)"}]
        return
    model = cache.get(run)
    convo = [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": message}]
    reply = ""
    out = convo + [{"role": "assistant", "content": ""}]
    for piece in model.stream_chat(convo, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                                   seed=None if seed in (None, "", -1) else int(seed)):
        reply += piece
        out[-1] = {"role": "assistant", "content": reply}
        yield out
    yield out


class TrainJob:
    """One ``lmwright train <stage>`` subprocess started from the UI, with its output captured."""

    def __init__(self, stage: str, config: str, overrides: str, log_file: Path):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        cmd = [sys.executable, "-m", "lmwright.cli", "train", stage]
        if config.strip():
            cmd += ["-c", config.strip()]
        cmd += [o for o in overrides.split() if o]
        self.cmd = cmd
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        self._fh = open(log_file, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the job
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT)

    def status(self) -> str:
        rc = self.proc.poll()
        return "running" if rc is None else f"finished (exit code {rc})"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def build_ui(runs_dir: str | Path = "runs", guardrails: Guardrails | None = None):
    """The Gradio Blocks app: chat, runs and train tabs."""
    import gradio as gr

    runs_dir = Path(runs_dir)
    cache = ModelCache(runs_dir, guardrails)
    jobs: dict[str, TrainJob] = {}

    def refresh():
        runs = list_runs(runs_dir)
        return gr.update(choices=runs), gr.update(choices=["(none)"] + runs), gr.update(choices=runs)

    with gr.Blocks(title="lmwright") as ui:
        gr.Markdown(f"# lmwright\nRuns folder: `{runs_dir}`")
        with gr.Tab("Chat"):
            runs = list_runs(runs_dir)
            with gr.Row():
                run_a = gr.Dropdown(runs, value=runs[0] if runs else None, label="model A", elem_id="run_a")
                run_b = gr.Dropdown(["(none)"] + runs, value="(none)", label="model B (compare)", elem_id="run_b")
                refresh_btn = gr.Button("refresh runs")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top_p")
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="max tokens")
                seed = gr.Number(value=-1, precision=0, label="seed (-1 = random)")
            with gr.Row():
                chat_a = gr.Chatbot(label="A", elem_id="chat_a")
                chat_b = gr.Chatbot(label="B", elem_id="chat_b")
            msg = gr.Textbox(label="message", placeholder="type and press enter", elem_id="msg")
            clear = gr.Button("clear")

            def respond(message, hist_a, hist_b, a, b, t, p, m, s):
                hist_a, hist_b = hist_a or [], hist_b or []
                if not message:
                    yield hist_a, hist_b, ""
                    return
                gen_a = chat_stream(cache, a, hist_a, message, t, p, m, s)
                gen_b = chat_stream(cache, b, hist_b, message, t, p, m, s) if b and b != "(none)" else None
                out_a, out_b = hist_a, hist_b
                for out_a in gen_a:
                    yield out_a, out_b, ""
                if gen_b is not None:
                    for out_b in gen_b:
                        yield out_a, out_b, ""

            msg.submit(respond, [msg, chat_a, chat_b, run_a, run_b, temperature, top_p, max_tokens, seed],
                       [chat_a, chat_b, msg])
            clear.click(lambda: ([], []), None, [chat_a, chat_b])

        with gr.Tab("Runs"):
            run_sel = gr.Dropdown(runs, label="run", elem_id="run_sel")
            plot = gr.LinePlot(x="step", y="loss", color="series", title="loss", elem_id="loss_plot")
            table = gr.Dataframe(label="metrics.jsonl", elem_id="metrics_table")

            def show_run(run):
                import pandas as pd

                rows = read_metrics(runs_dir / run) if run else []
                return pd.DataFrame(loss_points(rows), columns=["step", "loss", "series"]), pd.DataFrame(rows)

            run_sel.change(show_run, run_sel, [plot, table])

        with gr.Tab("Train"):
            with gr.Row():
                stage = gr.Dropdown(STAGES, value="sft", label="stage")
                config = gr.Textbox(label="config file (-c)", placeholder="configs/sft/tiny.yaml")
            overrides = gr.Textbox(label="overrides (key=value, space separated)")
            watch = gr.Textbox(label="run folder to watch (its metrics.jsonl)", placeholder=str(runs_dir / "my-run"))
            start = gr.Button("start", variant="primary")
            status = gr.Textbox(label="status")
            live = gr.LinePlot(x="step", y="loss", color="series", title="live loss")
            log_box = gr.Textbox(label="log", lines=12)
            timer = gr.Timer(2.0)

            def start_job(st, cfg_file, ov, folder):
                key = folder or st
                job = TrainJob(st, cfg_file or "", ov or "", runs_dir / ".webui-logs" / f"{Path(key).name}.log")
                jobs["current"] = job
                return f"started: {' '.join(job.cmd)}"

            def poll(folder):
                import pandas as pd

                job = jobs.get("current")
                pts = loss_points(read_metrics(folder)) if folder else []
                return (pd.DataFrame(pts, columns=["step", "loss", "series"]),
                        job.log_tail() if job else "", job.status() if job else "idle")

            start.click(start_job, [stage, config, overrides, watch], status)
            timer.tick(poll, watch, [live, log_box, status])
        refresh_btn.click(refresh, None, [run_a, run_b, run_sel])
    return ui


def launch(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860,
           guardrails: Guardrails | None = None, auth: tuple[str, str] | None = None, **kw: Any):
    ui = build_ui(runs_dir, guardrails)
    ui.queue(default_concurrency_limit=4)
    return ui.launch(server_name=host, server_port=port, auth=auth, **kw)
