"""A browser UI (Gradio): chat with runs (side by side), look at runs' metrics, start training stages.

Gradio is imported only in :func:`build_ui`, so the rest of lmwright never pays for it. The handlers
are plain functions over run folders so tests can call them without a browser; chat goes through
``LoadedModel.stream_chat``, i.e. the same chat template, sampling code and guardrails as the server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.serve.guardrails import Guardrails

# the Train tab may read config files only from the runs folder and the shipped examples (configs/)
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_RUN_NAME = re.compile(r"^[^./\\\x00][^/\\\x00]{0,254}$")  # one folder name, not hidden, no separators

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


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, if it lies inside ``root``; else a ConfigError.
    The UI's text boxes and dropdown values go through this: a browser can send any string."""
    root = Path(root).resolve()
    p = Path(path)
    p = (p if p.is_absolute() else root / p).resolve()
    if p != root and root not in p.parents:
        raise ConfigError(f"{path} is outside the runs folder {root}: the web UI reads and writes only there")
    return p


def run_folder(runs_dir: str | Path, run: str) -> Path:
    """The folder of the run named ``run`` (a plain name of a folder directly under ``runs_dir``)."""
    if not isinstance(run, str) or not _RUN_NAME.match(run):
        raise ConfigError(f"{run!r} is not a run name (one folder name in the runs folder)")
    return inside(runs_dir, run)


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
    """Loaded models by run name, loaded on first use (loading takes seconds; chatting should not).

    At most ``capacity`` models stay loaded: the least recently used one is dropped to make room, so a
    UI used with many runs does not grow until the machine runs out of memory.
    """

    def __init__(self, runs_dir: str | Path, guardrails: Guardrails | None = None, capacity: int = 2):
        if capacity < 1:
            raise ConfigError(f"ModelCache capacity must be >= 1, got {capacity}")
        self.runs_dir = Path(runs_dir)
        self.guardrails = guardrails or Guardrails()
        self.capacity = capacity
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run: str):
        from lmwright.serve.api import load

        folder = run_folder(self.runs_dir, run)
        with self._lock:
            if run in self._models:
                self._models.move_to_end(run)
                return self._models[run]
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
                _free_memory()
            self._models[run] = load(folder, guardrails=self.guardrails, name=run)
            return self._models[run]

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


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


def train_command(runs_dir: str | Path, stage: str, config: str, overrides: str) -> list[str]:
    """The ``lmwright train`` command line for the Train tab's fields, confined to ``runs_dir``.

    The fields are free text from a browser: the config file must be a YAML file in the runs folder or a
    shipped example, every override must be ``key=value`` (no command-line flags), the run lands in the
    runs folder (``train.output_dir`` is set to it and may not be given) and ``train.run_name`` must be
    a plain folder name.
    """
    from lmwright.config import merge_sources

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    runs_dir = Path(runs_dir).resolve()
    files: list[str] = []
    if config.strip():
        found = _config_file(runs_dir, Path(config.strip()))
        if found is None:
            raise ConfigError(f"config file {config.strip()!r}: give a .yaml file in the runs folder {runs_dir} or "
                              "a shipped example under configs/")
        files.append(str(found))
    items = overrides.split()
    for item in items:
        if item.startswith("-") or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (command-line flags are not accepted)")
    raw, _ = merge_sources(files, items)
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if any(o.split("=", 1)[0].strip() in ("train", "train.output_dir") for o in items):
        raise ConfigError("train.output_dir cannot be set from the web UI: runs are written to the runs folder "
                          f"{runs_dir}")
    run_name = train.get("run_name")
    if run_name is not None:
        run_folder(runs_dir, str(run_name))  # a plain name, inside the runs folder
    _confine_paths(runs_dir, merge_sources([], items)[0])
    cmd = [sys.executable, "-m", "lmwright.cli", "train", stage]
    if files:
        cmd += ["-c", files[0]]
    return cmd + items + [f"train.output_dir={runs_dir}"]


def _confine_paths(runs_dir: Path, values: Any, key: str = "") -> None:
    """Every override value that names a file or folder (``data.path``, ``model.name``, ``tokenizer``, ...) must
    lie inside the runs folder: a browser may not make the server read ``/etc`` or a home folder as training
    data or a model. Preset names (no path separator, not an existing path) pass."""
    if isinstance(values, dict):
        for k, v in values.items():
            _confine_paths(runs_dir, v, f"{key}.{k}" if key else str(k))
        return
    if isinstance(values, (list, tuple)):
        for v in values:
            _confine_paths(runs_dir, v, key)
        return
    if not isinstance(values, str) or not values:
        return
    text = values.split(".json:", 1)[0] + ".json" if ".json:" in values else values  # dataset_info.json:<name>
    looks_like_path = "/" in text or "\\" in text or text.startswith(("~", ".")) or Path(text).exists()
    if not looks_like_path:
        return
    cand = Path(text).expanduser().resolve()  # relative to the working directory, as the train command reads it
    if cand != runs_dir and runs_dir not in cand.parents:
        raise ConfigError(f"{key}={values!r}: files given in the web UI must be inside the runs folder {runs_dir}")


def _config_file(runs_dir: Path, p: Path) -> Path | None:
    """``p`` (absolute, or relative to the runs folder, configs/ or its parent) if it is an existing YAML file
    inside the runs folder or a configs/ folder (shipped, or the working directory's)."""
    roots = [runs_dir] + [r.resolve() for r in (SHIPPED_CONFIGS, Path.cwd() / "configs") if r.is_dir()]
    bases = [None] if p.is_absolute() else [b for r in roots for b in (r, r.parent)]
    for base in bases:
        cand = (p if base is None else base / p).resolve()
        if cand.suffix in (".yaml", ".yml") and cand.is_file() and any(r == cand or r in cand.parents for r in roots):
            return cand
    return None


class TrainJob:
    """One ``lmwright train <stage>`` subprocess started from the UI, with its output captured."""

    def __init__(self, stage: str, config: str, overrides: str, log_file: Path, runs_dir: str | Path = "runs"):
        self.cmd = train_command(runs_dir, stage, config, overrides)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        self._fh = open(log_file, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the job
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        if self.proc.poll() is None:  # poll() also reaps a finished process
            return True
        if not self._fh.closed:
            self._fh.close()
        return False

    def status(self) -> str:
        return "running" if self.running() else f"finished (exit code {self.proc.returncode})"

    def stop(self, grace_s: float = 10.0) -> str:
        """SIGTERM (the run saves a checkpoint where it can), then SIGKILL after ``grace_s``; reaped."""
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.running()
        return self.status()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class JobSlot:
    """The Train tab's one job: a second start is refused while one runs; stop ends and reaps it."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.job: TrainJob | None = None
        self._lock = threading.Lock()

    def start(self, stage: str, config: str, overrides: str) -> str:
        with self._lock:
            if self.job is not None and self.job.running():
                return "a job is already running: stop it first (one job at a time)"
            try:
                log = self.runs_dir / ".webui-logs" / f"{stage}.log"
                self.job = TrainJob(stage, config or "", overrides or "", log, runs_dir=self.runs_dir)
            except ConfigError as e:
                return f"not started: {e}"
            return f"started: {' '.join(self.job.cmd)}"

    def stop(self) -> str:
        with self._lock:
            return "no job" if self.job is None else self.job.stop()

    def status(self) -> str:
        return "idle" if self.job is None else self.job.status()

    def log_tail(self) -> str:
        return "" if self.job is None else self.job.log_tail()


def watch_points(runs_dir: str | Path, folder: str) -> list[dict]:
    """Loss points of the run ``folder`` (a run name or a path inside the runs folder); none elsewhere."""
    if not folder:
        return []
    try:
        return loss_points(read_metrics(inside(runs_dir, folder)))
    except ConfigError:
        return []


def build_ui(runs_dir: str | Path = "runs", guardrails: Guardrails | None = None):
    """The Gradio Blocks app: chat, runs and train tabs."""
    import gradio as gr

    runs_dir = Path(runs_dir)
    cache = ModelCache(runs_dir, guardrails)
    slot = JobSlot(runs_dir)

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
                seed = gr.Number(value=-1, precision=0, label="seed (-1 = random)", elem_id="seed")
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

                rows = read_metrics(run_folder(runs_dir, run)) if run else []
                return pd.DataFrame(loss_points(rows), columns=["step", "loss", "series"]), pd.DataFrame(rows)

            run_sel.change(show_run, run_sel, [plot, table])

        with gr.Tab("Train"):
            with gr.Row():
                stage = gr.Dropdown(STAGES, value="sft", label="stage")
                config = gr.Textbox(label="config file (-c)", placeholder="configs/sft/tiny.yaml")
            overrides = gr.Textbox(label="overrides (key=value, space separated)")
            watch = gr.Textbox(label="run to watch (a run name in the runs folder; its metrics.jsonl)",
                               placeholder="my-run")
            with gr.Row():
                start = gr.Button("start", variant="primary")
                stop = gr.Button("stop", variant="stop")
            status = gr.Textbox(label="status")
            live = gr.LinePlot(x="step", y="loss", color="series", title="live loss")
            log_box = gr.Textbox(label="log", lines=12)
            timer = gr.Timer(2.0)

            def poll(folder):
                import pandas as pd

                pts = watch_points(runs_dir, folder)
                return pd.DataFrame(pts, columns=["step", "loss", "series"]), slot.log_tail(), slot.status()

            start.click(lambda st, c, ov: slot.start(st, c, ov), [stage, config, overrides], status)
            stop.click(slot.stop, None, status)
            timer.tick(poll, watch, [live, log_box, status])
        refresh_btn.click(refresh, None, [run_a, run_b, run_sel])
    return ui


def launch(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860,
           guardrails: Guardrails | None = None, auth: tuple[str, str] | None = None, **kw: Any):
    ui = build_ui(runs_dir, guardrails)
    ui.queue(default_concurrency_limit=4)
    return ui.launch(server_name=host, server_port=port, auth=auth, **kw)
