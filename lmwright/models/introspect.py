"""What a model is: its task and its family, asked here by every layer above.

- **task**: ``TASK_CLASSES`` (task -> the transformers ``AutoModelFor...`` class that builds or loads it),
  ``task_from_arch`` (an architecture class name such as ``GPT2LMHeadModel`` -> task), ``task_of_model``
  (a loaded model, under a peft wrapper or not), ``task_of`` (an ``lmwright.json`` + a ``config.json``)
  and ``trained_task`` (a model, run or checkpoint folder).
- **family**: ``model_type`` is the transformers ``model_type`` (``llama``, ``gemma3_text``, ``roberta``,
  ...) that the stages and objectives check; ``model_family`` is the family key of ``FAMILIES``
  (``roberta`` -> ``bert``, ``gemma3_text`` -> ``gemma3``) that the method compatibility table and the
  adapter hooks use. Both accept a transformers config, a model, a ``ModelConfig`` (preset or folder),
  a model folder, a ``config.json`` dict or an ``lmwright.json`` dict (through its ``base`` folder).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# task -> the transformers auto class that builds (presets) or loads (folders) it
TASK_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "reward": "AutoModelForSequenceClassification",
    "embedding": "AutoModel",
}

# family key -> what it covers; the method compatibility table and docs/methods.md are per family
FAMILIES: dict[str, str] = {
    "llama": "Llama 1-3 (LlamaForCausalLM), incl. Llama-3 rope scaling, tied or untied embeddings",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2, Qwen2.5 (q/k/v bias)",
    "qwen3": "Qwen3 (q/k norm)",
    "gemma": "Gemma (1)",
    "gemma2": "Gemma-2 (logit soft-capping, alternating sliding/full attention; eager attention only)",
    "gemma3": "Gemma-3 text (Gemma3ForCausalLM with Gemma3TextConfig)",
    "phi3": "Phi-3 (fused qkv_proj and gate_up_proj)",
    "gpt2": "GPT-2 (Conv1D layers)",
    "bert": "BERT, RoBERTa (encoders)",
    "t5": "T5 (encoder-decoder)",
    "bart": "BART (encoder-decoder)",
}
# model_type -> family; model types not listed (e.g. gemma3, the multimodal Gemma3ForConditionalGeneration)
# are their own, unsupported family
_FAMILY_OF = {**{f: f for f in FAMILIES if f != "gemma3"}, "gemma3_text": "gemma3", "roberta": "bert",
              "gemma3": "gemma3-multimodal"}


def unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ------------------------------------------------------------------------------------ task
def task_from_arch(arch: str) -> str:
    """The task of a transformers architecture class name (``config.json`` ``architectures[0]``)."""
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    if arch.endswith("ForMaskedLM"):
        return "masked-lm"
    if arch.endswith("ForConditionalGeneration"):
        return "seq2seq"
    if arch.endswith("LMHeadModel"):  # GPT2LMHeadModel and kin: causal LMs whose name ends in "Model"
        return "causal-lm"
    if arch.endswith("Model"):
        return "embedding"
    return "causal-lm"


def task_of_model(model: Any) -> str:
    """The task of a loaded model, from its class (under a peft wrapper or not)."""
    return task_from_arch(type(unwrap(model)).__name__)


def task_of(meta: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The task an ``lmwright.json`` (``meta``) says, else the architecture of a ``config.json`` (``config``;
    ``{}`` when there is none: causal-lm)."""
    if meta.get("task"):
        return str(meta["task"])
    archs = config.get("architectures") or [""]
    return task_from_arch(archs[0])


def trained_task(path: str | Path) -> str:
    """The task a model folder was trained for: its ``lmwright.json`` says (an adapter folder has nothing
    else to say it), else the architecture in its ``config.json``. ``load_trained`` and ``lmwright.load``
    both ask here."""
    from lmwright.models.load import resolve_model_path
    from lmwright.models.meta import read_meta

    p = resolve_model_path(path)
    meta = read_meta(p)
    cfg_file = p / "config.json"
    config = {} if meta.get("task") or not cfg_file.exists() else json.loads(cfg_file.read_text())
    return task_of(meta, config)


# ------------------------------------------------------------------------------------ family
def model_type(model: Any) -> str | None:
    """The transformers ``model_type`` of ``model``: a config or a model (``config.model_type``), a
    ``ModelConfig`` (a preset's family, or its folder's), a model folder (its ``config.json``; None for an
    adapter folder without one), a ``config.json`` dict, or an ``lmwright.json`` dict (its ``base`` folder's;
    None without one)."""
    if isinstance(model, Mapping):
        if "model_type" in model:
            return model["model_type"]
        return model_type(Path(model["base"])) if model.get("base") else None
    if isinstance(model, (str, Path)):
        from lmwright.models.load import read_config, resolve_model_path

        p = resolve_model_path(model)
        if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
            return None
        return read_config(p).get("model_type")
    if callable(getattr(model, "is_preset", None)):  # a ModelConfig
        if model.is_preset():
            from lmwright.models.presets import PRESETS

            return PRESETS[model.name]["family"]
        return model_type(model.name)
    config = getattr(model, "config", model)
    return getattr(config, "model_type", "")


def model_family(model: Any) -> str | None:
    """The family key of ``model`` (see ``FAMILIES``; anything :func:`model_type` accepts), or its
    model_type if it is no known family (None where :func:`model_type` is None)."""
    mt = model_type(model)
    return None if mt is None else _FAMILY_OF.get(mt, mt)
