"""dpo stage: every loss runs end to end, peft reference = disabled adapter, an adapter run as the start,
and DPO from an SFT policy raises the preference for the chosen reply on held-out pairs."""

from __future__ import annotations

import json

import pytest

from lmwright.config import ConfigError
from tests.stages.conftest import stage_config


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer):
    """A random llama-tiny saved as a folder (fast tests only need the plumbing)."""
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages.common import save_final

    out = tmp_path_factory.mktemp("base") / "model"
    save_final(build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer, seed=0), tokenizer, out, "causal-lm")
    return out


def _run(tmp_path, model, data, *extra):
    from lmwright.stages import STAGES

    cfg = stage_config("dpo", f"model.name={model}", f"data.path=[{data}]", "data.val_fraction=0.1",
                       f"train.output_dir={tmp_path}", "train.run_name=dpo", "train.max_steps=2",
                       "train.micro_batch_size=4", "train.eval_every=0", "max_length=64", *extra)
    run_dir = STAGES.get("dpo").run(cfg)
    return run_dir, json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("loss", ["sigmoid", "kto"] + [pytest.param(x, marks=pytest.mark.slow)
                                                        for x in ("ipo", "robust", "simpo", "orpo")])
def test_every_loss_trains(tmp_path, base_model, preference_file, loss):
    extra = ["label_smoothing=0.1"] if loss == "robust" else []
    run_dir, info = _run(tmp_path, base_model, preference_file, f"loss={loss}", *extra)
    assert (run_dir / "final" / "model.safetensors").exists()
    assert info["after"]["val_loss"] == info["after"]["val_loss"]  # finite, not NaN


def test_lora_reference_is_the_disabled_adapter(tmp_path, base_model, preference_file):
    """precompute_ref=false with LoRA: the reference is computed every step with the adapter disabled, and
    at the start (B = 0) it equals the policy, so the implicit rewards start at exactly 0."""
    run_dir, info = _run(tmp_path, base_model, preference_file, "method.name=lora", "precompute_ref=false")
    assert info["before"]["val_rewards/chosen"] == 0.0
    assert (run_dir / "final" / "adapter_config.json").exists()


def test_starts_from_an_adapter_run(tmp_path, base_model, preference_file, tokenizer):
    from lmwright.methods import MethodConfig, apply_method, save_trained
    from lmwright.models import load_model

    adapter = tmp_path / "sft-lora"
    model = apply_method(load_model(base_model), MethodConfig(name="lora"), "causal-lm")
    save_trained(model, MethodConfig(name="lora"), adapter, tokenizer=tokenizer, base_path=base_model,
                 task="causal-lm")
    run_dir, _ = _run(tmp_path, adapter, preference_file)
    assert (run_dir / "final" / "config.json").exists()


def test_dpo_needs_preference_records(tmp_path, tokenizer_dir):
    from lmwright.stages.dpo import check

    with pytest.raises(ConfigError, match="data.format=preference"):
        check(stage_config("dpo", f"tokenizer={tokenizer_dir}", f"data.path=[{tmp_path}]", "data.format=text"))


@pytest.mark.slow
def test_dpo_raises_chosen_preference(tmp_path, sft_policy):
    from lmwright.stages.dpo import alignment_demo_step

    res = alignment_demo_step(sft_policy, tmp_path, steps=60, overrides=("train.mixed_precision=no",))
    print("dpo demo step:", res)
    info = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert info["after"]["val_rewards/accuracies"] > 0.6
    assert info["after"]["val_rewards/margins"] > 0
    assert res["preference win rate after"] >= res["preference win rate before"]
