"""Named model presets built from a config, with no download.

A preset is a transformers config class name + keyword arguments. ``build_model`` creates the
architecture for a *task* (causal-lm, masked-lm, seq2seq, classification, embedding) with the
vocabulary and special-token ids of the tokenizer it will be trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt
from lmwright.models.introspect import TASK_CLASSES
from lmwright.models.load import check_overrides, load_model, resolve_dtype

Task = Literal["causal-lm", "masked-lm", "seq2seq", "classification", "embedding", "reward"]

# family -> which tasks it can do
FAMILY_TASKS = {
    "llama": {"causal-lm", "classification", "reward"},
    "gpt2": {"causal-lm", "classification", "reward"},
    "bert": {"masked-lm", "classification", "embedding", "reward"},
    "t5": {"seq2seq"},
    "bart": {"seq2seq", "classification"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": dict(family="gpt2", about="GPT-2 style, 2 layers x 64, for tests",
                     n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt-small": dict(family="gpt2", about="GPT-2 style, 6 layers x 256 (demo size)",
                      n_embd=256, n_layer=6, n_head=8, n_positions=1024),
    "llama-tiny": dict(family="llama", about="Llama style, 2 layers x 64, GQA, for tests",
                       hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024),
    "llama-demo": dict(family="llama", about="Llama style, 4 layers x 192 (the demo model)",
                       hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=1024),
    "llama-20m": dict(family="llama", about="Llama style, ~20M parameters (10 x 384), benchmark size",
                      hidden_size=384, intermediate_size=1152, num_hidden_layers=10, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=2048),
    "llama-100m": dict(family="llama", about="Llama style, ~100M parameters (12 x 768), GPU benchmark size",
                       hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, max_position_embeddings=2048),
    "bert-tiny": dict(family="bert", about="BERT style encoder, 2 layers x 64, for tests",
                      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=512),
    "bert-small": dict(family="bert", about="BERT style encoder, 4 layers x 256",
                       hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       max_position_embeddings=512),
    "t5-tiny": dict(family="t5", about="T5 style encoder-decoder, 2+2 layers x 64, for tests",
                    d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4),
    "t5-small": dict(family="t5", about="T5 style encoder-decoder, 4+4 layers x 256",
                     d_model=256, d_ff=1024, d_kv=32, num_layers=4, num_decoder_layers=4, num_heads=8),
}


# model_type of the decoder-only (causal LM) folders the causal stages and the clm objective accept
CAUSAL_MODEL_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt_neox",
                      "phi", "phi3", "opt")


def preset_names() -> list[str]:
    return sorted(PRESETS)


@dataclass
class ModelConfig:
    name: str = opt("llama-tiny", "preset name (see `lmwright models`), a local model/run folder or a .gguf file")
    tokenizer: str | None = opt(None, "tokenizer folder; default: the model folder, or the run's tokenizer")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weight dtype; auto = float32 on CPU, bfloat16 on GPUs that support it")
    quantize: Literal["none", "nf4", "fp4", "int8"] = opt(
        "none", "load the base weights quantized (bitsandbytes); nf4 + method.name=lora is QLoRA")
    double_quant: bool = opt(True, "nested quantization of the 4-bit scales (QLoRA double quantisation)")
    quantize_embeddings: bool = opt(
        False, "with quantize=nf4/fp4: also hold the input embedding and the output head in 4 bits (one tensor "
               "when tied); they stay frozen. Saves ~0.1x of the fp16 base on small models, whose vocabulary "
               "matrix is a large share; adds quantization error to every input and logit")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    overrides: dict = opt({}, "architecture overrides applied to the preset/folder config, e.g. {num_hidden_layers: 4}")
    dropout: float | None = opt(None, "override the model's dropout probabilities")

    def is_preset(self) -> bool:
        return self.name in PRESETS

    def check(self) -> None:
        check_overrides(self.overrides)
        if self.quantize_embeddings and self.quantize not in ("nf4", "fp4"):
            raise ConfigError(f"model.quantize_embeddings=true needs model.quantize=nf4 or fp4 (got "
                              f"{self.quantize}): set one of them, or model.quantize_embeddings=false")
        if not self.is_preset() and not Path(self.name).exists():
            from lmwright.registry import suggest

            raise ConfigError(f"model.name '{self.name}' is neither a preset nor an existing folder or .gguf file."
                              f"{suggest(self.name, preset_names())} Presets: {', '.join(preset_names())}")


def preset_family(name: str) -> str:
    return PRESETS[name]["family"]


def _config_for(family: str, kwargs: dict, vocab_size: int, special: dict[str, int | None]):
    import transformers as tf

    pad, bos, eos = special.get("pad"), special.get("bos"), special.get("eos")
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                              tie_word_embeddings=True, **kwargs)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                             **kwargs)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab_size, pad_token_id=pad if pad is not None else 0, **kwargs)
    if family == "t5":
        return tf.T5Config(vocab_size=vocab_size, pad_token_id=pad if pad is not None else 0,
                           eos_token_id=eos, decoder_start_token_id=pad if pad is not None else 0,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=True, **kwargs)
    if family == "bart":
        return tf.BartConfig(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                             **kwargs)
    raise ConfigError(f"unknown model family '{family}'")


def special_ids(tokenizer) -> dict[str, int | None]:
    return {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}


def build_model(cfg: ModelConfig, task: str = "causal-lm", tokenizer=None, vocab_size: int | None = None,
                num_labels: int | None = None, id2label: dict | None = None, seed: int | None = None):
    """A fresh model from a preset, or a local folder loaded for ``task``.

    For presets the vocabulary size and special ids come from ``tokenizer``.
    """
    import torch
    import transformers as tf

    if task not in TASK_CLASSES:
        raise ConfigError(f"unknown task '{task}'; valid: {', '.join(TASK_CLASSES)}")
    auto = getattr(tf, TASK_CLASSES[task])
    extra: dict[str, Any] = {}
    if task in ("classification", "reward"):
        extra["num_labels"] = 1 if task == "reward" else (num_labels or 2)
        if id2label:
            extra["id2label"] = {int(k): v for k, v in id2label.items()}
            extra["label2id"] = {v: int(k) for k, v in id2label.items()}
    if not cfg.is_preset():
        return load_model(cfg.name, task=task, model_cfg=cfg, **extra)
    preset = dict(PRESETS[cfg.name])
    family = preset.pop("family")
    preset.pop("about", None)
    if task not in FAMILY_TASKS[family]:
        raise ConfigError(f"model '{cfg.name}' ({family}) cannot be used for {task}; it supports "
                          f"{', '.join(sorted(FAMILY_TASKS[family]))}. Pick another model.name.")
    preset.update(cfg.overrides or {})
    if vocab_size is None:
        if tokenizer is None:
            raise ConfigError("building a preset needs a tokenizer (or vocab_size)")
        vocab_size = len(tokenizer)
    config = _config_for(family, preset, vocab_size, special_ids(tokenizer) if tokenizer is not None else {})
    for k, v in extra.items():
        setattr(config, k, v)
    if cfg.dropout is not None:
        _set_dropout(config, cfg.dropout)
    config._attn_implementation = cfg.attn_implementation  # honoured by from_config
    if seed is not None:
        torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation=cfg.attn_implementation)
    dtype = resolve_dtype(cfg.dtype)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model


def _set_dropout(config, p: float) -> None:
    for name in ("attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                 "embd_pdrop", "attn_pdrop", "dropout_rate", "dropout", "hidden_dropout"):
        if hasattr(config, name):
            setattr(config, name, p)


def describe_presets() -> list[dict[str, Any]]:
    """Name, family, parameter count and description of every preset (for `lmwright models`)."""
    out = []
    for name in preset_names():
        p = PRESETS[name]
        out.append({"name": name, "family": p["family"], "params": estimate_params(name), "about": p["about"]})
    return out


def estimate_params(name: str, vocab_size: int = 8192) -> int:
    """Parameter count of a preset at a given vocabulary (built on the meta device: no memory)."""
    import torch

    cfg = ModelConfig(name=name)
    task = sorted(FAMILY_TASKS[PRESETS[name]["family"]])[0]
    task = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "masked-lm", "t5": "seq2seq",
            "bart": "seq2seq"}.get(PRESETS[name]["family"], task)
    with torch.device("meta"):
        model = build_model(cfg, task=task, vocab_size=vocab_size)
    return sum(p.numel() for p in model.parameters())
