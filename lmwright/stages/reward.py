"""``lmwright train reward``: a reward model (a sequence-classification model with one scalar output) trained
on ``preference`` records with the pairwise Bradley-Terry loss (optional margin).

Read top to bottom: config -> tokenizer -> pairs rendered with the chat template -> model + method ->
engine.train -> final/ (a reward function for ``ppo`` and ``lmwright score``) -> report.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.objectives.base import LossOutput
from lmwright.stages._align import encode_pairs
from lmwright.stages.common import STAGES, resolve_tokenizer, save_final
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.reward")


@dataclass
class RewardConfig:
    stage: str = opt("reward", "stage id")
    model: ModelConfig = opt(ModelConfig(), "the body of the reward model (usually the SFT model); a scalar head is added")
    tokenizer: str | None = opt(None, "tokenizer folder (default: the model's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted (full, lora, ...); the head always trains")
    data: DataConfig = opt(DataConfig(format="preference"), "preference records: prompt, chosen, rejected")
    train: TrainConfig = opt(TrainConfig(metric_for_best="val_accuracy", lr=1e-4), "the training loop")
    max_length: int = opt(512, "tokens of prompt + reply; longer replies are truncated")
    max_prompt_tokens: int = opt(384, "prompts longer than this are skipped (and counted), or an error if skip_long=false")
    skip_long: bool = opt(True, "skip records whose prompt exceeds max_prompt_tokens (false: stop with an error)")
    margin: float | None = opt(None, "ask the chosen reward to exceed the rejected one by this much (Llama 2)")
    center_rewards_coefficient: float | None = opt(None, "add c * (r_chosen + r_rejected)^2 to keep rewards centred")


def check(cfg: RewardConfig) -> dict[str, Any]:
    from lmwright.methods import check_compat

    if cfg.data.format != "preference":
        unpaired = (" (kto records judge one reply each: train them with `lmwright train dpo loss=kto "
                    "data.format=kto`)" if cfg.data.format == "kto" else "")
        raise ConfigError(f"data.format={cfg.data.format}: the reward stage trains on preference records "
                          f"(prompt, chosen, rejected; sharegpt conversations + chosen/rejected turns too){unpaired}; "
                          f"set data.format=preference")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at preference records (jsonl with prompt/chosen/rejected)")
    check_compat(cfg.method, cfg.model, "reward", cfg.model.gradient_checkpointing)
    return {"tokenizer": resolve_tokenizer(cfg.model, cfg.tokenizer or cfg.model.tokenizer)}


def score(model: str | Path, prompt: str, replies: list[str], device: str = "cpu") -> list[float]:
    """The reward a trained reward model (a run, checkpoint or folder) gives each reply to one user prompt
    (``lmwright score``)."""
    from lmwright.stages._align import RewardModel, as_messages

    rm = RewardModel(model, device)
    return rm.score([as_messages(prompt, "user")] * len(replies), replies).tolist()


def make_objective(cfg: RewardConfig):
    from lmwright.objectives.reward import pairwise_reward_loss
    from lmwright.stages._align import reward_logits

    def objective(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        r = reward_logits(model, batch)  # (2B,)
        r_c, r_r = r.chunk(2)
        out = pairwise_reward_loss(r_c, r_r, cfg.margin, cfg.center_rewards_coefficient)
        out.metrics["reward_chosen"] = r_c.detach().float().sum()
        out.metrics["reward_rejected"] = r_r.detach().float().sum()
        return out

    return objective


def run(cfg: RewardConfig) -> Path:
    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.loop import evaluate_loss
    from lmwright.engine.report import write_report
    from lmwright.methods import apply_method
    from lmwright.models import build_model, count_parameters
    from lmwright.stages._align import base_path_of, collate_pairs

    tokenizer = check(cfg)["tokenizer"]
    train_recs, val_recs, manifest = load_records(cfg.data)
    train_ds, skipped = encode_pairs(train_recs, tokenizer, cfg)
    val_ds, val_skipped = encode_pairs(val_recs, tokenizer, cfg)
    log.info("data: %d train pairs, %d validation pairs (%d skipped: prompt over budget or identical)",
             len(train_ds), len(val_ds), skipped + val_skipped)
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)

    model = build_model(cfg.model, task="reward", tokenizer=tokenizer, seed=cfg.train.seed)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    model = apply_method(model, cfg.method, "reward")
    trainable, total = count_parameters(model)

    run_ = Run.start(cfg, "reward", manifest)
    run_.write_info(model=cfg.model.name, method=cfg.method.name, parameters=total, trainable=trainable,
                    train_pairs=len(train_ds), val_pairs=len(val_ds),
                    skipped_records=skipped + val_skipped)
    objective = make_objective(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = evaluate_loss(model.to(device), objective, val_ds, collate, cfg.train.micro_batch_size, device) \
        if val_ds else {}
    base = base_path_of(cfg.model)

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "reward", method_cfg=cfg.method, base_path=base)

    result = train(model, train_ds, collate, objective, cfg.train, run_, val_data=val_ds or None,
                   save_model=save_model)
    if result.interrupted:
        return run_.dir
    after = evaluate_loss(model, objective, val_ds, collate, cfg.train.micro_batch_size, device) if val_ds else {}
    save_final(model, tokenizer, run_.final, "reward", method_cfg=cfg.method, base_path=base)
    summary = {"model": cfg.model.name, "method": cfg.method.name, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1), "skipped records": skipped + val_skipped}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    run_.write_info(before=before, after=after)
    write_report(run_.dir, f"lmwright reward - {run_.dir.name}", [], summary)
    log.info("validation pairwise accuracy %.3f -> %.3f", before.get("val_accuracy", float("nan")),
             after.get("val_accuracy", float("nan")))
    return run_.dir


class _Stage:
    name = "reward"
    Config = RewardConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("reward", _Stage)
