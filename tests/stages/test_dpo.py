"""dpo stage: every loss runs end to end, the reference equals the policy at the start (in fp32 and bf16),
peft reference = disabled adapter, an adapter run as the start (full and LoRA), and DPO from an SFT policy
raises the share of generations that follow the rule behind the preferences, and the held-out preference."""

from __future__ import annotations

import json
import math

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


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_reference_equals_the_policy_at_the_start(tmp_path, base_model, preference_file, precision):
    """precompute_ref=true: the reference log-probs are computed under the training precision, so before any
    update the sigmoid loss is exactly log 2 and every implicit reward exactly 0, in the before-evaluation
    (fp32 evaluation against a bf16 reference used to give non-zero rewards) and in the first training step."""
    run_dir, info = _run(tmp_path, base_model, preference_file, "precompute_ref=true", "train.max_steps=1",
                         "train.log_every=1", f"train.mixed_precision={precision}")
    before = info["before"]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_rewards/accuracies"):
        assert before[k] == 0.0, (k, before[k])
    step1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert step1["step"] == 1 and step1["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(step1["rewards/margins"]) < 1e-4 and abs(step1["rewards/chosen"]) < 1e-4


def test_lora_reference_is_the_disabled_adapter(tmp_path, base_model, preference_file):
    """precompute_ref=false with LoRA: the reference is computed every step with the adapter disabled, and
    at the start (B = 0) it equals the policy, so the implicit rewards start at exactly 0."""
    run_dir, info = _run(tmp_path, base_model, preference_file, "method.name=lora", "precompute_ref=false")
    assert info["before"]["val_rewards/chosen"] == 0.0
    assert (run_dir / "final" / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def sft_lora_run(tmp_path_factory, base_model, tokenizer):
    """An SFT LoRA run's final/ (adapter only, no config.json) on top of ``base_model``."""
    from lmwright.methods import MethodConfig, apply_method, save_trained
    from lmwright.models import load_model

    adapter = tmp_path_factory.mktemp("sft") / "sft-lora"
    model = apply_method(load_model(base_model), MethodConfig(name="lora"), "causal-lm")
    save_trained(model, MethodConfig(name="lora"), adapter, tokenizer=tokenizer, base_path=base_model,
                 task="causal-lm")
    return adapter


def test_starts_from_an_adapter_run(tmp_path, sft_lora_run, preference_file):
    run_dir, _ = _run(tmp_path, sft_lora_run, preference_file)
    assert (run_dir / "final" / "config.json").exists()


def test_lora_on_an_adapter_run(tmp_path, sft_lora_run, preference_file):
    """method.name=lora from an adapter run (configs/dpo/sigmoid.yaml): the SFT adapter is folded into its base,
    that merged start is saved as the new adapter's base (<run>/base), and final/ loads and generates."""
    from lmwright.methods import load_trained
    from lmwright.stages._align import sample

    run_dir, _ = _run(tmp_path, sft_lora_run, preference_file, "method.name=lora")
    final = run_dir / "final"
    assert (final / "adapter_config.json").exists() and (run_dir / "base" / "config.json").exists()
    assert json.loads((final / "lmwright.json").read_text())["base"] == str((run_dir / "base").resolve())
    model, tok = load_trained(final, task="causal-lm")
    out = sample(model, tok, [tok("The capital of")["input_ids"]], 4, temperature=0.0)
    assert out["completion_mask"].shape == (1, 4)


def test_dpo_needs_preference_records(tmp_path, tokenizer_dir):
    from lmwright.stages.dpo import check

    with pytest.raises(ConfigError, match="data.format=preference"):
        check(stage_config("dpo", f"tokenizer={tokenizer_dir}", f"data.path=[{tmp_path}]", "data.format=text"))


def test_judge_rule_must_be_registered(tmp_path, base_model, preference_file):
    from lmwright.stages.dpo import check

    with pytest.raises(ConfigError, match="judge"):
        check(stage_config("dpo", f"model.name={base_model}", f"data.path=[{preference_file}]",
                           "judge.functions=[no_such_rule]"))


@pytest.fixture(scope="module")
def polite_sft_policy(tmp_path_factory, tokenizer_dir):
    """A tiny chat policy SFT-trained on instructions answered politely 30% of the time (the rest curtly)."""
    from lmwright.data.synthetic import instruction_task, polite_mix
    from tests.stages.conftest import train_sft_policy

    return train_sft_policy(tokenizer_dir, tmp_path_factory.mktemp("polite-sft"),
                            records=polite_mix(instruction_task(1500, seed=11), share=0.3, seed=3))


@pytest.mark.slow
def test_dpo_raises_the_rule_win_rate_of_generations(tmp_path, polite_sft_policy):
    """The acceptance line: DPO from an SFT policy on pairs generated by a learnable rule (the chosen reply is
    polite, the rejected one curt, both correct) raises the share of its generations for held-out prompts that
    the rule judges as following it, and its preference for the chosen reply of held-out pairs."""
    from lmwright.stages.dpo import alignment_demo_step

    res = alignment_demo_step(polite_sft_policy, tmp_path, steps=60, rule="polite",
                              overrides=("train.mixed_precision=no",))
    print("dpo demo step:", res)
    info = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert info["before"]["val_rewards/accuracies"] == 0.0 and info["after"]["val_rewards/accuracies"] > 0.9
    assert res["sampled answers polite after"] >= res["sampled answers polite before"] + 0.15
    assert res["greedy answers polite after"] >= res["greedy answers polite before"]
    assert res["held-out preference accuracy after"] >= res["held-out preference accuracy before"] + 0.2
    # not asserted: answer accuracy. This 2-layer policy seldom answers right after a polite opener (it saw
    # few), so answering politely more often costs it accuracy; the demo's model too (README, known limitations).
