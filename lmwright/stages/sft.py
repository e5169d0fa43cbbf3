"""``lmwright train sft``: instruction and chat fine-tuning of a causal LM, with any method.

Read top to bottom: config -> tokenizer -> conversations (alpaca records become messages) -> token
ids and loss masks from the tokenizer's chat template -> packed (bfd) or padded rows -> model +
method -> exact match before -> engine.train -> final/ -> exact match after + sample answers -> report.

The SFT data path (``conversations``, ``encode``, ``make_rows``, ``sft_loss``, ``exact_match``, ...) lives in
``stages/_sft.py``, shared with ``upft``, which runs it on self-sampled responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.stages._sft import (
    build_causal_model,
    check_causal,
    conversations,
    encode,
    exact_match,
    held_out,
    make_rows,
    pad_id_of,
    sft_loss,
    use_packing,
    validation_metrics,
)
from lmwright.stages.common import STAGES, flops_per_token, save_final
from lmwright.utils.hardware import choose_mixed_precision
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.sft")


@dataclass
class SFTConfig:
    stage: str = opt("sft", "stage id (lets `lmwright validate` know what the file configures)")
    model: ModelConfig = opt(ModelConfig(), "starting model: a local folder or run (typical), or a preset + tokenizer")
    tokenizer: str | None = opt(None, "tokenizer folder; default: the model folder's (or its run's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="alpaca", val_fraction=0.1), "alpaca or messages records")
    train: TrainConfig = opt(TrainConfig(lr=2e-4, eval_every=50), "the training loop")
    seq_len: int = opt(512, "tokens per row; longer conversations are truncated (and counted in run.json)")
    packing: bool | None = opt(None, "pack conversations into full rows (best-fit decreasing, no attention across "
                                     "them); default: on, off for prefix/ptuning/prompt (their virtual tokens "
                                     "cannot be packed)")
    train_on: Literal["assistant", "last", "all"] = opt(
        "assistant", "tokens with loss: every assistant turn, only the last one, or every token")
    system_prompt: str | None = opt(None, "system message added to conversations that have none")
    eval_generate: int = opt(32, "held-out prompts answered greedily for exact match at each evaluation (0 = off)")
    max_new_tokens: int = opt(64, "answer length cap for exact match and samples")
    samples: int = opt(4, "sample answers (before/after) shown in the report")

    def check(self) -> None:
        if self.seq_len < 16:
            raise ConfigError(f"seq_len = {self.seq_len} is too short for a conversation; use at least 16")
        if self.eval_generate < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval_generate must be >= 0 and max_new_tokens >= 1")


# ------------------------------------------------------------------------------------ validation
def check(cfg: SFTConfig) -> dict[str, Any]:
    """Everything that can be verified before training (used by `lmwright validate`)."""
    if cfg.data.format not in ("alpaca", "messages", "kto"):
        raise ConfigError(f"data.format={cfg.data.format}: sft trains on conversations; set data.format=alpaca, "
                          f"data.format=messages (also sharegpt and tool-call data) or data.format=kto (its "
                          f"desirable replies)")
    return check_causal(cfg, "sft")


def validation_data(cfg: SFTConfig, tokenizer, val_recs: list[dict] | None = None):
    """(validation rows or None, their collate, held-out exact-match conversations): what the stage's
    ``val_loss`` and ``val_exact_match`` are measured on. ``val_recs`` default to the validation split of
    ``cfg.data``; ``lmwright eval`` calls this too."""
    if val_recs is None:
        from lmwright.data import load_records

        val_recs = load_records(cfg.data)[1]
    val_convs = conversations(val_recs, cfg.data.format, cfg.system_prompt)
    val_samples, _ = encode(tokenizer, val_convs, cfg.train_on, cfg.seq_len)
    rows, collate = make_rows(val_samples, cfg.seq_len, use_packing(cfg), pad_id_of(tokenizer))
    return rows or None, collate, held_out(val_convs, cfg.eval_generate, cfg.data.split_seed)


# ------------------------------------------------------------------------------------ the stage
def run(cfg: SFTConfig) -> Path:
    import torch

    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.methods import trainable_report

    tokenizer = check(cfg)["tokenizer"]
    packing = use_packing(cfg)

    # data: records -> conversations -> (ids, labels) -> rows
    train_recs, val_recs, manifest = load_records(cfg.data)
    train_convs = conversations(train_recs, cfg.data.format, cfg.system_prompt)
    train_samples, train_stats = encode(tokenizer, train_convs, cfg.train_on, cfg.seq_len)
    train_ds, collate = make_rows(train_samples, cfg.seq_len, packing, pad_id_of(tokenizer))
    val_ds, _, em_convs = validation_data(cfg, tokenizer, val_recs)
    log.info("data: %d conversations -> %d %s rows (%d truncated to %d tokens); %d validation rows, %d for "
             "exact match", len(train_convs), len(train_ds), "packed" if packing else "padded",
             train_stats["truncated"], cfg.seq_len, len(val_ds or []), len(em_convs))

    # model + method
    run_ = Run.start(cfg, "sft", manifest)
    model, base_path = build_causal_model(cfg, tokenizer, run_.dir)
    params = trainable_report(model)
    run_.write_info(model=cfg.model.name, base=base_path, method=cfg.method.name, quantize=cfg.model.quantize,
                    trainable=params["trainable"], total_parameters=params["total"],
                    trainable_pct=params["trainable_pct"], packing=packing, data=train_stats,
                    data_counts=manifest.get("counts"),
                    train_rows=len(train_ds), val_rows=len(val_ds or []))
    tokenizer.save_pretrained(str(run_.dir / "tokenizer"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    before, answers_before = validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)
    log.info("before training: %s", before)

    def evaluate(m) -> dict[str, float]:
        return {"val_exact_match": exact_match(m, tokenizer, em_convs, cfg.max_new_tokens,
                                               choose_mixed_precision(cfg.train.mixed_precision, m))[0]} if em_convs else {}

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "causal-lm", method_cfg=cfg.method, base_path=base_path)

    result = train(model, train_ds, collate, sft_loss, cfg.train, run_, val_data=val_ds,
                   evaluate=evaluate if em_convs else None, save_model=save_model,
                   flops_per_token=flops_per_token(model, cfg.seq_len))
    if result.interrupted:
        return run_.dir
    after, answers_after = validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)
    save_final(model, tokenizer, run_.final, "causal-lm", extra={"stage": "sft", "train_on": cfg.train_on},
               method_cfg=cfg.method, base_path=base_path)

    # report
    samples = [{"prompt": c[-2]["content"], "reference": c[-1]["content"], "before": b, "after": a}
               for c, b, a in list(zip(em_convs, answers_before, answers_after))[:cfg.samples]]
    tokens_per_s = result.tokens_seen / max(result.train_seconds, 1e-9)
    run_.write_info(before=before, after=after, samples=samples, tokens_per_s=tokens_per_s)
    summary: dict[str, Any] = {"model": cfg.model.name, "method": cfg.method.name,
                               "trainable %": round(params["trainable_pct"], 3), "steps": result.step,
                               "train_seconds": round(result.train_seconds, 1), "tokens/s": round(tokens_per_s)}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    sections = [("Sample answers (greedy)", table(samples))] if samples else []
    write_report(run_.dir, f"lmwright sft ({cfg.method.name}) - {run_.dir.name}", sections, summary)
    log.info("after training: %s", after)
    return run_.dir


class _Stage:
    name = "sft"
    Config = SFTConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("sft", _Stage)
