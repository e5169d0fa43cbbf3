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
    out = mod.main(["--smoke", "--out", str(tmp_path / "serve.json")])
    assert out
