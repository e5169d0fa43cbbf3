"""``lmwright train pretrain``: a model trained from scratch or continued, with a self-supervised
objective (``clm`` here; ``mlm``, ``denoise``, ``contrastive`` are registered the same way).

Read top to bottom: config -> tokenizer -> data -> model -> engine.train -> final/ -> samples -> report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.models.introspect import model_type
from lmwright.models.presets import ModelConfig
from lmwright.objectives.contrastive import ContrastiveConfig
from lmwright.objectives.denoise import DenoiseConfig
from lmwright.objectives.mlm import MLMConfig
from lmwright.stages.common import (
    STAGES,
    data_texts,
    flops_per_token,
    resolve_tokenizer,
    save_final,
)
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.pretrain")


@dataclass
class SampleConfig:
    prompts: list[str] = opt(["The", "The capital of"], "prompts continued at the end of training")
    max_new_tokens: int = opt(40, "tokens per sample")
    temperature: float = opt(0.8, "sampling temperature (0 = greedy)")
    top_k: int = opt(50, "sample from the k most likely tokens")


@dataclass
class PretrainConfig:
    stage: str = opt("pretrain", "stage id (lets `lmwright validate` know what the file configures)")
    objective: str = opt("clm", "self-supervised objective: clm, mlm, denoise, contrastive")
    model: ModelConfig = opt(ModelConfig(), "the model to train")
    tokenizer: str | None = opt(None, "tokenizer folder (required for presets)")
    data: DataConfig = opt(DataConfig(), "training text")
    train: TrainConfig = opt(TrainConfig(), "the training loop")
    seq_len: int = opt(256, "tokens per training row")
    packing: bool = opt(True, "pack documents into full rows (no attention across documents)")
    sample: SampleConfig = opt(SampleConfig(), "samples generated at the end (causal LMs)")
    mlm: MLMConfig = opt(MLMConfig(), "options of objective=mlm (masking)")
    denoise: DenoiseConfig = opt(DenoiseConfig(), "options of objective=denoise (span corruption / infilling)")
    contrastive: ContrastiveConfig = opt(ContrastiveConfig(), "options of objective=contrastive (InfoNCE)")

    def check(self) -> None:
        if self.seq_len < 8:
            raise ConfigError(f"seq_len = {self.seq_len} is too short; use at least 8")


def objective_for(cfg: PretrainConfig):
    from lmwright.objectives.base import PRETRAIN_OBJECTIVES

    cls = PRETRAIN_OBJECTIVES.get(cfg.objective)
    section = getattr(cfg, cfg.objective, None)  # the objective's own options section, if it has one
    return cls(section) if section is not None else cls()


def check(cfg: PretrainConfig) -> dict[str, Any]:
    """Everything that can be verified before training (used by `lmwright validate`)."""
    tokenizer = resolve_tokenizer(cfg.model, cfg.tokenizer)
    obj = objective_for(cfg)
    obj.check(model_type(cfg.model), tokenizer)
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at text files or a prepared data folder")
    formats = getattr(obj, "formats", None)
    if formats and cfg.data.format not in formats:
        raise ConfigError(f"objective={cfg.objective} reads data.format {' or '.join(sorted(formats))}, got "
                          f"data.format={cfg.data.format}: change data.format or the objective")
    if getattr(obj, "input", "texts") == "records":  # record-level objectives: check the records now
        from lmwright.data import load_records

        load_records(cfg.data)
    if cfg.seq_len > tokenizer.model_max_length:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the tokenizer's model_max_length="
                          f"{tokenizer.model_max_length}")
    return {"tokenizer": tokenizer, "objective": obj}


def records(cfg: PretrainConfig, obj) -> tuple[list, list, dict]:
    """(train, validation, manifest) of ``cfg.data``; plain texts unless the objective reads records."""
    from lmwright.data import load_records

    train_recs, val_recs, manifest = load_records(cfg.data)
    if getattr(obj, "input", "texts") != "records":  # most objectives read plain texts
        train_recs, val_recs = data_texts(train_recs, cfg.data.format), data_texts(val_recs, cfg.data.format)
    return train_recs, val_recs, manifest


def validation_set(cfg: PretrainConfig, tokenizer, obj=None, val_recs: list | None = None) -> list | None:
    """The rows the stage's ``val_*`` metrics are measured on (None without a validation split);
    ``val_recs`` default to the validation split of ``cfg.data``. ``lmwright eval`` calls this too."""
    obj = obj or objective_for(cfg)
    if val_recs is None:
        val_recs = records(cfg, obj)[1]
    return obj.build_dataset(val_recs, tokenizer, cfg.seq_len, cfg.packing) if val_recs else None


def validation_metrics(cfg: PretrainConfig, model, tokenizer, obj, val_ds: list, device) -> dict[str, float]:
    """``val_loss`` (+ the objective's extra and derived metrics, e.g. ``val_ppl``) of ``model`` on
    ``val_ds``, as run.json's ``before``/``after`` report them."""
    from lmwright.engine.loop import evaluate_loss

    collate = obj.collate(tokenizer, cfg.packing)
    out = evaluate_loss(model, obj.loss, val_ds, collate, cfg.train.micro_batch_size, device,
                        cfg.train.eval_max_batches)
    if hasattr(obj, "extra_eval"):
        out.update(obj.extra_eval(model, val_ds, tokenizer))
    out.update(obj.metrics_from_eval(out))
    return out


def run(cfg: PretrainConfig) -> Path:
    import torch

    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.models import build_model, count_parameters

    ctx = check(cfg)
    tokenizer, obj = ctx["tokenizer"], ctx["objective"]

    # data
    train_recs, val_recs, manifest = records(cfg, obj)
    train_ds = obj.build_dataset(train_recs, tokenizer, cfg.seq_len, cfg.packing)
    val_ds = validation_set(cfg, tokenizer, obj, val_recs)
    collate = obj.collate(tokenizer, cfg.packing)
    log.info("data: %d train records -> %d rows of %d tokens; %d validation rows", len(train_recs), len(train_ds),
             cfg.seq_len, len(val_ds or []))

    # model
    model = build_model(cfg.model, task=obj.task, tokenizer=tokenizer, seed=cfg.train.seed)
    if obj.task == "causal-lm":
        from lmwright.models.attention import prepare_packed_training

        prepare_packed_training(model)  # per-sample attention on packed rows; fused RMSNorm / SwiGLU (bf16 on a CPU)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if hasattr(obj, "prepare_model"):
        model = obj.prepare_model(model)
    trainable, total = count_parameters(model)

    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    run_ = Run.start(cfg, "pretrain", manifest, is_main=is_main)
    run_.write_info(objective=cfg.objective, model=cfg.model.name, parameters=total, trainable=trainable,
                    data_counts=manifest.get("counts"),
                    train_rows=len(train_ds), val_rows=len(val_ds or []))
    if is_main:
        tokenizer.save_pretrained(str(run_.dir / "tokenizer"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    def evaluate(m) -> dict[str, float]:
        return obj.extra_eval(m, val_ds, tokenizer) if hasattr(obj, "extra_eval") and val_ds else {}

    before = {}
    if val_ds:
        before = validation_metrics(cfg, model.to(device), tokenizer, obj, val_ds, device)
        log.info("before training: %s", _fmt(before))

    # lmwright.json of final/ and of every checkpoint's model: what inference must know (e.g. the pooling)
    model_meta = {"objective": cfg.objective, **(obj.model_meta() if hasattr(obj, "model_meta") else {})}

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, obj.task, extra=model_meta)

    result = train(model, train_ds, collate, obj.loss, cfg.train, run_, val_data=val_ds,
                   evaluate=evaluate if val_ds else None, derive_metrics=obj.metrics_from_eval,
                   save_model=save_model,
                   flops_per_token=flops_per_token(model, cfg.seq_len) if obj.task == "causal-lm" else None)
    if result.interrupted:
        return run_.dir
    after = dict(result.eval_history[-1]) if result.eval_history else {}
    after.pop("step", None)
    if cfg.train.load_best_at_end and result.best_step is not None and val_ds:
        after = validation_metrics(cfg, model, tokenizer, obj, val_ds, device)
    if not is_main:
        return run_.dir
    save_final(model, tokenizer, run_.final, obj.task, extra=model_meta)
    if hasattr(obj, "finalize"):
        obj.finalize(model, tokenizer, run_.final)

    samples = _samples(model, tokenizer, cfg.sample) if obj.task == "causal-lm" else []
    summary = {"objective": cfg.objective, "model": cfg.model.name, "parameters": total, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1)}
    for k, v in before.items():
        summary[f"before {k}"] = v
    for k, v in after.items():
        summary[f"after {k}"] = v
    run_.write_info(before=before, after=after, samples=samples)
    sections = []
    if samples:
        sections.append(("Samples", table([{"prompt": s["prompt"], "continuation": s["text"]} for s in samples])))
    write_report(run_.dir, f"lmwright pretrain ({cfg.objective}) - {run_.dir.name}", sections, summary)
    return run_.dir


def _fmt(m: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))


def _samples(model, tokenizer, sc: SampleConfig) -> list[dict[str, str]]:
    """Continuations of the plain-text prompts (one at a time, seeded), ended by eos."""
    from lmwright.engine.sampling import generate_batch

    prompts = [tokenizer(p)["input_ids"] for p in sc.prompts]
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = generate_batch(model, tokenizer, prompts, sc.max_new_tokens, sc.temperature, sc.top_k, batch_size=1,
                         seed=0, stop_ids=stops)
    return [{"prompt": p, "text": tokenizer.decode(ids, skip_special_tokens=True)}
            for p, (ids, _) in zip(sc.prompts, gen)]


class _Stage:
    name = "pretrain"
    Config = PretrainConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("pretrain", _Stage)
