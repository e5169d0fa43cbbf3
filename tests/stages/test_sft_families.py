"""`lmwright train sft` and `train dpo` smoke on every decoder family (tests/families.py): a local model folder, LoRA,
two steps, through the command line; final/ is an adapter folder that loads."""

from __future__ import annotations

import json

import pytest

from tests.families import FAMILIES, FAMILY_ATTENTION, FAMILY_NAMES, save_family_folder


def _model_type(family: str) -> str:
    import transformers as tf

    return getattr(tf, FAMILIES[family][0]).model_type


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_lora_runs_on_family(tmp_path, tokenizer, family):
    from lmwright.cli import main
    from lmwright.data.synthetic import instruction_task
    from lmwright.methods import load_trained

    folder = save_family_folder(family, tokenizer, tmp_path / family)
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_task(40, seed=3)), encoding="utf-8")
    attn = [f"model.attn_implementation={FAMILY_ATTENTION[family]}"] if family in FAMILY_ATTENTION else []
    rc = main(["train", "sft", f"model.name={folder}", "method.name=lora", f"data.path=[{data}]",
               "data.val_fraction=0.2", "seq_len=96", "train.max_steps=2", "train.micro_batch_size=4",
               "train.eval_every=0", "train.save_every=0", f"train.output_dir={tmp_path}/runs", "train.run_name=r",
               "train.progress=false", "eval_generate=2", "max_new_tokens=4", "samples=1", *attn])
    assert rc == 0
    final = tmp_path / "runs" / "r" / "final"
    assert (final / "adapter_config.json").exists()
    model, _ = load_trained(final)
    assert model.get_base_model().config.model_type == _model_type(family)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dpo_lora_runs_on_family(tmp_path, tokenizer, family):
    """`lmwright train dpo` on every decoder family: a local folder, LoRA, two steps; the step-0 loss is log 2
    (reference == policy, as on llama) and final/ loads with the family's architecture."""
    import math

    from lmwright.cli import main
    from lmwright.data.synthetic import preference_task
    from lmwright.methods import load_trained

    folder = save_family_folder(family, tokenizer, tmp_path / family)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_task(24, seed=3)), encoding="utf-8")
    attn = [f"model.attn_implementation={FAMILY_ATTENTION[family]}"] if family in FAMILY_ATTENTION else []
    rc = main(["train", "dpo", f"model.name={folder}", "method.name=lora", f"data.path=[{data}]",
               "data.val_fraction=0.25", "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=0",
               "train.save_every=0", f"train.output_dir={tmp_path}/runs", "train.run_name=d", "train.progress=false",
               *attn])
    assert rc == 0
    run = tmp_path / "runs" / "d"
    before = json.loads((run / "run.json").read_text())["before"]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    model, _ = load_trained(run / "final")
    assert model.get_base_model().config.model_type == _model_type(family)
