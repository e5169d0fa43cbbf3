"""As a user would type it: make the example data, validate and train the shipped CLM config, generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmwright.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_data.py"), "--out", str(d / "examples" / "data"),
                    "--docs", "600"], check=True, capture_output=True, timeout=300)
    return d


def test_pretrain_then_generate(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    cfg = str(ROOT / "configs" / "pretrain" / "clm.yaml")
    assert main(["validate", "-c", cfg]) == 0
    assert main(["train", "pretrain", "-c", cfg, "train.max_steps=30", "train.eval_every=15",
                 "train.save_every=15", "train.progress=false", "train.mixed_precision=no"]) == 0
    run = workdir / "runs" / "clm-example"
    # the run folder of design.md section 1
    for name in ("config.yaml", "run.json", "metrics.jsonl", "report.html", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "final/generation_config.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-15", "step-30"]
    info = json.loads((run / "run.json").read_text())
    assert info["versions"]["torch"] and "hardware" in info and info["data_manifest_sha256"]
    assert info["after"]["val_loss"] < info["before"]["val_loss"]  # the loss fell
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run / "final"))
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "The capital of", "--max-tokens", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), "generate printed nothing"


def test_bad_config_is_a_clear_error(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    bad = workdir / "bad.yaml"
    bad.write_text("stage: pretrain\nmodel:\n  name: llama-tiny\ntrain:\n  max_stpes: 3\n")
    assert main(["validate", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.max_stpes" in err and "max_steps" in err
    # an objective that does not fit the model fails before training
    assert main(["validate", "-c", str(ROOT / "configs" / "pretrain" / "clm.yaml"), "model.name=bert-tiny"]) == 2
    assert "decoder-only" in capsys.readouterr().err


def test_help_lists_config_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.lr" in out and "peak learning rate" in out
