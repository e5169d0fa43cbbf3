"""`lmwright eval` on the demo's runs, without --data, prints the numbers the runs recorded.

The quick demo runs in a subprocess: it trains with the engine's default precision (bf16 autocast
where the hardware has it), and an Accelerator's precision is fixed per process (the other tests run
in fp32). Its workdir is relative, and eval runs from another directory: the run's data paths are
found from the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmwright.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmwright.cli", "demo", "--quick", "--workdir", "d", "skip=[align]"]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=600)
    return root


def _eval(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    out = tmp_path / "m.json"
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _after(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())["after"]


def test_pretrain_perplexity_equals_run_json(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the directory the demo ran in
    run = demo / "d" / "runs" / "pretrain"
    after = _after(run)
    m, printed = _eval(tmp_path, capsys, "--model", str(run), "--task", "perplexity")
    assert m["val_loss"] == pytest.approx(after["val_loss"], rel=1e-5)
    assert m["val_ppl"] == pytest.approx(after["val_ppl"], rel=1e-5)
    assert m["rows"] == json.loads((run / "run.json").read_text())["val_rows"]
    assert f"val_ppl   {after['val_ppl']:.4f}" in printed and "recorded in run.json after" in printed
    # a checkpoint: the evaluation logged at its step
    ckpt = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[0]
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("step") == int(ckpt.name[5:]) and "val_loss" in r][-1]
    m, _ = _eval(tmp_path, capsys, "--model", str(ckpt), "--task", "perplexity")
    assert m["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_sft_loss_and_exact_match_equal_run_json(demo, tmp_path, capsys):
    run = demo / "d" / "runs" / "sft-lora"
    info = json.loads((run / "run.json").read_text())
    m, _ = _eval(tmp_path, capsys, "--model", str(run), "--task", "perplexity")
    assert m["val_loss"] == pytest.approx(info["after"]["val_loss"], rel=1e-5)
    m, printed = _eval(tmp_path, capsys, "--model", str(run / "final"), "--task", "generation")
    assert m["val_exact_match"] == info["after"]["val_exact_match"]
    assert "val_exact_match" in printed
    # the same held-out prompts, answered the same way
    assert m["examples"] == min(48, info["data_counts"]["validation"])  # the demo's eval_generate=48
    first = m["samples"][:len(info["samples"])]
    assert [s["after"] for s in info["samples"]] == [s["prediction"] for s in first]
    assert [s["reference"] for s in info["samples"]] == [s["reference"] for s in first]


def test_without_data_needs_a_run(demo, tmp_path, capsys):
    run = demo / "d" / "runs" / "pretrain"
    assert main(["eval", "--model", str(run), "--task", "generation"]) != 0
    assert "--data is required" in capsys.readouterr().err
    assert main(["eval", "--model", str(demo / "d" / "tokenizer"), "--task", "perplexity"]) != 0
    assert "not a run folder" in capsys.readouterr().err
    # explicit --data still evaluates those records
    m, _ = _eval(tmp_path, capsys, "--model", str(run), "--task", "perplexity", "--data",
                 str(demo / "d" / "data" / "chat_stories.jsonl"), "--limit", "5")
    assert m["documents"] == 5 and m["perplexity"] > 1
