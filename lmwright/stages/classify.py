"""``lmwright train classify``: sequence classification with a new head on an encoder (bert presets, a
MiniLM folder) or a decoder, with any method.

Read top to bottom: config -> tokenizer -> records -> label names (sorted from the training data or
``labels:``; a validation label outside them is reported with its file and line) -> token ids ->
model + head + method -> metrics before -> engine.train (best checkpoint by train.metric_for_best,
early stopping) -> final/ -> accuracy, macro-F1, confusion matrix -> report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.introspect import model_type
from lmwright.models.presets import ModelConfig
from lmwright.objectives.classification import classification_loss  # noqa: F401 (re-exported)
from lmwright.stages.common import STAGES, resolve_tokenizer, save_final
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.classify")


@dataclass
class ClassifyConfig:
    stage: str = opt("classify", "stage id (lets `lmwright validate` know what the file configures)")
    model: ModelConfig = opt(ModelConfig(name="bert-tiny"), "an encoder (bert preset, MiniLM folder) or a decoder")
    tokenizer: str | None = opt(None, "tokenizer folder; default: the model folder's (or its run's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted; the new head always trains")
    data: DataConfig = opt(DataConfig(format="classification", val_fraction=0.1), "{text, label} records")
    train: TrainConfig = opt(TrainConfig(lr=5e-5, metric_for_best="val_accuracy", eval_every=25, max_steps=100),
                             "the training loop")
    labels: list[str] = opt([], "class names in id order; default: the training labels, sorted")
    class_weights: str | list[float] = opt(  # noqa: RUF009 (opt copies defaults)
        "none", "loss weight per class: none, auto (n / (classes x count)) or a list in label order")
    max_length: int = opt(128, "tokens per text; longer texts are truncated")

    def check(self) -> None:
        if isinstance(self.class_weights, str) and self.class_weights not in ("auto", "none"):
            raise ConfigError(f"class_weights={self.class_weights!r}: use auto, none or a list of numbers, one per "
                              f"label")
        if isinstance(self.class_weights, list) and any(w < 0 for w in self.class_weights):
            raise ConfigError("class_weights must not be negative")
        if self.max_length < 4:
            raise ConfigError(f"max_length={self.max_length} is too short; use at least 4")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels {self.labels} has duplicates")


def check(cfg: ClassifyConfig) -> dict[str, Any]:
    """Everything that can be verified before training (used by `lmwright validate`)."""
    from lmwright.methods import check_compat

    if cfg.data.format != "classification":
        raise ConfigError(f"data.format={cfg.data.format}: classify trains on {{text, label}} records; set "
                          f"data.format=classification")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at {text, label} records")
    tokenizer = resolve_tokenizer(cfg.model, cfg.tokenizer or cfg.model.tokenizer)
    family = model_type(cfg.model)
    if family in ("t5",):
        raise ConfigError(f"model.name={cfg.model.name} is a {family} model without a classification head; use an "
                          f"encoder (bert, MiniLM) or a decoder (llama, gpt2)")
    if cfg.model.is_preset() and cfg.model.quantize != "none":
        raise ConfigError(f"model.quantize={cfg.model.quantize} needs pretrained weights: set model.name to a folder")
    check_compat(cfg.method, cfg.model, "classification", cfg.model.gradient_checkpointing)
    if isinstance(cfg.class_weights, list) and cfg.labels and len(cfg.class_weights) != len(cfg.labels):
        raise ConfigError(f"class_weights has {len(cfg.class_weights)} values for {len(cfg.labels)} labels")
    return {"tokenizer": tokenizer}


# ------------------------------------------------------------------------------------ labels
def _name(label: Any, labels: list[str]) -> str:
    """Label value -> class name (an integer id indexes ``labels:`` when given)."""
    if isinstance(label, int) and labels and str(label) not in labels and 0 <= label < len(labels):
        return labels[label]
    return str(label)


def label_names(cfg: ClassifyConfig, train_recs: list[dict], val_recs: list[dict]) -> list[str]:
    """The class names in id order; every train and validation label must be one of them."""
    seen = {_name(r["label"], cfg.labels) for r in train_recs}
    if cfg.labels:
        names = list(cfg.labels)
    else:
        names = sorted(seen, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    for split, recs in (("training", train_recs), ("validation", val_recs)):
        for r in recs:
            name = _name(r["label"], cfg.labels)
            if name not in names:
                where = _locate(cfg.data, r, split)
                fix = "add it to labels: or fix the record" if cfg.labels else \
                    "add training examples with it, list every class in labels:, or fix the record"
                raise ConfigError(f"{where}: label {name!r} is not a known class ({', '.join(names)}; from "
                                  f"{'labels:' if cfg.labels else 'the training data'}); {fix}")
    if isinstance(cfg.class_weights, list) and len(cfg.class_weights) != len(names):
        raise ConfigError(f"class_weights has {len(cfg.class_weights)} values for {len(names)} labels "
                          f"({', '.join(names)})")
    return names


def _locate(data: DataConfig, record: dict, split: str) -> str:
    """file:line of a record (the data layer's records carry no location: re-read the sources)."""
    from lmwright.data import FORMATS, read_records
    from lmwright.data.formats import rename_columns

    fmt = FORMATS.get("classification")
    paths = data.val_path if (split == "validation" and data.val_path) else data.path
    try:
        for raw in read_records(paths, txt_mode=data.txt_mode, split="validation" if data.val_path and
                                split == "validation" else "train", on_error="skip"):
            try:
                rec = fmt.canonicalize(rename_columns(raw.data, data.columns), raw.where)
            except Exception:  # noqa: BLE001 (invalid records were rejected by the data layer already)
                continue
            if rec["label"] == record["label"] and rec["text"].strip() == record["text"].strip():
                return raw.where
    except Exception:  # noqa: BLE001 (locating is best effort; the message still names the label)
        pass
    return f"{split} data ({', '.join(paths)})"


def class_weight_tensor(cfg: ClassifyConfig, ids: list[int], n_classes: int):
    import torch

    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    counts = torch.bincount(torch.tensor(ids), minlength=n_classes).float()
    return len(ids) / (n_classes * counts.clamp(min=1.0))  # "balanced": rare classes weigh more


# ------------------------------------------------------------------------------------ loss + metrics
def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask and (B,) class ids."""
    from lmwright.data.packing import collate_padded

    return collate_padded(rows, pad_id, labels="class")


def predict(model, rows: list[dict], pad_id: int, batch_size: int = 64) -> list[int]:
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int] = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = collate(rows[s:s + batch_size], pad_id)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            preds += logits.argmax(-1).tolist()
    model.train(was_training)
    return preds


def scores(y_true: list[int], y_pred: list[int], n: int) -> dict[str, Any]:
    """accuracy, macro-F1 (mean over classes of 2PR/(P+R)), per-class P/R/F1, confusion[true][pred]."""
    conf = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred):
        conf[t][p] += 1
    per_class = []
    for c in range(n):
        tp = conf[c][c]
        pred_c = sum(conf[r][c] for r in range(n))
        true_c = sum(conf[c])
        prec = tp / pred_c if pred_c else 0.0
        rec = tp / true_c if true_c else 0.0
        per_class.append({"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                          "support": true_c})
    acc = sum(conf[c][c] for c in range(n)) / max(len(y_true), 1)
    return {"accuracy": acc, "macro_f1": sum(p["f1"] for p in per_class) / max(n, 1), "per_class": per_class,
            "confusion": conf}


# ------------------------------------------------------------------------------------ the stage
def run(cfg: ClassifyConfig) -> Path:
    import torch

    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.methods import apply_method, trainable_report, trains_all
    from lmwright.models import build_model
    from lmwright.models.load import resolve_model_path

    tokenizer = check(cfg)["tokenizer"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # data
    train_recs, val_recs, manifest = load_records(cfg.data)
    names = label_names(cfg, train_recs, val_recs)
    index = {n: i for i, n in enumerate(names)}

    def rows(recs: list[dict]) -> list[dict]:
        if not recs:  # no validation split (val_fraction=0): the tokenizer refuses an empty batch
            return []
        enc = tokenizer([r["text"] for r in recs], truncation=True, max_length=cfg.max_length)["input_ids"]
        return [{"input_ids": list(e), "label": index[_name(r["label"], cfg.labels)]} for e, r in zip(enc, recs)]

    train_ds, val_ds = rows(train_recs), rows(val_recs)
    weights = class_weight_tensor(cfg, [r["label"] for r in train_ds], len(names))
    log.info("data: %d train / %d validation texts, %d classes: %s", len(train_ds), len(val_ds), len(names),
             ", ".join(names))

    # model: a new head with len(names) outputs, then the method
    model = build_model(cfg.model, task="classification", tokenizer=tokenizer, num_labels=len(names),
                        id2label=dict(enumerate(names)), seed=cfg.train.seed)
    if model.config.pad_token_id is None:  # decoders find the last real token through pad_token_id
        model.config.pad_token_id = pad_id
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    run_ = Run.start(cfg, "classify", manifest)
    base_path = None if cfg.model.is_preset() else str(resolve_model_path(cfg.model.name).resolve())
    if base_path is None and not trains_all(cfg.method):  # a preset has no folder for final/ to point at
        model.save_pretrained(str(run_.dir / "base"))
        base_path = str((run_.dir / "base").resolve())
    model = apply_method(model, cfg.method, "classification")
    params = trainable_report(model)

    run_.write_info(model=cfg.model.name, base=base_path, method=cfg.method.name, quantize=cfg.model.quantize,
                    labels=names, trainable=params["trainable"], total_parameters=params["total"],
                    trainable_pct=params["trainable_pct"],
                    data_counts=manifest.get("counts"), train_rows=len(train_ds), val_rows=len(val_ds),
                    class_weights=weights.tolist() if weights is not None else None)
    tokenizer.save_pretrained(str(run_.dir / "tokenizer"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    y_val = [r["label"] for r in val_ds]

    def evaluate(m) -> dict[str, float]:
        s = scores(y_val, predict(m, val_ds, pad_id, cfg.train.micro_batch_size * 4), len(names))
        return {"val_accuracy": s["accuracy"], "val_macro_f1": s["macro_f1"]}

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "classification", method_cfg=cfg.method, base_path=base_path)

    before = evaluate(model) if val_ds else {}
    log.info("before training: %s", before)
    loss = classification_loss(weights)
    result = train(model, train_ds, lambda b: collate(b, pad_id), loss, cfg.train, run_,
                   val_data=val_ds or None, evaluate=evaluate if val_ds else None, save_model=save_model)
    if result.interrupted:
        return run_.dir
    final = scores(y_val, predict(model, val_ds, pad_id), len(names)) if val_ds else {}
    after = {"val_accuracy": final["accuracy"], "val_macro_f1": final["macro_f1"]} if final else {}
    save_final(model, tokenizer, run_.final, "classification", extra={"stage": "classify", "labels": names},
               method_cfg=cfg.method, base_path=base_path)

    # report
    tokens_per_s = result.tokens_seen / max(result.train_seconds, 1e-9)
    run_.write_info(before=before, after=after, confusion=final.get("confusion"), tokens_per_s=tokens_per_s,
                    per_class={n: p for n, p in zip(names, final.get("per_class", []))})
    summary: dict[str, Any] = {"model": cfg.model.name, "method": cfg.method.name,
                               "trainable %": round(params["trainable_pct"], 3), "steps": result.step,
                               "best step": result.best_step, "stopped early": result.stopped_early,
                               "train_seconds": round(result.train_seconds, 1)}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    sections = []
    if final:
        conf = [{"true \\ predicted": n, **{p: final["confusion"][i][j] for j, p in enumerate(names)}}
                for i, n in enumerate(names)]
        sections.append(("Confusion matrix (validation)", table(conf)))
        sections.append(("Per class", table([{"label": n, **p} for n, p in zip(names, final["per_class"])])))
    write_report(run_.dir, f"lmwright classify ({cfg.method.name}) - {run_.dir.name}", sections, summary)
    log.info("after training: %s", after)
    return run_.dir


class _Stage:
    name = "classify"
    Config = ClassifyConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("classify", _Stage)
