"""lmwright compare: one config, several methods, one decision table (markdown + HTML + JSON)."""

from __future__ import annotations

import json
import time

import pytest

from lmwright.config import ConfigError


@pytest.fixture
def setup(tmp_path, tokenizer):
    from lmwright.data.synthetic import instruction_task
    from lmwright.models import ModelConfig, build_model

    base = tmp_path / "base"
    build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_task(80, seed=1)))
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(f"""stage: sft
methods: [full, lora]
model: {{name: {base}}}
data: {{path: [{data}], format: alpaca, val_fraction: 0.1}}
seq_len: 128
eval_generate: 2
max_new_tokens: 4
train: {{max_steps: 3, micro_batch_size: 4, eval_every: 0, save_every: 0, progress: false,
        output_dir: {tmp_path / 'runs'}, run_name: cmp}}
""")
    return cfg


def test_compare_table(setup, tmp_path):
    from lmwright.cli import main

    assert main(["compare", "-c", str(setup), "methods=full,lora,ia3"]) == 0
    out = tmp_path / "runs" / "cmp"
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == ["full", "lora", "ia3"]
    assert rows["full"]["trainable %"] == pytest.approx(100.0)
    assert 0 < rows["ia3"]["trainable %"] < rows["lora"]["trainable %"] < 100
    assert rows["lora"]["final/ MiB"] < rows["full"]["final/ MiB"]
    for r in rows.values():
        assert r["tokens/s"] > 0 and r["wall s"] > 0 and r["peak mem MiB"] >= 0 and "val_loss" in r
        assert (out / r["method"] / "final" / "lmwright.json").exists()
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].startswith("| method | trainable %") and "val_exact_match" in md[0] and len(md) == 5
    assert "<img" in (out / "report.html").read_text()


def test_compare_refuses_impossible_combination_before_training(setup, tmp_path):
    from lmwright.stages.compare import run_compare

    with pytest.raises(ConfigError, match="methods=qlora: .*model.quantize"):
        run_compare([str(setup)], ["methods=full,qlora", "model.name=llama-tiny",
                                   f"tokenizer={tmp_path / 'base'}"])
    assert not (tmp_path / "runs" / "cmp" / "full").exists()  # nothing was trained
    with pytest.raises(ConfigError, match="methods"):
        run_compare([str(setup)], ["methods="])


@pytest.mark.slow
def test_compare_eight_methods_under_ten_minutes(setup, tmp_path):
    from lmwright.stages.compare import run_compare

    t = time.perf_counter()
    out = run_compare([str(setup)], ["methods=full,freeze,lora,qlora,prefix,adapter,ia3,qat", "method.freeze_last_n=1"])
    assert time.perf_counter() - t < 600
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert len(rows) == 8 and all("val_loss" in r for r in rows)
