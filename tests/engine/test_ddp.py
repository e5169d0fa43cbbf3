"""Data-parallel training on CPU (gloo): 2 processes x micro 4 == 1 process x micro 8, and only rank 0
writes. Runs the real CLI (`lmwright train pretrain --nproc 2` re-launches itself under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two torchrun workers + one single-process run: > 60 s on a 2-core CPU


def _train(tmp: Path, tokenizer_dir: Path, data: Path, name: str, micro: int, nproc: int) -> Path:
    cmd = [sys.executable, "-m", "lmwright.cli", "train", "pretrain", "objective=clm", "model.name=llama-tiny",
           f"tokenizer={tokenizer_dir}", f"data.path=[{data}]", "seq_len=64", "train.max_steps=4",
           f"train.micro_batch_size={micro}", "train.log_every=1", "train.eval_every=0", "train.save_every=2",
           "train.warmup_steps=0", "train.lr=1e-3", "train.progress=false", f"train.output_dir={tmp}",
           f"train.run_name={name}", "train.mixed_precision=no", f"--nproc={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / name


def test_two_processes_match_one(tmp_path, tokenizer_dir):
    from lmwright.data.synthetic import story_corpus

    data = tmp_path / "stories.txt"
    data.write_text("\n".join(story_corpus(300, seed=3)) + "\n")
    one = _train(tmp_path, tokenizer_dir, data, "one", micro=8, nproc=1)
    two = _train(tmp_path, tokenizer_dir, data, "two", micro=4, nproc=2)

    def losses(run: Path) -> list[float]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if "loss" in r]
        assert [r["step"] for r in train] == [1, 2, 3, 4]  # one line per step: a single writer
        return [r["loss"] for r in train] + [r["val_loss"] for r in recs if "val_loss" in r]

    l1, l2 = losses(one), losses(two)
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5), (l1, l2)
    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 8
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]  # no stray temp folders from a second writer
    assert (two / "final" / "model.safetensors").exists()
