"""The training loop: accumulation equivalence, exact resume, atomic checkpoints, NaN stop,
best checkpoint + early stopping, SIGINT."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from lmwright.engine import Run, TrainConfig, TrainingDiverged, train
from lmwright.engine.checkpoint import ResumeError, list_checkpoints, load_checkpoint
from lmwright.models import ModelConfig, build_model
from lmwright.objectives.base import LossOutput, causal_lm_loss


@pytest.fixture(scope="module")
def rows(tokenizer):
    from lmwright.data.packing import pack_concat, tokenize_documents
    from lmwright.data.synthetic import story_corpus

    docs = tokenize_documents(tokenizer, story_corpus(300, seed=5))
    return pack_concat(docs, 32)[:64]


def collate(rows):
    from lmwright.data.packing import collate_packed

    return collate_packed(rows)


def make_model(tokenizer, dropout=None):
    return build_model(ModelConfig(name="llama-tiny", dropout=dropout), "causal-lm", tokenizer=tokenizer, seed=0)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), run_name="r", max_steps=6, micro_batch_size=8, lr=3e-3, warmup_steps=2,
                log_every=1, eval_every=0, save_every=0, progress=False, seed=0, mixed_precision="no")
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir):
    return [m["loss"] for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "lr" in m]


def test_accumulation_equivalence(tmp_path, tokenizer, rows, monkeypatch):
    """k micro-batches of b == one batch of k*b: same losses and the same final weights.

    SGD instead of AdamW: Adam divides by sqrt(v), which turns float rounding in near-zero gradients
    into visible weight differences; SGD keeps the comparison about the gradients themselves.
    """
    import lmwright.engine.loop as loop

    monkeypatch.setattr(loop, "build_optimizer",
                        lambda model, c: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=c.lr))
    results = {}
    for steps in (1, 6):
        for micro, accum in [(8, 1), (4, 2), (2, 4)]:
            model = make_model(tokenizer)
            w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
            c = cfg(tmp_path, run_name=f"m{micro}-{steps}", micro_batch_size=micro, grad_accum=accum, lr=0.5,
                    max_steps=steps, max_grad_norm=0.0)
            train(model, rows, collate, causal_lm_loss, c, Run.create(c.output_dir, c.run_name, "test"))
            results[(micro, accum, steps)] = (losses(tmp_path / c.run_name),
                                              torch.cat([p.detach().flatten() for p in model.parameters()]) - w0)
    # one step: the update (the gradient x lr) is the same to float rounding
    ref_loss, ref_w = results[(8, 1, 1)]
    for key in [(4, 2, 1), (2, 4, 1)]:
        assert results[key][0] == pytest.approx(ref_loss, rel=1e-6)
        update, ref_update = results[key][1], ref_w
        rel_err = (update - ref_update).norm() / ref_update.norm()
        assert rel_err < 1e-5, (key, float(rel_err))
    # several steps: rounding differences compound only slowly
    ref_loss, _ = results[(8, 1, 6)]
    for key in [(4, 2, 6), (2, 4, 6)]:
        assert results[key][0] == pytest.approx(ref_loss, abs=5e-3), key
    assert ref_loss[-1] < ref_loss[0]


class Kill(Exception):
    pass


def test_exact_resume_after_kill(tmp_path, tokenizer, rows):
    """2N steps straight == N steps, a kill, then resume: identical loss sequence (dropout on)."""
    n = 4
    straight = cfg(tmp_path, run_name="straight", max_steps=2 * n)
    train(make_model(tokenizer, 0.1), rows, collate, causal_lm_loss, straight,
          Run.create(straight.output_dir, straight.run_name, "test"))

    killed = cfg(tmp_path, run_name="killed", max_steps=2 * n, save_every=n)

    def die(rec):
        if rec.get("step") == n + 2:
            raise Kill

    with pytest.raises(Kill):
        train(make_model(tokenizer, 0.1), rows, collate, causal_lm_loss, killed,
              Run.create(killed.output_dir, killed.run_name, "test"), on_log=die)
    assert [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")] == [f"step-{n}"]
    res = train(make_model(tokenizer, 0.1), rows, collate, causal_lm_loss, killed,
                Run.create(killed.output_dir, killed.run_name, "test"))
    assert res.step == 2 * n
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert len(a) == len(b) == 2 * n
    assert b == pytest.approx(a, abs=1e-6)


def test_resume_refuses_loudly(tmp_path, tokenizer, rows):
    c = cfg(tmp_path, run_name="x", max_steps=2, save_every=2)
    train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "x", "test"))
    with pytest.raises(ResumeError, match="already has checkpoints"):
        c2 = cfg(tmp_path, run_name="x", max_steps=4, resume="never")
        train(make_model(tokenizer), rows, collate, causal_lm_loss, c2, Run.create(c2.output_dir, "x", "test"))
    with pytest.raises(ResumeError, match="micro_batch_size"):
        c3 = cfg(tmp_path, run_name="x", max_steps=4, micro_batch_size=4)
        train(make_model(tokenizer), rows, collate, causal_lm_loss, c3, Run.create(c3.output_dir, "x", "test"))
    with pytest.raises(ResumeError, match="not a checkpoint folder"):
        c4 = cfg(tmp_path, run_name="y", resume=str(tmp_path / "nowhere"))
        train(make_model(tokenizer), rows, collate, causal_lm_loss, c4, Run.create(c4.output_dir, "y", "test"))


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, tokenizer, rows):
    c = cfg(tmp_path, run_name="a", max_steps=4, save_every=2)
    calls = {"n": 0}

    def save_model(model, d):
        calls["n"] += 1
        d.mkdir(parents=True)
        (d / "partial.bin").write_bytes(b"x")
        if calls["n"] == 2:  # the second checkpoint dies half-written
            raise Kill

    with pytest.raises(Kill):
        train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "a", "test"),
              save_model=save_model)
    ckdir = tmp_path / "a" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-2"]
    assert any(p.name.startswith(".tmp-") for p in ckdir.iterdir())  # the half-written one
    model = make_model(tokenizer)
    from lmwright.engine.loop import build_optimizer

    state = load_checkpoint(ckdir / "step-2", model, build_optimizer(model, c))
    assert state["step"] == 2
    # the next start cleans the temp folder and resumes from step 2
    res = train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "a", "test"))
    assert res.step == 4
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())


def test_nan_stops_with_clear_error(tmp_path, tokenizer, rows):
    calls = {"n": 0}

    def objective(model, batch):
        out = causal_lm_loss(model, batch)
        calls["n"] += 1
        if calls["n"] >= 4:
            return LossOutput(out.loss_sum * float("nan"), out.n_targets)
        return out

    c = cfg(tmp_path, run_name="nan", max_steps=6, save_every=2)
    with pytest.raises(TrainingDiverged, match="not finite.*step-2"):
        train(make_model(tokenizer), rows, collate, objective, c, Run.create(c.output_dir, "nan", "test"))
    assert [p.name for p in list_checkpoints(tmp_path / "nan" / "checkpoints")] == ["step-2"]


def test_best_checkpoint_and_early_stopping(tmp_path, tokenizer, rows):
    scores = iter([0.3, 0.8, 0.6, 0.5, 0.4, 0.2])
    snapshots = {}
    model = make_model(tokenizer)

    def evaluate(m):
        return {"val_accuracy": next(scores)}

    def on_log(rec):
        if "val_accuracy" in rec:
            snapshots[rec["step"]] = [p.detach().clone() for p in model.parameters()]

    c = cfg(tmp_path, run_name="best", max_steps=12, eval_every=2, metric_for_best="val_accuracy",
            early_stopping_patience=2)
    res = train(model, rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "best", "test"),
                evaluate=evaluate, on_log=on_log)
    assert res.stopped_early and res.step == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    assert res.best_step == 4 and res.best_metric == pytest.approx(0.8)
    # final weights are the best step's (load_best_at_end), and its checkpoint survived pruning
    for p, q in zip(model.parameters(), snapshots[4]):
        assert torch.equal(p.detach(), q)
    names = [p.name for p in list_checkpoints(tmp_path / "best" / "checkpoints")]
    assert "step-4" in names


def test_sigint_saves_and_exits_cleanly(tmp_path, tokenizer, rows):
    def on_log(rec):
        if rec.get("step") == 3:
            os.kill(os.getpid(), signal.SIGINT)

    c = cfg(tmp_path, run_name="int", max_steps=10)
    res = train(make_model(tokenizer), rows, collate, causal_lm_loss, c, Run.create(c.output_dir, "int", "test"),
                on_log=on_log)
    assert res.interrupted and res.step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "int" / "checkpoints")] == ["step-3"]


def test_bf16_objective_that_keeps_output_dtype_skips_the_fp32_logits_copy(tmp_path, tokenizer, rows):
    """accelerate's mixed precision casts every forward output to fp32; an objective marked
    ``output_dtype_kept`` (causal_lm_loss, sft_loss: they compute in fp32 from any dtype) gets the autocast
    dtype instead, an unmarked one still gets fp32, and after training the model's forward is accelerate's again
    (the same loss either way, to bf16 rounding of nothing: the logits are bf16 numbers in both)."""
    from functools import partial

    from lmwright.objectives.base import keeps_output_dtype, output_dtype_kept

    seen = []

    def plain(model, batch):
        seen.append(model(input_ids=batch["input_ids"]).logits.dtype)
        return causal_lm_loss(model, batch)

    kept = output_dtype_kept(lambda model, batch: plain(model, batch))
    assert keeps_output_dtype(causal_lm_loss) and keeps_output_dtype(partial(causal_lm_loss, chunk_size=8))
    assert not keeps_output_dtype(plain) and keeps_output_dtype(kept)
    for name, objective in (("plain", plain), ("kept", kept)):
        seen.clear()
        c = cfg(tmp_path, run_name=name, max_steps=2, mixed_precision="bf16")
        model = make_model(tokenizer)
        train(model, rows, collate, objective, c, Run.create(c.output_dir, name, "test"))
        assert set(seen) == {torch.float32 if name == "plain" else torch.bfloat16}
        with torch.no_grad():  # accelerate's forward (autocast + fp32 outputs) is back after the loop
            assert model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits.dtype == torch.float32
    assert losses(tmp_path / "plain")[0] == pytest.approx(losses(tmp_path / "kept")[0], rel=1e-3)
