"""grpo stage: config errors, a smoke run with a format reward, and GRPO raising the exact-answer reward
of an SFT policy with bounded KL."""

from __future__ import annotations

import json

import pytest

from lmwright.config import ConfigError
from tests.stages.conftest import stage_config


def test_group_size_must_divide_the_rollout(tmp_path):
    with pytest.raises(ConfigError, match="multiple of group_size"):
        stage_config("grpo", "rollout.batch_size=10", "group_size=4")
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        stage_config("grpo", "group_size=1")


def test_reward_functions():
    from lmwright.objectives.rewards import REWARDS, resolve, total_reward

    assert REWARDS.get("exact_answer")(" Kirren. ", "kirren") == 1.0
    assert REWARDS.get("contains_answer")("it is 42 now", "42") == 1.0
    assert REWARDS.get("format")("FOX", pattern="[A-Z]+") == 1.0
    assert REWARDS.get("length")("abcd", target=4) == 1.0
    fns = resolve(["exact_answer", {"name": "format", "pattern": "[A-Z]+", "weight": 0.5}])
    assert total_reward(fns, "FOX", "fox") == 1.5


@pytest.mark.parametrize("start", ["folder", "adapter-run"])
def test_grpo_smoke_with_lora(tmp_path, tokenizer, prompts_file, start):
    """LoRA from a model folder, and from an adapter run (its adapter folded into the base, which is saved as
    the new adapter's base, <run>/base): final/ loads and generates either way."""
    from lmwright.methods import MethodConfig, apply_method, load_trained, save_trained
    from lmwright.models import ModelConfig, build_model
    from lmwright.stages import STAGES
    from lmwright.stages._align import sample
    from lmwright.stages.common import save_final

    base = tmp_path / "base"
    model = build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer, seed=0)
    save_final(model, tokenizer, base, "causal-lm")
    start_dir = base
    if start == "adapter-run":
        start_dir = tmp_path / "sft-lora"
        save_trained(apply_method(model, MethodConfig(name="lora"), "causal-lm"), MethodConfig(name="lora"),
                     start_dir, tokenizer=tokenizer, base_path=base, task="causal-lm")
    cfg = stage_config("grpo", f"model.name={start_dir}", f"data.path=[{prompts_file}]", "data.val_fraction=0.05",
                       f"train.output_dir={tmp_path}", "train.run_name=grpo", "method.name=lora",
                       "reward.functions=[{name: length, target: 4}]", "group_size=4", "rollout.batch_size=8",
                       "rollout.max_new_tokens=6", "rollout.eval_prompts=4", "rollout.epochs=2",
                       "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=0")
    run_dir = STAGES.get("grpo").run(cfg)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/reward_std" in m and "kl" in m for m in metrics)
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert (run_dir / "base" / "config.json").exists() == (start == "adapter-run")
    policy, tok = load_trained(run_dir / "final", task="causal-lm")
    assert sample(policy, tok, [tok("The capital of")["input_ids"]], 4, temperature=0.0)["completion_mask"].shape \
        == (1, 4)


@pytest.mark.slow
def test_grpo_raises_reward_with_bounded_kl(tmp_path, sft_policy, prompts_file):
    """A verifiable length reward (1 at 3 characters): the SFT policy answers in ~7; GRPO shortens it."""
    from lmwright.stages import STAGES

    cfg = stage_config("grpo", f"model.name={sft_policy}", f"data.path=[{prompts_file}]", "data.val_fraction=0.25",
                       "data.clean.dedup=false", f"train.output_dir={tmp_path}", "train.run_name=grpo",
                       "reward.functions=[{name: length, target: 3}]", "train.max_steps=60", "train.lr=1e-4",
                       "group_size=8", "train.micro_batch_size=8", "rollout.batch_size=32", "rollout.max_new_tokens=12",
                       "rollout.eval_prompts=100", "train.eval_every=30", "train.load_best_at_end=false",
                       "train.log_every=4")
    run_dir = STAGES.get("grpo").run(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [m for m in metrics if "rollout/reward" in m]
    print("grpo val_reward", info["before"], "->", info["after"], "rollout reward", rollouts[0]["rollout/reward"],
          "->", rollouts[-1]["rollout/reward"], "max KL", max(m["rollout/kl"] for m in rollouts))
    assert info["after"]["val_reward"] > info["before"]["val_reward"] + 0.1  # measured 0.11 -> 0.54
    assert max(m["rollout/kl"] for m in rollouts) < cfg.max_kl
