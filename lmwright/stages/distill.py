"""``lmwright train distill``: knowledge distillation of a teacher (a run or a local folder) into a smaller
student on the teacher's logits: ``alpha * T^2 * D(teacher || student; T) + (1 - alpha) * CE(labels)`` with
``D`` forward KL (Hinton et al. 2015), reverse KL (MiniLLM) or generalised JSD (GKD).

Causal LMs (data ``alpaca``/``messages``: loss on the assistant tokens, rendered with the chat template;
``text``: every token) and classifiers (data ``classification``). Teacher and student must share the
tokenizer (checked at validate time). ``alpha=0`` trains the same student on hard labels alone, the
baseline a distilled student should beat. The report compares teacher and student: size, forward speed and
the hard-label metric (validation cross-entropy/perplexity, or accuracy for classifiers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.objectives.base import LossOutput
from lmwright.stages.common import STAGES, save_final
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.distill")


@dataclass
class DistillConfig:
    stage: str = opt("distill", "stage id")
    teacher: str = opt("", "teacher: a run folder, checkpoint or local model folder")
    model: ModelConfig = opt(ModelConfig(), "the student: a preset built from scratch (with the teacher's tokenizer) or a folder")
    method: MethodConfig = opt(MethodConfig(), "how the student's weights are adapted (full for a fresh student)")
    data: DataConfig = opt(DataConfig(format="alpaca"), "alpaca, messages or text (causal LM); classification (classifier)")
    train: TrainConfig = opt(TrainConfig(metric_for_best="val_ce"), "the training loop")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = opt("forward_kl", "teacher/student divergence")
    temperature: float = opt(2.0, "softmax temperature of both distributions in the divergence")
    alpha: float = opt(0.5, "weight of the divergence; 1 - alpha weighs the hard-label cross-entropy (0 = labels only)")
    jsd_beta: float = opt(0.5, "jsd: interpolation of the mixture (0 = forward KL, 1 = reverse KL)")
    max_length: int = opt(256, "tokens per example (longer ones are truncated)")

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


def task_of(cfg: DistillConfig) -> str:
    return "classification" if cfg.data.format == "classification" else "causal-lm"


def check(cfg: DistillConfig) -> dict[str, Any]:
    from lmwright.methods import check_compat
    from lmwright.models.load import load_tokenizer, resolve_model_path
    from lmwright.stages._align import same_tokenizer
    from lmwright.stages.common import resolve_tokenizer

    if not cfg.teacher:
        raise ConfigError("teacher is empty: set teacher=<run folder or model folder>")
    if not cfg.data.path:
        raise ConfigError("data.path is empty")
    tp = resolve_model_path(cfg.teacher)
    teacher_tok = load_tokenizer(tp if (tp / "tokenizer_config.json").exists() else tp.parent / "tokenizer")
    student_tok = teacher_tok if cfg.model.is_preset() and not cfg.model.tokenizer else \
        resolve_tokenizer(cfg.model, cfg.model.tokenizer)
    why = same_tokenizer(teacher_tok, student_tok)
    if why:
        raise ConfigError(f"teacher {cfg.teacher} and student {cfg.model.name} use different tokenizers ({why}): "
                          "logit distillation needs the same vocabulary; build the student with the teacher's tokenizer")
    check_compat(cfg.method, cfg.model, task_of(cfg), cfg.model.gradient_checkpointing)
    return {"tokenizer": teacher_tok}


# ------------------------------------------------------------------------------------ data
def build_items(records: list[dict], tokenizer, cfg: DistillConfig, label2id: dict[str, int]) -> list[dict]:
    from lmwright.stages._align import encode_reply, prompt_and_reference

    items = []
    for r in records:
        if cfg.data.format == "classification":
            ids = tokenizer(r["text"], truncation=True, max_length=cfg.max_length)["input_ids"]
            items.append({"input_ids": ids, "label": label2id[str(r["label"])]})
        elif cfg.data.format == "text":
            ids = tokenizer(r["text"], truncation=True, max_length=cfg.max_length)["input_ids"]
            items.append({"input_ids": ids, "labels": list(ids)})
        else:
            prompt, ref = prompt_and_reference(r, cfg.data.format)
            it = encode_reply(tokenizer, prompt, ref, cfg.max_length - 1, cfg.max_length)
            if it is not None:
                items.append(it)
    return items


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    from lmwright.data.packing import collate_padded
    from lmwright.stages._align import collate_lm

    if "label" in items[0]:
        return collate_padded(items, pad_id, labels="class")
    return collate_lm(items, pad_id)


# ------------------------------------------------------------------------------------ objective
def make_objective(cfg: DistillConfig, teacher):
    from lmwright.objectives.distill import distill_loss

    def objective(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if cfg.alpha > 0:
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:  # labels only: a zero divergence, no teacher forward
            t_logits = logits.detach()
        return distill_loss(logits, t_logits, batch["labels"], kind=cfg.divergence, temperature=cfg.temperature,
                            alpha=cfg.alpha, beta=cfg.jsd_beta)

    return objective


@torch.no_grad()
def hard_label_metrics(model, data: list[dict], coll, micro: int, device) -> dict[str, float]:
    """Validation cross-entropy (+ perplexity, or accuracy for classifiers) and forward throughput."""
    from lmwright.objectives.base import token_cross_entropy

    was = model.training
    model.eval()
    ce, n, correct, tokens, t0 = 0.0, 0, 0, 0, time.perf_counter()
    for s in range(0, len(data), micro):
        b = {k: v.to(device) for k, v in coll(data[s:s + micro]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tokens += int(b["attention_mask"].sum())
        if logits.dim() == 2:  # classifier
            ce += float(torch.nn.functional.cross_entropy(logits.float(), b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            n += len(b["labels"])
        else:
            loss, k = token_cross_entropy(logits, b["labels"])
            ce, n = ce + float(loss), n + int(k)
    seconds = time.perf_counter() - t0
    model.train(was)
    out = {"val_ce": ce / max(n, 1), "tokens_per_s": tokens / max(seconds, 1e-9)}
    if correct or logits.dim() == 2:
        out["val_accuracy"] = correct / max(n, 1)
    else:
        out["val_ppl"] = math.exp(min(out["val_ce"], 50))
    return out


# ------------------------------------------------------------------------------------ run
def run(cfg: DistillConfig) -> Path:
    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.methods import apply_method, load_trained
    from lmwright.models import build_model, count_parameters
    from lmwright.stages._align import base_path_of

    tokenizer = check(cfg)["tokenizer"]
    task = task_of(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, _ = load_trained(cfg.teacher, task=task)
    teacher.to(device).eval().requires_grad_(False)
    id2label = {int(k): v for k, v in (teacher.config.id2label or {}).items()} if task == "classification" else {}
    label2id = {v: k for k, v in id2label.items()}

    train_recs, val_recs, manifest = load_records(cfg.data)
    train_ds = build_items(train_recs, tokenizer, cfg, label2id)
    val_ds = build_items(val_recs, tokenizer, cfg, label2id)
    coll = partial(collate, pad_id=tokenizer.pad_token_id)
    log.info("data: %d train / %d validation examples (%s)", len(train_ds), len(val_ds), task)

    student = build_model(cfg.model, task=task, tokenizer=tokenizer, seed=cfg.train.seed,
                          num_labels=len(id2label) or None, id2label=id2label or None)
    if student.config.pad_token_id is None:
        student.config.pad_token_id = tokenizer.pad_token_id
    student = apply_method(student, cfg.method, task)
    if student.get_output_embeddings() is not None and task == "causal-lm" and \
            student.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise ConfigError("teacher and student output vocabularies differ in size: they must share the tokenizer")
    run_ = Run.start(cfg, "distill", manifest)
    t_params, s_params = count_parameters(teacher)[1], count_parameters(student)[1]
    run_.write_info(teacher=cfg.teacher, student=cfg.model.name, teacher_parameters=t_params,
                    student_parameters=s_params)

    def evaluate(m) -> dict[str, float]:
        res = hard_label_metrics(m, val_ds, coll, cfg.train.micro_batch_size, device)
        res.pop("tokens_per_s")
        return res

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, task, method_cfg=cfg.method, base_path=base_path_of(cfg.model))

    result = train(student, train_ds, coll, make_objective(cfg, teacher), cfg.train, run_,
                   evaluate=evaluate if val_ds else None, save_model=save_model)
    if result.interrupted:
        return run_.dir
    save_final(student, tokenizer, run_.final, task, method_cfg=cfg.method, base_path=base_path_of(cfg.model),
               extra={"stage": "distill", "teacher": str(cfg.teacher)})
    rows = []
    if val_ds:
        for name, m, n in (("teacher", teacher, t_params), ("student", student, s_params)):
            rows.append({"model": name, "parameters": n, **hard_label_metrics(m, val_ds, coll,
                                                                                cfg.train.micro_batch_size, device)})
    summary = {"teacher": cfg.teacher, "student": cfg.model.name, "divergence": cfg.divergence, "alpha": cfg.alpha,
               "temperature": cfg.temperature, "steps": result.step, "train_seconds": round(result.train_seconds, 1),
               "size ratio (student/teacher)": s_params / max(t_params, 1)}
    run_.write_info(comparison=rows)
    write_report(run_.dir, f"lmwright distill - {run_.dir.name}", [("Teacher vs student", table(rows))] if rows else [],
                 summary)
    return run_.dir


class _Stage:
    name = "distill"
    Config = DistillConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("distill", _Stage)
