"""distill stage: tokenizer check, a classifier teacher -> student, and a distilled causal-LM student that
beats the same student trained on hard labels alone."""

from __future__ import annotations

import json

import pytest

from lmwright.config import ConfigError
from tests.stages.conftest import stage_config, write_jsonl

SMALL = "model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, " \
        "num_key_value_heads: 1}"


def test_teacher_and_student_must_share_the_tokenizer(tmp_path, tokenizer, corpus):
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages.common import save_final
    from lmwright.stages.distill import check

    teacher = tmp_path / "teacher"
    save_final(build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer), tokenizer, teacher, "causal-lm")
    train_tokenizer(corpus, TokenizerConfig(vocab_size=300, min_frequency=2), tmp_path / "tok300")
    cfg = stage_config("distill", f"teacher={teacher}", "model.name=llama-tiny", f"model.tokenizer={tmp_path / 'tok300'}",
                       f"data.path=[{tmp_path}]")
    with pytest.raises(ConfigError, match="different tokenizers"):
        check(cfg)


def test_classifier_distillation(tmp_path, tokenizer):
    from lmwright.data.synthetic import sentiment_task
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages import STAGES
    from lmwright.stages.common import save_final

    teacher = tmp_path / "teacher"
    model = build_model(ModelConfig(name="llama-tiny"), task="classification", tokenizer=tokenizer, num_labels=2,
                        id2label={0: "negative", 1: "positive"})
    save_final(model, tokenizer, teacher, "classification")
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_task(120))
    cfg = stage_config("distill", f"teacher={teacher}", "model.name=llama-tiny", SMALL, f"data.path=[{data}]",
                       "data.format=classification", "data.val_fraction=0.2", f"train.output_dir={tmp_path}",
                       "train.run_name=kd", "train.max_steps=3", "train.micro_batch_size=8", "train.eval_every=0")
    run_dir = STAGES.get("distill").run(cfg)
    rows = json.loads((run_dir / "run.json").read_text())["comparison"]
    assert rows[1]["parameters"] < rows[0]["parameters"] and "val_accuracy" in rows[1]


@pytest.mark.slow
def test_distilled_student_beats_hard_labels(tmp_path, sft_policy):
    from lmwright.data.synthetic import instruction_task
    from lmwright.stages import STAGES

    data = write_jsonl(tmp_path / "inst.jsonl", instruction_task(400, seed=31))
    res = {}
    for alpha in (0.0, 1.0):
        cfg = stage_config("distill", f"teacher={sft_policy}", "model.name=llama-tiny", SMALL, f"data.path=[{data}]",
                           "data.val_fraction=0.2", "data.clean.dedup=false", f"train.output_dir={tmp_path}",
                           f"train.run_name=kd-{alpha}", f"alpha={alpha}", "temperature=1.0", "train.max_steps=150",
                           "train.lr=3e-3", "train.micro_batch_size=16", "train.eval_every=0")
        rows = json.loads((STAGES.get("distill").run(cfg) / "run.json").read_text())["comparison"]
        res[alpha] = rows
    teacher, hard, kd = res[0.0][0], res[0.0][1], res[1.0][1]
    print(f"distill: teacher {teacher['parameters']} params val_ce {teacher['val_ce']:.3f} "
          f"{teacher['tokens_per_s']:.0f} tok/s; student {kd['parameters']} params {kd['tokens_per_s']:.0f} tok/s "
          f"val_ce hard-labels {hard['val_ce']:.3f} vs distilled {kd['val_ce']:.3f}")
    assert kd["val_ce"] < hard["val_ce"]
