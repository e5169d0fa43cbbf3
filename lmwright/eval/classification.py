"""``classification``: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

Labels are matched by *name* through the model config's ``id2label`` (a record label may be the
class name or its integer id), so a data set whose classes are in another order still scores right.
"""

from __future__ import annotations

from typing import Any

from lmwright.eval import EVAL_TASKS, batches


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (unweighted mean over classes; a class never predicted nor present counts 0)
    and the confusion matrix ``cm[true][pred]``."""
    k = len(labels)
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        cm[t][p] += 1
    per_class = {}
    f1s = []
    for c in range(k):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(k)) - tp
        fn = sum(cm[c]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[labels[c]] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    n = len(y_true)
    return {"accuracy": sum(cm[c][c] for c in range(k)) / n if n else 0.0,
            "macro_f1": sum(f1s) / k if k else 0.0, "examples": n,
            "labels": list(labels), "confusion_matrix": cm, "per_class": per_class}


def label_ids(records: list[dict], id2label: dict[int, str]) -> list[int]:
    from lmwright.config import ConfigError

    label2id = {str(v): int(k) for k, v in id2label.items()}
    out = []
    for i, r in enumerate(records):
        lab = r["label"]
        if isinstance(lab, int):
            if lab not in id2label:
                raise ConfigError(f"record {i + 1}: label id {lab} is not a class of the model "
                                  f"(ids 0..{len(id2label) - 1}: {', '.join(label2id)})")
            out.append(lab)
        elif str(lab) in label2id:
            out.append(label2id[str(lab)])
        else:
            raise ConfigError(f"record {i + 1}: label '{lab}' is not a class of the model; its classes "
                              f"(config.id2label) are: {', '.join(label2id)}")
    return out


def predict(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16, max_length: int = 512) -> list[int]:
    import torch

    preds: list[int] = []
    model.eval()
    with torch.no_grad():
        for chunk in batches(texts, batch_size):
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, C)
            preds += [int(i) for i in logits.argmax(-1)]
    return preds


@EVAL_TASKS.register("classification")
class Classification:
    name = "classification"
    formats = ("classification",)
    model_task = "classification"

    def run(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16, **_: Any) -> dict[str, Any]:
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        y_true = label_ids(records, id2label)
        y_pred = predict(model, tokenizer, [r["text"] for r in records], batch_size)
        return classification_metrics(y_true, y_pred, [id2label[i] for i in range(len(id2label))])
