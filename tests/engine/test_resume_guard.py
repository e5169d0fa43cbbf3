"""Issue 13: a resume never continues a run whose config or data changed (unless train.resume=force, which
keeps the original config); without train.run_name the same command resumes the newest unfinished run of
that config; SIGTERM saves a checkpoint like Ctrl-C; every rank's RNG state is saved and restored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmwright.config import load_config
from lmwright.engine.checkpoint import ResumeError, list_checkpoints
from lmwright.stages.pretrain import PretrainConfig, run


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    from lmwright.data.synthetic import story_corpus

    f = tmp_path_factory.mktemp("data") / "stories.txt"
    f.write_text("\n".join(story_corpus(120, seed=4)) + "\n")
    return f


def _cfg(out: Path, tokenizer_dir, data: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, overrides=[
        "objective=clm", "model.name=llama-tiny", f"tokenizer={tokenizer_dir}", f"data.path=[{data}]",
        "seq_len=32", "train.micro_batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=0",
        "train.save_every=2", "train.log_every=1", "train.progress=false", "train.mixed_precision=no",
        f"train.output_dir={out}", *extra])


def _unfinish(run_dir: Path) -> None:
    """Make a finished run look like one stopped after step 2 (as if killed before its last save)."""
    shutil.rmtree(run_dir / "final")
    for p in list_checkpoints(run_dir / "checkpoints"):
        if p.name != "step-2":
            shutil.rmtree(p)


def test_changed_config_is_refused_and_force_keeps_the_original(tmp_path, tokenizer_dir, stories):
    first = run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r"))
    _unfinish(first)
    before = (first / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"train\.lr: 0\.0003 -> 0\.002.*train\.resume=force"):
        run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r", "train.lr=2e-3"))
    assert (first / "config.yaml").read_text() == before  # nothing was overwritten
    assert not (first / "final").exists()

    out = run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r", "train.lr=2e-3", "train.resume=force"))
    assert out == first
    assert yaml.safe_load((first / "config.original.yaml").read_text())["train"]["lr"] == 3e-4
    assert yaml.safe_load((first / "config.yaml").read_text())["train"]["lr"] == 2e-3
    info = json.loads((first / "run.json").read_text())
    assert any(c.startswith("train.lr") for c in info["resumed_with_changes"])
    assert info["final_step"] == 4 and (first / "final").is_dir()


def test_changed_data_is_refused(tmp_path, tokenizer_dir, stories):
    first = run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r"))
    _unfinish(first)
    other = tmp_path / "stories.txt"
    other.write_text(stories.read_text() + "One more story about a cat that sat.\n")
    with pytest.raises(ResumeError, match="data: manifest sha256"):
        run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r", f"data.path=[{other}]"))


def test_logging_options_may_change_on_resume(tmp_path, tokenizer_dir, stories):
    first = run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r"))
    _unfinish(first)
    run(_cfg(tmp_path, tokenizer_dir, stories, "train.run_name=r", "train.log_every=2", "train.keep_last=5"))
    assert json.loads((first / "run.json").read_text())["final_step"] == 4
    assert not (first / "config.original.yaml").exists()


def test_same_command_without_run_name_resumes_the_unfinished_run(tmp_path, tokenizer_dir, stories, caplog):
    first = run(_cfg(tmp_path, tokenizer_dir, stories))
    _unfinish(first)
    time.sleep(1.1)  # a new run would get another timestamped name
    with caplog.at_level("INFO", logger="lmwright.engine"):
        again = run(_cfg(tmp_path, tokenizer_dir, stories))
    assert again == first
    assert [d.name for d in tmp_path.iterdir() if d.name.startswith("pretrain-")] == [first.name]
    assert "resumed from" in caplog.text and "step-2" in caplog.text
    # a finished run is not resumed: the same command makes a new run
    time.sleep(1.1)
    third = run(_cfg(tmp_path, tokenizer_dir, stories))
    assert third != first
    # nor is an unfinished run of another config
    _unfinish(third)
    time.sleep(1.1)
    fourth = run(_cfg(tmp_path, tokenizer_dir, stories, "train.lr=1e-3"))
    assert fourth not in (first, third)


def test_rng_state_of_every_rank_round_trips(tmp_path, tokenizer):
    import torch

    from lmwright.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny"), "causal-lm", tokenizer=tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    torch.manual_seed(1)
    r0 = rng_state()
    torch.manual_seed(2)
    r1 = rng_state()
    path = save_checkpoint(tmp_path, 2, model, opt, {"step": 2, "position": 2}, rng_states=[r0, r1])
    assert (path / "rng-rank1.pt").exists() and (path / "rng-rank1.json").exists()
    load_checkpoint(path, model, opt, rank=1)
    a = torch.rand(3)
    torch.manual_seed(2)
    assert torch.equal(a, torch.rand(3))
    load_checkpoint(path, model, opt, rank=0)
    b = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(b, torch.rand(3))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _cli(out: Path, tokenizer_dir, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmwright.cli", "train", "pretrain", "objective=clm", "model.name=llama-tiny",
            f"tokenizer={tokenizer_dir}", f"data.path=[{data}]", "seq_len=32", "train.micro_batch_size=4",
            "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "train.progress=false",
            "train.mixed_precision=no", f"train.output_dir={out}", "train.run_name=r", *extra]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, tokenizer_dir, stories):
    cmd = _cli(tmp_path, tokenizer_dir, stories, "train.max_steps=100000", "train.save_every=0")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert "SIGTERM received" in log, log[-2000:]
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert ckpts, log[-2000:]
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["interrupted"] is True and info["final_step"] == int(ckpts[-1].name.split("-")[1])


@pytest.mark.slow  # three 2-process torchrun launches: ~1-2 min on a 2-core CPU
def test_two_process_resume_is_bit_exact(tmp_path, tokenizer_dir, stories):
    """With dropout on, each rank draws its own masks: a resume must restore every rank's RNG."""
    from safetensors.torch import load_file

    def launch(name: str) -> None:
        cmd = _cli(tmp_path, tokenizer_dir, stories, "train.max_steps=4", "train.save_every=2", "model.dropout=0.2",
                   "train.keep_last=5", "--nproc=2")
        cmd[cmd.index("train.run_name=r")] = f"train.run_name={name}"
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    launch("whole")
    launch("cut")
    assert (tmp_path / "cut" / "checkpoints" / "step-2" / "rng-rank1.pt").exists()
    _unfinish(tmp_path / "cut")
    launch("cut")  # resumes from step 2
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed 2-process run differs from the uninterrupted one"
