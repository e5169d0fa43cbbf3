"""Fixtures of the stage tests. ``sft_policy``: a tiny chat model that can already answer the generated
instruction task sometimes (the starting point of reward/dpo/ppo/grpo/distill), trained once per session
with the engine directly (full fine-tuning of llama-tiny on ``instruction_task`` with the chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest


def train_sft_policy(tokenizer_dir: Path, out: Path, steps: int = 300, n: int = 1500, preset: str = "llama-tiny",
                     overrides: dict | None = None, records: list[dict] | None = None) -> Path:
    """Train and save a small chat policy on ``records`` (default: ``n`` of ``instruction_task``); returns its
    ``final/`` folder (a run folder's layout)."""
    from functools import partial

    from lmwright.data.synthetic import instruction_task
    from lmwright.engine import Run, TrainConfig, train
    from lmwright.models import ModelConfig, build_model, load_tokenizer
    from lmwright.objectives.base import causal_lm_loss
    from lmwright.stages._align import collate_lm, encode_reply, prompt_and_reference
    from lmwright.stages.common import save_final

    tok = load_tokenizer(tokenizer_dir)
    items = []
    for r in records or instruction_task(n, seed=11):
        prompt, ref = prompt_and_reference({**r, "system": ""}, "alpaca")
        items.append(encode_reply(tok, prompt, ref, 256, 256))
    model = build_model(ModelConfig(name=preset, overrides=overrides or {}), tokenizer=tok, seed=0)
    cfg = TrainConfig(output_dir=str(out), run_name="sft", max_steps=steps, micro_batch_size=16, lr=3e-3,
                      warmup_steps=20, log_every=50, eval_every=0, save_every=0, progress=False,
                      load_best_at_end=False, mixed_precision="no")
    run = Run.create(cfg.output_dir, cfg.run_name, "sft")
    train(model, items, partial(collate_lm, pad_id=tok.pad_token_id), causal_lm_loss, cfg, run)
    save_final(model, tok, run.final, "causal-lm")
    return run.final


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory, tokenizer_dir) -> Path:
    return train_sft_policy(tokenizer_dir, tmp_path_factory.mktemp("sft"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def easy_instructions(n: int, seed: int) -> list[dict]:
    """Instruction records a tiny model can learn (capitals, upper-casing): room for RL to raise the reward."""
    from lmwright.data.synthetic import instruction_task

    return [r for r in instruction_task(n, seed=seed) if r["instruction"].startswith(("What is", "Write"))]


def stage_config(stage: str, *overrides: str):
    from lmwright.config import load_config
    from lmwright.stages import STAGES

    return load_config(STAGES.get(stage).Config, [], ["train.progress=false", "train.save_every=0",
                                                        "train.mixed_precision=no", *overrides])


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "instructions.jsonl", easy_instructions(800, seed=21))


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory) -> Path:
    from lmwright.data.synthetic import preference_task

    return write_jsonl(tmp_path_factory.mktemp("data") / "preference.jsonl", preference_task(400, seed=5))
