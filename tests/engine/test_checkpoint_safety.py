"""Issue 13: a corrupt newest checkpoint falls back to the previous good one; files are fsynced before
the rename; final/ is written to a temp folder and renamed."""

from __future__ import annotations

import json
import logging
import os

import pytest

from lmwright.engine import Run, TrainConfig, train
from lmwright.engine.checkpoint import ResumeError, list_checkpoints, load_checkpoint, save_checkpoint
from lmwright.models import ModelConfig, build_model
from lmwright.objectives.base import causal_lm_loss


@pytest.fixture(scope="module")
def rows(tokenizer):
    from lmwright.data.packing import pack_concat, tokenize_documents
    from lmwright.data.synthetic import story_corpus

    return pack_concat(tokenize_documents(tokenizer, story_corpus(200, seed=5)), 32)[:32]


def collate(rows):
    from lmwright.data.packing import collate_packed

    return collate_packed(rows)


def make_model(tokenizer):
    return build_model(ModelConfig(name="llama-tiny"), "causal-lm", tokenizer=tokenizer, seed=0)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), run_name="r", max_steps=4, micro_batch_size=8, lr=3e-3, warmup_steps=1,
                log_every=1, eval_every=0, save_every=2, keep_last=3, progress=False, seed=0, mixed_precision="no")
    base.update(kw)
    return TrainConfig(**base)


def _corrupt(ckpt, how):
    if how == "truncated weights":
        f = ckpt / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "truncated optimizer":
        f = ckpt / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "empty state":
        (ckpt / "trainer_state.json").write_text("")
    elif how == "garbled rng":
        (ckpt / "rng.pt").write_bytes(b"\0" * 64)


@pytest.mark.parametrize("how", ["truncated weights", "truncated optimizer", "empty state", "garbled rng"])
def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, tokenizer, rows, how, caplog):
    c = cfg(tmp_path)
    train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "r", "test"))
    ckdir = tmp_path / "r" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-2", "step-4"]
    _corrupt(ckdir / "step-4", how)

    logging.getLogger("lmwright").addHandler(caplog.handler)
    try:
        c2 = cfg(tmp_path, max_steps=6)
        res = train(make_model(tokenizer), rows, collate, causal_lm_loss, c2, Run.create(c2.output_dir, "r", "test"))
    finally:
        logging.getLogger("lmwright").removeHandler(caplog.handler)
    assert res.step == 6
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-4" in m and ("corrupt" in m or "incomplete" in m) for m in warned), warned
    assert any("resumed from" in r.getMessage() and "step-2" in r.getMessage() for r in caplog.records)


def test_every_checkpoint_corrupt_is_a_clear_resume_error(tmp_path, tokenizer, rows):
    c = cfg(tmp_path, max_steps=2)
    train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "r", "test"))
    _corrupt(tmp_path / "r" / "checkpoints" / "step-2", "truncated weights")
    with pytest.raises(ResumeError, match="step-2 is corrupt .*trainable.safetensors.*train.resume=never"):
        train(make_model(tokenizer), rows, collate, causal_lm_loss, cfg(tmp_path, max_steps=4),
              Run.create(str(tmp_path), "r", "test"))


def test_corrupt_checkpoint_leaves_model_untouched(tmp_path, tokenizer):
    import torch

    from lmwright.engine.loop import build_optimizer

    c = cfg(tmp_path)
    src = make_model(tokenizer)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path, 1, src, build_optimizer(src, c), {"step": 1, "position": 0})
    (tmp_path / "step-1" / "trainer_state.json").write_text("{")  # the last file read
    model = make_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ResumeError, match="corrupt"):
        load_checkpoint(tmp_path / "step-1", model, build_optimizer(model, c))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, tokenizer, monkeypatch):
    from lmwright.engine.loop import build_optimizer

    opened: dict[int, str] = {}
    synced: list[str] = []
    renamed_after: dict[str, int] = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(path, *a, **kw):
        fd = real_open(path, *a, **kw)
        opened[fd] = os.path.basename(str(path))
        return fd

    def spy_fsync(fd):
        synced.append(opened.get(fd, "?"))
        return real_fsync(fd)

    def spy_replace(a, b):
        renamed_after[os.path.basename(str(b))] = len(synced)
        return real_replace(a, b)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    model = make_model(tokenizer)
    save_checkpoint(tmp_path, 3, model, build_optimizer(model, cfg(tmp_path)), {"step": 3, "position": 0})
    before_rename = synced[: renamed_after["step-3"]]
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "rng.json", "trainer_state.json"):
        assert name in before_rename, (name, synced)


def test_final_is_written_aside_and_renamed(tmp_path, tokenizer, monkeypatch):
    import lmwright.stages.common as common

    model = make_model(tokenizer)
    out = tmp_path / "run" / "final"
    common.save_final(model, tokenizer, out, "causal-lm", extra={"mark": "old"})
    old_weights = (out / "model.safetensors").read_bytes()

    def die(*a, **kw):
        raise KeyboardInterrupt  # a kill between the weights and the generation config

    import lmwright.models.meta as meta

    monkeypatch.setattr(meta, "write_generation_config", die)
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        common.save_final(model, tokenizer, out, "causal-lm", extra={"mark": "new"})
    assert json.loads((out / "lmwright.json").read_text())["mark"] == "old"
    assert (out / "model.safetensors").read_bytes() == old_weights
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]  # no temp folder left behind
    monkeypatch.undo()
    assert common.save_final(model, tokenizer, out, "causal-lm", extra={"mark": "new"}) == out
    assert json.loads((out / "lmwright.json").read_text())["mark"] == "new"
    assert (out / "model.safetensors").read_bytes() != old_weights
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]


def test_export_publishes_through_the_fsynced_rename(tmp_path, monkeypatch):
    """An export's folder is fsynced before it is renamed into place (the same helper as checkpoints)."""
    import lmwright.export as export_mod
    import lmwright.utils.files as files

    calls = []
    real = files.fsync_tree
    monkeypatch.setattr(files, "fsync_tree", lambda root: (calls.append(root), real(root))[1])
    tmp, out = tmp_path / ".tmp-export", tmp_path / "out"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"x")
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert export_mod.replace_dir is files.replace_dir
    export_mod.replace_dir(tmp, out)
    assert calls == [tmp] and (out / "model.safetensors").exists() and not (out / "old.txt").exists()
