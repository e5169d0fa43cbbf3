"""Each bench script runs end to end with --smoke (tiny model, a few steps, in-process) so it cannot rot.

The scripts are imported and their ``main(argv)`` called in this process (one import of torch and
transformers for all of them); results go to a temporary file, never to bench/results/.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.mark.parametrize("argv", [["--stage", "pretrain"], ["--stage", "sft", "--method", "lora"]],
                         ids=["pretrain", "sft-lora"])
def test_train_throughput_smoke(tmp_path, argv):
    out = _script("train_throughput").main(["--smoke", *argv, "--out", str(tmp_path / "r.json")])
    rows = {r["id"]: r for r in out["results"]}
    assert rows["lmwright"]["tokens_per_s"] > 0
    assert rows["hf_trainer"]["tokens_per_s"] > 0
    assert (tmp_path / "r.json").exists()
    # same seeded model and data: the first losses agree closely
    assert abs(rows["lmwright"]["first_loss"] - rows["hf_trainer"]["first_loss"]) < 0.5


def test_pretrain_throughput_smoke(tmp_path):
    out = _script("pretrain_throughput").main(["--smoke", "--out", str(tmp_path / "r.json")])
    assert all(r["tokens_per_s"] > 0 and r["model_flops"] > 0 for r in out["results"])
    assert out["flops_per_token"] > 0


def test_memory_smoke(tmp_path):
    out = _script("memory").main(["--smoke", "--methods", "full,lora,qlora", "--out", str(tmp_path / "r.json")])
    by = {r["method"]: r for r in out["training"]}
    assert by["lora"]["trainable"] < by["full"]["trainable"]
    assert by["qlora"]["base_weight_mb"] < by["lora"]["base_weight_mb"]


def test_serve_load_smoke(tmp_path):
    if not (BENCH / "serve_load.py").exists():
        pytest.skip("bench/serve_load.py not present")
    mod = _script("serve_load")
    out = mod.main(["--smoke", "--rounds", "2", "--out", str(tmp_path / "serve.json")])
    assert out["http_rounds"] == 2
    http = [r for r in out["serving"] if r["mode"] == "http"]
    assert sorted(r["concurrency"] for r in http) == [1, 4]  # one merged row per level
    for r in http:
        assert len(r["rounds_tokens_per_s"]) == 2 and r["requests"] == 2 * r["concurrency"]
        assert r["tokens"] == r["requests"] * out["new_tokens_per_request"] and "_ttft" not in r


def test_serve_load_merges_rounds_by_totals():
    mod = _script("serve_load")

    def row(tokens, seconds, steps, ttft, fwd):
        return {"mode": "http", "concurrency": 2, "requests": 2, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds, "prompt_tokens": 10, "prefix_hit_tokens": 4, "engine_steps": steps,
                "wall_ms_per_step": fwd + 1, "forward_ms_per_step": fwd, "sample_emit_ms_per_step": 0.5,
                "prefill_ms_per_step": 0.1, "outside_scheduler_ms_per_step": 0.4, "server_ttft_mean_s": ttft[0],
                "cpu_ms_per_token_http": 1.0, "_ttft": ttft}

    m = mod.merge_rounds([row(100, 1.0, 50, [0.1, 0.2], 10.0), row(100, 3.0, 150, [0.3, 0.4], 20.0)])
    assert m["tokens"] == 200 and m["seconds"] == 4.0 and m["tokens_per_s"] == 50.0  # not the mean of 100 and 33
    assert m["rounds_tokens_per_s"] == [100.0, 100 / 3] and m["requests"] == 4 and m["engine_steps"] == 200
    assert m["forward_ms_per_step"] == 17.5  # weighted by steps
    assert m["ttft_p50_s"] == 0.25 and m["ttft_mean_s"] == 0.25
