"""Method plugin contract, the registry, and loading of trained folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmwright.config import opt
from lmwright.registry import Registry

METHODS = Registry("method", package="lmwright.methods")


@dataclass
class MethodConfig:
    name: str = opt("full", "fine-tuning method: full, freeze, lora, dora, prefix, ptuning, prompt, adapter, ia3, qat")


class Method(Protocol):
    name: str
    merges: bool  # can be merged into a plain model

    def apply(self, model: Any, cfg: MethodConfig, task: str) -> Any: ...

    def save(self, model: Any, out_dir: Path) -> None: ...

    def merge(self, model: Any) -> Any: ...


def apply_method(model: Any, cfg: MethodConfig, task: str = "causal-lm") -> Any:
    return METHODS.get(cfg.name)().apply(model, cfg, task)


def save_trained(model: Any, cfg: MethodConfig, out_dir: str | Path) -> None:
    METHODS.get(cfg.name)().save(model, Path(out_dir))


def trainable_report(model: Any) -> dict[str, float]:
    from lmwright.models.load import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def load_trained(path: str | Path, task: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a run, checkpoint, plain HF folder or peft adapter folder."""
    from lmwright.models.load import load_model, load_tokenizer, resolve_model_path

    p = resolve_model_path(path)
    task = task or _guess_task(p)
    if (p / "adapter_config.json").exists():
        import json

        from peft import PeftModel

        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = load_model(base, task=task, **kwargs)
        model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
    else:
        model = load_model(p, task=task, **kwargs)
    tok_dir = p if (p / "tokenizer_config.json").exists() else p.parent / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    model.eval()
    return model, tokenizer


def _guess_task(p: Path) -> str:
    import json

    meta = p / "lmwright.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("task", "causal-lm")
    cfg_file = p / "config.json"
    if cfg_file.exists():
        archs = json.loads(cfg_file.read_text()).get("architectures") or [""]
        a = archs[0]
        if a.endswith("ForSequenceClassification"):
            return "classification"
        if a.endswith("ForMaskedLM"):
            return "masked-lm"
        if a.endswith("ForConditionalGeneration"):
            return "seq2seq"
        if a.endswith("Model"):
            return "embedding"
    return "causal-lm"
