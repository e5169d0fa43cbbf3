"""Serving load benchmark: aggregate tokens/s and TTFT with 1, 4 and 16 concurrent streaming clients.

Runs, in one command: a plain ``model.generate()`` baseline at batch 1 (sampling at temperature 1, exactly ``--tokens`` new
tokens), then the built-in engine (a) in-process, clients as threads calling ``engine.submit`` and (b)
behind the real HTTP server (uvicorn on 127.0.0.1, the engine in the server process) with N concurrent
streaming clients running in a separate load-generator process, as real clients would (in the server's
process their JSON parsing would fight the scheduler for the GIL). Every request samples at temperature 1
(no top-k/top-p, seeded) with ``ignore_eos``, as the baseline does, so each stream produces exactly the
baseline's number of tokens from the same chat prompt, with the same model, dtype and torch threads.
(Greedy would be cheaper for both, but a freshly initialised model's greedy output repeats one byte-level
token that never completes a UTF-8 character, so no text would stream until the end and the client could
not see the first token.)

The profile explains the figures: the engine's own per-phase timings per decode step (model forward,
sampling + detokenising + streaming, prefill) against the wall time per step (the rest is HTTP, the
event loop and waiting for the GIL), and a torch.profiler breakdown of one decode step (linear layers vs
attention vs the other ops) beside HF's own forward step and ``generate()``'s time per token.

Prints a table with ratios to the baseline and writes ``bench/results/serve_load.json`` together with a
matmul calibration (sustained FLOP/s of this machine), so figures from different machines can be put
side by side.

    python bench/serve_load.py            # llama-20m, 64 new tokens per request (~1 min on 2 cores)
    python bench/serve_load.py --smoke    # llama-tiny, a few tokens (used by the test suite)
    python bench/serve_load.py --model smollm2 --weights int8  # a real model (or a .gguf file / HF folder): 1 and
                                                 # 16 streams of the engine (what `lmwright serve` runs), one request
                                                 # per client, and llama.cpp (xllamacpp, when installed) on lmwright's
                                                 # own GGUF export of the same weights at the paired type (q8_0);
                                                 # ~70 s on 2 cores (f32, f16 and q8_0 for --weights float32)
    --variants eager,compiled             # also the torch.compile'd decode step (+40 s to 3 min of compiling)

Threads: ``generate()``, llama.cpp and the engine's decode steps run on ``--threads`` (1 on a small machine, see
below); the engine runs a step with 64 or more prompt tokens (the 16-stream burst's first mixed step) on every
core, as ``lmwright serve`` does by default (``prefill_threads``; ``--prefill-threads 1`` pins it to one). The
one-stream prompts (17-47 new tokens) stay under 64, so the one-stream rows compare like with like.

``--weights bfloat16`` / ``int8`` serve the engine with those weights (``lmwright serve --weights``) while the
``generate()`` baseline stays the fp32 model as a user loads it; llama.cpp then runs the GGUF type of the same
precision (bfloat16 -> f16, int8 -> q8_0, float32 -> f32) and the llama.cpp target is read against it.

llama.cpp runs in this process through ``xllamacpp`` (prebuilt llama.cpp, PyPI wheel) with the same torch thread
count as ``--threads``, one stream, the same prompt ids, temperature 1 with no top-k/top-p/min-p, ``ignore_eos``
and the same number of new tokens; its figures are the request's wall time (prompt included, as for the other
rows) and llama.cpp's own decode-only rate (``timings.predicted_per_second``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Tell me a story about a cat who finds a small red ball in the garden."
# Every measured request asks its own question (the same length in tokens, give or take): with one prompt for all,
# the engine's prefix cache would run only the last prompt token from the second request on. The chat template
# (SmolLM2's adds a default system prompt) stays shared, as on any chat server; the warm-up request asks its own
# question too, so a measured run starts with only that shared beginning in the prefix cache.
_SUBJECTS = ("a cat", "an old dog", "a young fox", "a brave mouse", "a tired horse", "a small bird", "a green frog",
             "a lost rabbit")
_FINDS = ("a small red ball", "a shiny key", "an old map", "a blue feather", "a wooden box", "a silver coin",
          "a paper boat", "a warm glove")
_PLACES = ("garden", "forest", "kitchen", "river", "attic", "village", "meadow", "harbour")
WARMUP_PROMPT = 511  # the last of the 512 questions: never a measured one


def prompt_for(i: int) -> str:
    """Question ``i`` of 512 distinct ones; question 0 is PROMPT (what generate() and llama.cpp are given)."""
    if not 0 <= i < 512:
        raise ValueError(f"prompt index {i} out of range (512 distinct questions)")
    return (f"Tell me a story about {_SUBJECTS[i % 8]} who finds {_FINDS[(i // 8) % 8]} in the "
            f"{_PLACES[(i // 64) % 8]}.")
TARGETS = {"one_stream_vs_generate": 1.5, "c16_vs_c1": 6.0, "ttft_p95_s_c16": 0.5}
# lmwright's one-stream decode against llama.cpp on lmwright's own export of the same weights, same precision
LLAMA_CPP_TARGET = 0.5
GGUF_TYPES = ("f32", "f16", "q8_0")
PAIRED_GGUF = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # --weights -> the llama.cpp type compared


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build(preset: str, vocab: int, workdir: Path, n_docs: int = 1500):
    """A tokenizer trained here on synthetic stories, and a fresh model of ``preset`` saved with it."""
    from lmwright.data.synthetic import story_corpus
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer
    from lmwright.models import ModelConfig, build_model

    tok = train_tokenizer(story_corpus(n_docs, seed=0), TokenizerConfig(vocab_size=vocab, min_frequency=2),
                          workdir / "tokenizer")
    model = build_model(ModelConfig(name=preset, dtype="float32"), task="causal-lm", tokenizer=tok, seed=0)
    model.save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    return workdir / "model"


def _in_worker(fn, threads: int):
    """Run ``fn`` in a fresh thread with ``threads`` torch threads, as the engine's scheduler runs.

    On an oversubscribed CPU, torch's OpenMP pool in the main thread was measured 30-100x slower than in a
    worker thread (2026-11, 2 shared cores, load ~10), which would make the comparison meaningless.
    """
    out: dict = {}

    def run():
        import torch

        torch.set_num_threads(threads)
        out.update(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def baseline(lm, ids: list[int], tokens: int, repeats: int, threads: int) -> dict:
    """HF ``model.generate()`` at batch 1, sampling at temperature 1 (no top-k/top-p), exactly ``tokens`` new
    tokens; and HF's bare forward step."""
    def run():
        import torch
        from transformers import DynamicCache

        x = torch.tensor([ids])
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, pad_token_id=lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            lm.model.generate(x, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                lm.model.generate(x, **kw)
            dt = time.perf_counter() - t0
            out = lm.model(input_ids=x, past_key_values=DynamicCache(), use_cache=True)
            cache, tok, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(tokens):  # model.forward alone, one token at a time (what generate() wraps)
                t1 = time.perf_counter()
                tok = lm.model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - t1)
        return {"tokens_per_s": tokens * repeats / dt, "seconds": dt, "tokens": tokens * repeats,
                "ms_per_token": dt / (tokens * repeats) * 1e3, "hf_forward_step_ms": statistics.median(steps) * 1e3}

    return _in_worker(run, threads)


def _stats_delta(engine, before: dict, wall: float) -> dict:
    """Per decode step: wall time, and the scheduler's own time per phase (the rest is outside it)."""
    st = engine.stats()
    steps = max(1, st["steps"] - before["steps"])
    per = {k: (st[k] - before[k]) / steps * 1e3 for k in ("decode_s", "sample_emit_s", "prefill_s")}
    wall_ms = wall / steps * 1e3
    return {"prompt_tokens": st["prompt_tokens"] - before["prompt_tokens"],
            "prefix_hit_tokens": st.get("prefix_hit_tokens", 0) - before.get("prefix_hit_tokens", 0),
            "engine_steps": steps, "wall_ms_per_step": wall_ms, "forward_ms_per_step": per["decode_s"],
            "sample_emit_ms_per_step": per["sample_emit_s"], "prefill_ms_per_step": per["prefill_s"],
            "outside_scheduler_ms_per_step": wall_ms - sum(per.values())}


def _row(mode: str, concurrency: int, rpc: int, tokens: int, wall: float, ttft: list[float], prof: dict,
         **extra) -> dict:
    return {"mode": mode, "concurrency": concurrency, "requests": concurrency * rpc, "tokens": tokens,
            "seconds": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_mean_s": statistics.mean(ttft), "ttft_p95_s": _percentile(ttft, 0.95), **prof, **extra}


def engine_load(engine, chat_ids, tokens: int, concurrency: int, rpc: int, first: int) -> dict:
    """The engine alone: ``concurrency`` client threads calling ``engine.submit`` (no HTTP); request ``j`` of
    client ``k`` asks question ``first + k * rpc + j`` (``chat_ids(text)``: its prompt ids)."""
    from lmwright.serve.engine import GenerationRequest
    from lmwright.serve.generation import SamplingParams

    prompts = {(k, j): chat_ids(prompt_for(first + k * rpc + j)) for k in range(concurrency) for j in range(rpc)}

    ttft: list[float] = []
    count = [0]

    def client(k: int):
        for j in range(rpc):
            params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=k * 100 + j, stop_token_ids=[])
            t0, first = time.perf_counter(), None
            for ev in engine.submit(GenerationRequest(prompts[k, j], params)):
                if ev.token_id is not None:
                    count[0] += 1
                    first = first or time.perf_counter() - t0
            ttft.append(first)

    before = engine.stats()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return _row("engine", concurrency, rpc, count[0], wall, ttft, _stats_delta(engine, before, wall))


# ------------------------------------------------------------------------- HTTP load generator (own process)
async def _client(c, url: str, tokens: int, n_requests: int, k: int, out: dict, first_prompt: int) -> None:
    """Client ``k`` on the shared ``httpx.AsyncClient`` ``c``: ``n_requests`` streamed chat requests, question
    ``first_prompt + k * n_requests + j`` each."""
    body = {"model": "bench", "max_tokens": tokens,
            "temperature": 1.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    for j in range(n_requests):
        body["seed"] = k * 100 + j
        body["messages"] = [{"role": "user", "content": prompt_for(first_prompt + k * n_requests + j)}]
        t0 = time.perf_counter()
        first = None
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out["tokens"] += chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
        out["ttft"].append(first if first is not None else time.perf_counter() - t0)


def client_main(url: str, tokens: int, concurrency: int, rpc: int, first_prompt: int) -> None:
    """The load generator process: prints one JSON line (tokens, seconds, ttft list).

    All clients share one ``httpx.AsyncClient`` (a connection pool, as an application server would), made
    before the clock starts. Earlier versions made one client each inside the measured burst: creating an
    ``httpx.AsyncClient`` blocks its event loop ~20 ms (its SSL context loads the CA certificates; measured
    here), so the first requests' TTFT took in up to ~300 ms of the load generator setting up the others,
    no part of the server's latency."""
    import httpx

    out: dict = {"tokens": 0, "ttft": []}
    cpu0 = time.process_time()

    async def run():
        limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
        async with httpx.AsyncClient(timeout=600, limits=limits) as c:
            # warm-up: the first request (the pool's first connection)
            await _client(c, url, 2, 1, 0, {"tokens": 0, "ttft": []}, WARMUP_PROMPT)
            t0 = time.perf_counter()
            await asyncio.gather(*[_client(c, url, tokens, rpc, k, out, first_prompt) for k in range(concurrency)])
            out["seconds"] = time.perf_counter() - t0

    asyncio.run(run())
    out["cpu_s"] = time.process_time() - cpu0
    print(json.dumps(out))


def _thread_cpu_s(native_id: int | None = None) -> float:
    """CPU seconds (user + system) of one thread of this process, or of the whole process (Linux /proc)."""
    path = f"/proc/self/task/{native_id}/stat" if native_id else "/proc/self/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PER_STEP = ("wall_ms_per_step", "forward_ms_per_step", "sample_emit_ms_per_step", "prefill_ms_per_step",
             "outside_scheduler_ms_per_step")
_SUMMED = ("requests", "tokens", "seconds", "prompt_tokens", "prefix_hit_tokens", "engine_steps")


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from the rows of the same level measured in several rounds: tokens/s over all of them (total tokens
    / total seconds), TTFT percentiles over every request, per-step and per-token figures weighted by steps and
    tokens; each round's tokens/s kept in ``rounds_tokens_per_s``."""
    if len(rounds) == 1:
        return dict(rounds[0], rounds_tokens_per_s=[rounds[0]["tokens_per_s"]])
    ttft = [t for r in rounds for t in r["_ttft"]]
    steps = sum(r["engine_steps"] for r in rounds)
    tokens = sum(r["tokens"] for r in rounds)
    out = dict(rounds[0])
    out.update({k: sum(r[k] for r in rounds) for k in _SUMMED})
    out.update({k: sum(r[k] * r["engine_steps"] for r in rounds) / steps for k in _PER_STEP})
    out.update({k: sum(r[k] * r["tokens"] for r in rounds) / max(1, tokens) for k in rounds[0]
                if k.startswith("cpu_ms_per_token")})
    if "server_ttft_mean_s" in out:
        out["server_ttft_mean_s"] = sum(r["server_ttft_mean_s"] * r["requests"] for r in rounds) / out["requests"]
    out.update({"tokens_per_s": out["tokens"] / out["seconds"], "ttft_p50_s": statistics.median(ttft),
                "ttft_mean_s": statistics.mean(ttft), "ttft_p95_s": _percentile(ttft, 0.95), "_ttft": ttft,
                "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]})
    return out


def http_load(engine, tokens: int, levels: list[int], rpc: int, first: int, rounds: int = 1) -> list[dict]:
    """The engine behind the real server; each level's clients run in a fresh load-generator process, asking
    questions ``first``, ``first + 1``, ... (none asked before). With ``rounds`` > 1 the levels take turns
    (1, 16, 1, 16, ...) and each level's row merges its rounds (:func:`merge_rounds`): on a shared machine a slow
    spell then falls on every level alike instead of on whichever ran during it, so the ratios between levels
    read the code rather than the neighbours."""
    import uvicorn

    from lmwright.serve.http import ServeConfig, create_app

    app = create_app({"bench": engine}, ServeConfig(max_seqs=engine.max_seqs, queue_size=64))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    rows = []
    try:
        def ttft_sum() -> tuple[float, int]:  # the server's own TTFT (submit -> first token), all requests so far
            h = app.state.metrics.hist.get("lmwright_time_to_first_token_seconds|chat", {"sum": 0.0, "n": 0})
            return h["sum"], h["n"]

        measured: dict[int, list[dict]] = {c: [] for c in levels}
        for c in [c for _ in range(rounds) for c in levels]:
            before, (s0, n0) = engine.stats(), ttft_sum()
            cpu_http, cpu_all = _thread_cpu_s(t.native_id), _thread_cpu_s()
            cmd = [sys.executable, __file__, "--client", f"http://127.0.0.1:{port}", "--tokens", str(tokens),
                   "--levels", str(c), "--requests-per-client", str(rpc), "--first-prompt", str(first)]
            first += c * rpc
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            # the warm-up request's 2 steps are in the stats delta: negligible next to the measured steps
            s1, n1 = ttft_sum()
            cpu_http, cpu_all = _thread_cpu_s(t.native_id) - cpu_http, _thread_cpu_s() - cpu_all
            n = max(1, out["tokens"])
            # CPU per generated token: the server's HTTP thread (event loop), the rest of the server process
            # (scheduler + torch's OpenMP workers), the load generator process
            cpu = {"cpu_ms_per_token_http": cpu_http / n * 1e3, "cpu_ms_per_token_engine": (cpu_all - cpu_http) / n * 1e3,
                   "cpu_ms_per_token_client": out["cpu_s"] / n * 1e3}
            measured[c].append(_row("http", c, rpc, out["tokens"], out["seconds"], out["ttft"],
                                    _stats_delta(engine, before, out["seconds"]),
                                    server_ttft_mean_s=(s1 - s0) / max(1, n1 - n0), _ttft=out["ttft"], **cpu))
        rows = [{k: v for k, v in merge_rounds(measured[c]).items() if k != "_ttft"} for c in levels]
    finally:
        server.should_exit = True
        t.join(timeout=30)
    return rows


def op_profile(engine, batch: int, steps: int, threads: int) -> dict:
    """torch.profiler over ``steps`` lean decode steps at ``batch`` rows: ms per step by kind of op."""
    lean = engine._lean
    if lean is None:
        return {}

    def run():
        import torch
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():  # tensors made outside it would make the compiled step recompile
            tok = torch.zeros(batch, dtype=torch.long)
            pos = torch.full((batch,), 40)
            lean.grow(41 + steps)
            lean.decode(tok, pos, 41)
            t0 = time.perf_counter()
            for s in range(steps):
                lean.decode(tok, pos + s, 41 + s)
            wall = (time.perf_counter() - t0) / steps * 1e3  # unprofiled
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for s in range(steps):
                    lean.decode(tok, pos + s, 41 + s)
        kinds = {"linear": 0.0, "attention": 0.0}
        total = 0.0
        for e in p.key_averages():
            us = e.self_cpu_time_total / steps / 1e3
            total += us
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
                         "lmwright::cpu_kernels.matmul"):
                kinds["linear"] += us
            elif "scaled_dot_product" in e.key or "flash_attention" in e.key or e.key == "lmwright::cpu_kernels.decode_attention":
                kinds["attention"] += us
        return {"batch": batch, "profiled_ms_per_step": wall, "linear_ms": kinds["linear"],
                "attention_ms": kinds["attention"], "other_ops_ms": total - sum(kinds.values()),
                "python_ms": wall - total}

    return _in_worker(run, threads)


def llama_cpp_one_stream(model_dir: Path, workdir: Path, ids: list[int], tokens: int, repeats: int, threads: int,
                         types=GGUF_TYPES) -> list[dict]:
    """llama.cpp (xllamacpp) one stream on ``lmwright export --format gguf`` of ``model_dir`` at each type."""
    try:
        import xllamacpp
    except ImportError:
        return [{"gguf_type": t, "skipped": "xllamacpp not installed (pip install xllamacpp)"} for t in types]
    from lmwright.export import export

    rows = []
    for gtype in types:
        t0 = time.perf_counter()
        out = workdir / f"gguf-{gtype}"
        export(model_dir, out, "gguf", log=None, gguf_type=gtype)
        export_s = time.perf_counter() - t0
        p = xllamacpp.CommonParams()
        p.model.path = str(out / "model.gguf")
        p.n_ctx = len(ids) + tokens + 16
        p.n_parallel = 1
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = True
        server = xllamacpp.Server(p)
        try:
            body = {"prompt": list(ids), "max_tokens": tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "min_p": 0.0, "ignore_eos": True, "cache_prompt": False}
            server.handle_completions({**body, "max_tokens": 2, "seed": 999})  # warm-up
            walls, decode, prompt_ms, n = [], [], [], 0
            for k in range(repeats):
                t1 = time.perf_counter()
                r = server.handle_completions({**body, "seed": k})
                walls.append(time.perf_counter() - t1)
                n += r["usage"]["completion_tokens"]
                decode.append(r["timings"]["predicted_per_second"])
                prompt_ms.append(r["timings"]["prompt_ms"])
        finally:
            del server
        rows.append({"gguf_type": gtype, "file_mb": (out / "model.gguf").stat().st_size / 2**20,
                     "export_s": export_s, "tokens": n, "tokens_per_s": n / sum(walls),
                     "decode_tokens_per_s": statistics.median(decode), "prompt_ms": statistics.median(prompt_ms)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens (seconds; for tests)")
    ap.add_argument("--preset", default=None, help="model preset (default llama-20m; llama-tiny with --smoke)")
    ap.add_argument("--model", default=None, help="a real model instead of a preset: smollm2, a .gguf file or a "
                                                  "Hugging Face folder (levels default 1,16; llama.cpp compared)")
    ap.add_argument("--llama-cpp", default=None, help="comma-separated GGUF types for the llama.cpp rows "
                                                      "(default f32,f16,q8_0 with --model; 'none' to skip)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 64; 8 with --smoke)")
    ap.add_argument("--levels", default=None, help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="sequential requests per client (2)")
    ap.add_argument("--rounds", type=int, default=None, help="HTTP rounds: the levels take turns this many times and "
                                                              "each level's figures merge them (default 3 with "
                                                              "--model, else 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for generate() and the engine "
                                                               "(default: 1 on <= 4 cores, else all cores)")
    ap.add_argument("--prefill-threads", type=int, default=None, help="the engine's threads for steps with 64 or "
                                                                       "more prompt tokens (lmwright serve "
                                                                       "prefill_threads; default: every core)")
    ap.add_argument("--variants", default=None, help="engine variants: eager,compiled (torch.compile of the "
                                                          "decode step, ~40 s of compiling); default eager")
    ap.add_argument("--weights", default="float32", choices=tuple(PAIRED_GGUF),
                    help="the engine's weights (lmwright serve --weights; generate() stays fp32); with --model, "
                         "llama.cpp runs the paired GGUF type only unless --llama-cpp says otherwise")
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0, help="the engine's prefix cache (lmwright serve "
                                                                         "prefix_cache_mb; 0 = off)")
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)  # internal: run as the load generator
    ap.add_argument("--first-prompt", type=int, default=0, help=argparse.SUPPRESS)  # internal: its first question
    ap.add_argument("--out", default=None, help="default bench/results/serve_load.json "
                                                "(serve_load_<model>.json with --model)")
    args = ap.parse_args(argv)
    if args.client:
        client_main(args.client, args.tokens, int(args.levels), args.requests_per_client, args.first_prompt)
        return {}

    import torch

    from lmwright.serve.api import load
    from lmwright.serve.engine import PARALLEL_PROMPT_TOKENS, LocalEngine
    from lmwright.utils.hardware import measure_matmul_flops

    # On a small CPU the server's HTTP thread and the load generator need a core too: an OpenMP pool over all
    # cores then oversubscribes them (measured on 2 cores: decode steps of 100-900 ms instead of ~15 ms while
    # neighbours ran), so small machines give torch 1 thread, as train_throughput does; generate() gets the same
    threads = args.threads or ((os.cpu_count() or 1) if (os.cpu_count() or 1) > 4 else 1)
    torch.set_num_threads(threads)  # the engine's scheduler thread starts with this count
    preset = args.preset or ("llama-tiny" if args.smoke else "llama-20m")
    tokens = args.tokens or (8 if args.smoke else 64)
    levels = [int(x) for x in (args.levels or ("1,4" if args.smoke else ("1,16" if args.model else "1,4,16"))).split(",")]
    default_types = ",".join(GGUF_TYPES) if args.weights == "float32" else PAIRED_GGUF[args.weights]
    gguf_types = [t for t in (args.llama_cpp or (default_types if args.model else "none")).split(",")
                  if t and t != "none"]
    if args.out is None:
        name = "serve_load" + (f"_{Path(args.model).stem if args.model != 'smollm2' else 'smollm2'}".replace("-", "_")
                               if args.model else "") + ("" if args.weights == "float32" else f"_{args.weights}")
        args.out = str(Path(__file__).parent / "results" / f"{name}.json")
    rpc = args.requests_per_client or (1 if args.smoke or args.model else 2)
    rounds = args.rounds or (3 if args.model else 1)
    vocab = 512 if args.smoke else 4096
    variants = (args.variants or "eager").split(",")

    flops = measure_matmul_flops(256 if args.smoke else 1024, 0.2 if args.smoke else 0.5)
    with tempfile.TemporaryDirectory() as d:
        if args.model:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import common

            model_dir = common.resolve_model(args.model)
            preset = args.model
        else:
            model_dir = build(preset, vocab, Path(d), 300 if args.smoke else 1500)
        lm = load(model_dir, name="bench")
        # the engine's model: the same folder with --weights applied (generate() keeps the fp32 model)
        served = lm if args.weights == "float32" else load(model_dir, name="bench", weights=args.weights)
        def chat_ids(text: str) -> list[int]:  # the prompt ids of a chat request asking ``text``
            return lm.chat_ids([{"role": "user", "content": text}])

        ids = chat_ids(PROMPT)  # generate() and llama.cpp
        n_params = sum(p.numel() for p in lm.model.parameters())
        load_before = os.getloadavg()
        # the baseline runs before and after the serving runs: on a shared machine the load drifts, and
        # the faster of the two is kept (the conservative choice for the ratios)
        reps = 1 if args.smoke or args.model else 2  # a real model's generate() is slow: one request, twice
        base1 = baseline(lm, ids, tokens, reps, threads)
        rows, ops, compile_s = [], [], None
        for variant in variants:
            t0 = time.perf_counter()
            engine = LocalEngine(served.model, served.tokenizer, max_seqs=max(16, *levels), queue_size=64, name="bench",
                                 compile=variant == "compiled", prefix_cache_mb=args.prefix_cache_mb,
                                 prefill_threads=args.prefill_threads)
            prefill_threads = engine.prefill_threads
            if variant == "compiled":
                compile_s = time.perf_counter() - t0
            try:
                engine_load(engine, chat_ids, 2, 1, 1, WARMUP_PROMPT)  # warm-up
                vrows, first = [], 0
                for c in levels:  # every measured request asks a question not asked before (see prompt_for)
                    vrows.append(engine_load(engine, chat_ids, tokens, c, rpc, first))
                    first += c * rpc
                vrows += http_load(engine, tokens, levels, rpc, first, rounds)
                for r in vrows:
                    r["variant"] = variant
                rows += vrows
                ops += [dict(op_profile(engine, b, 4 if args.smoke else 20, threads), variant=variant)
                        for b in sorted({1, max(levels)})]
            finally:
                engine.shutdown(drain_timeout_s=5)
        base2 = baseline(lm, ids, tokens, reps, threads)
        base = dict(max(base1, base2, key=lambda b: b["tokens_per_s"]),
                    before_tokens_per_s=base1["tokens_per_s"], after_tokens_per_s=base2["tokens_per_s"])
        all_cores = os.cpu_count() or 1
        # generate() with every core, for the record: is the thread count chosen above unfair to it? (measured
        # on the default model; SmolLM2's was 17.3 vs 17.4 tokens/s with 1 thread on the 2-core EPYC)
        base_all = baseline(lm, ids, tokens, reps, all_cores) if all_cores != threads and not args.model else None
        llama_cpp = llama_cpp_one_stream(model_dir, Path(d), ids, tokens, rpc, threads, gguf_types) if gguf_types else []
        load_after = os.getloadavg()
    for r in rows:
        r["ratio_vs_generate_b1"] = r["tokens_per_s"] / base["tokens_per_s"]
    # the targets are read off the HTTP rows of the best variant (the one faster at 16 streams, else at 1)
    def score(v):
        vr = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["mode"] == "http" and r["variant"] == v}
        return vr.get(16, vr.get(max(vr), 0.0))

    best = max(variants, key=score)
    http = {r["concurrency"]: r for r in rows if r["mode"] == "http" and r["variant"] == best}
    targets = {}
    if 1 in http:
        targets["one_stream_vs_generate"] = http[1]["ratio_vs_generate_b1"]
    if 1 in http and 16 in http:
        targets["c16_vs_c1"] = http[16]["tokens_per_s"] / http[1]["tokens_per_s"]
    if 16 in http:
        targets["ttft_p95_s_c16"] = http[16]["ttft_p95_s"]
    met = {k: (v <= TARGETS[k] if k.startswith("ttft") else v >= TARGETS[k]) for k, v in targets.items()}
    # llama.cpp: lmwright's one stream (the best variant, in-process engine and over HTTP) against each export
    eng1 = next((r for r in rows if r["mode"] == "engine" and r["variant"] == best and r["concurrency"] == 1), None)
    for lc in llama_cpp:
        if "tokens_per_s" not in lc:
            continue
        if eng1:
            lc["lmwright_engine_vs_llama_cpp"] = eng1["tokens_per_s"] / lc["tokens_per_s"]
            lc["lmwright_decode_vs_llama_cpp_decode"] = 1e3 / eng1["wall_ms_per_step"] / lc["decode_tokens_per_s"]
        if 1 in http:
            lc["lmwright_http_vs_llama_cpp"] = http[1]["tokens_per_s"] / lc["tokens_per_s"]
        lc["vs_generate_b1"] = lc["tokens_per_s"] / base["tokens_per_s"]
    paired = PAIRED_GGUF[args.weights]
    llama_key = f"one_stream_vs_llama_cpp_{paired}"
    if eng1:
        for lc in llama_cpp:
            if lc.get("gguf_type") == paired and "lmwright_engine_vs_llama_cpp" in lc:
                v = lc["lmwright_engine_vs_llama_cpp"]
                targets[llama_key] = v
                met[llama_key] = v >= LLAMA_CPP_TARGET
    result = {
        "bench": "serve_load", "preset": preset, "params": n_params, "new_tokens_per_request": tokens,
        "requests_per_client": rpc, "http_rounds": rounds, "prefix_cache_mb": args.prefix_cache_mb,
        "prompt_tokens_generate": len(ids), "engine_path": "lean llama" if engine._lean else "generic transformers",
        "variants": variants,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), "weights": args.weights,
        "weights_note": served.weights_note,
        "baseline_generate_b1": base, "serving": rows,
        "baseline_generate_b1_all_cores": dict(base_all, threads=all_cores) if base_all else None, "decode_step_profile": [o for o in ops if "batch" in o],
        "llama_cpp": llama_cpp,
        "targets": {"variant": best, "measured": targets,
                    "target": {**TARGETS, **({llama_key: LLAMA_CPP_TARGET} if llama_cpp else {})},
                    "met": met},
        "compile_warmup_s": compile_s,
        "calibration": {"matmul_flops_fp32": flops, "torch_threads": threads, "engine_prefill_threads": prefill_threads,
                        "loadavg_1m_before": load_before[0], "loadavg_1m_after": load_after[0]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "smoke": args.smoke, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"\nserve_load: {preset} ({n_params / 1e6:.1f}M params, {result['dtype']}; engine weights {args.weights}), {tokens} new tokens/request "
          f"(temperature 1, ignore_eos), prefix cache {args.prefix_cache_mb:g} MB, matmul {flops / 1e9:.1f} GFLOP/s, "
          f"{threads} threads (engine: {prefill_threads} for steps with >= {PARALLEL_PROMPT_TOKENS} prompt tokens), "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'setup':<36}{'tok/s':>8}{'x gen':>7}{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'ms/step':>9}{'fwd':>7}{'smp+emit':>9}{'prefill':>8}{'outside':>8}")
    print(f"{'model.generate() batch 1':<36}{base['tokens_per_s']:>8.1f}{1.0:>7.2f}   "
          f"(before {base1['tokens_per_s']:.1f}, after {base2['tokens_per_s']:.1f}; "
          f"HF forward step {base['hf_forward_step_ms']:.2f} ms)")
    if base_all:
        print(f"{'  same, ' + str(all_cores) + ' threads':<36}{base_all['tokens_per_s']:>8.1f}"
              f"{base_all['tokens_per_s'] / base['tokens_per_s']:>7.2f}   (for the record; ratios use "
              f"{threads} thread(s) for both)")
    for r in rows:
        print(f"{r['variant'] + ' ' + r['mode'] + ', ' + str(r['concurrency']) + ' streams':<36}{r['tokens_per_s']:>8.1f}"
              f"{r['ratio_vs_generate_b1']:>7.2f}{r['ttft_p50_s'] * 1000:>8.0f}ms{r['ttft_p95_s'] * 1000:>8.0f}ms"
              f"{r['wall_ms_per_step']:>9.2f}{r['forward_ms_per_step']:>7.2f}{r['sample_emit_ms_per_step']:>9.2f}"
              f"{r['prefill_ms_per_step']:>8.2f}{r['outside_scheduler_ms_per_step']:>8.2f}"
              + f"   prompt tokens {r['prompt_tokens']}, {r['prefix_hit_tokens']} from the prefix cache;"
              + (f" TTFT mean {r['ttft_mean_s'] * 1000:.0f}ms, in the server {r['server_ttft_mean_s'] * 1000:.0f}ms;"
                 f" CPU ms/token: engine {r['cpu_ms_per_token_engine']:.2f}, HTTP {r['cpu_ms_per_token_http']:.2f},"
                 f" clients {r['cpu_ms_per_token_client']:.2f}" if "server_ttft_mean_s" in r else "")
              + (" rounds " + " / ".join(f"{x:.1f}" for x in r["rounds_tokens_per_s"]) + " tok/s"
                 if len(r.get("rounds_tokens_per_s", [])) > 1 else ""))
    for o in result["decode_step_profile"]:
        print(f"{o['variant']} decode step at batch {o['batch']}: {o['profiled_ms_per_step']:.2f} ms = linear {o['linear_ms']:.2f} "
              f"+ attention {o['attention_ms']:.2f} + other ops {o['other_ops_ms']:.2f} + python "
              f"{max(0.0, o['python_ms']):.2f} (op times under the profiler)")
    if compile_s is not None:
        print(f"compiled engine: torch.compile + warm-up at engine start took {compile_s:.1f} s")
    for lc in llama_cpp:
        if "tokens_per_s" not in lc:
            print(f"llama.cpp {lc['gguf_type']}: {lc['skipped']}")
            continue
        print(f"llama.cpp (xllamacpp) {lc['gguf_type']:<5} one stream {lc['tokens_per_s']:>7.1f} tok/s "
              f"({lc['vs_generate_b1']:.2f}x generate()), decode only {lc['decode_tokens_per_s']:.1f} tok/s, prompt "
              f"{lc['prompt_ms']:.0f} ms, file {lc['file_mb']:.0f} MB; lmwright one stream / llama.cpp: engine "
              f"{lc.get('lmwright_engine_vs_llama_cpp', float('nan')):.2f}, HTTP "
              f"{lc.get('lmwright_http_vs_llama_cpp', float('nan')):.2f}, decode only "
              f"{lc.get('lmwright_decode_vs_llama_cpp_decode', float('nan')):.2f}")
    limits = {**TARGETS, llama_key: LLAMA_CPP_TARGET}
    print(f"targets ({best} engine, HTTP; llama.cpp: in-process engine):",
          {k: f"{v:.2f} ({'met' if met[k] else 'NOT met'}, target {limits[k]})" for k, v in targets.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
