"""Tiny random models of the main decoder families, built from their transformers configs and saved as
local Hugging Face folders (what a user points ``model.name`` at): the family matrix of
tests/methods/test_contract.py, the serving engine and the exporters all start from these.

Each config keeps what makes the family different (Llama-3 rope scaling and untied embeddings, Qwen2's
q/k/v bias, Qwen3's q/k norm, Mistral's and Gemma's sliding window, Gemma-2's soft-capping, Gemma's
embedding scaling, Phi-3's fused qkv_proj/gate_up_proj) at hidden 64, 2 layers, intermediate 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
_GEMMA = dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)

# family key (what lmwright.models.introspect.model_family returns) -> (transformers config class, kwargs)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_SMALL, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(_SMALL, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_SMALL, head_dim=16, sliding_window=8, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(_GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(_SMALL, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_inner=64, n_positions=256)),
}
# attention kernel to load each with (model.attn_implementation); default sdpa. Gemma-2 has no SDPA kernel
# in transformers 5.24 (its attention logits are soft-capped)
FAMILY_ATTENTION = {"gemma2": "eager"}
# the Llama family's default case (tied embeddings, default rope) is the llama-tiny preset
FAMILY_NAMES = sorted(FAMILIES)


def family_config(family: str, tokenizer, **overrides) -> Any:
    import transformers as tf

    cls, kwargs = FAMILIES[family]
    return getattr(tf, cls)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            **{**kwargs, **overrides})


def build_family_model(family: str, tokenizer, seed: int = 0, attn_implementation: str | None = None,
                       **overrides) -> Any:
    """A random causal LM of ``family`` (float32, eval mode; attention: transformers' default for it); ``overrides``
    change its config."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer, **overrides),
                                             attn_implementation=attn_implementation)
    return model.eval()


def save_family_folder(family: str, tokenizer, out: Path, seed: int = 0, scramble_std: float | None = None) -> Path:
    """``out`` as a local model folder (config, safetensors, tokenizer) of a random ``family`` model.

    ``scramble_std``: large random weights, so that greedy outputs vary token to token (a freshly
    initialised tiny model repeats one token, which would let decoding bugs pass unnoticed). The input
    embedding keeps its initialisation: Gemma scales it by sqrt(hidden), and large embeddings then
    dominate the residual stream so that every step picks the same token again.
    """
    import torch

    model = build_family_model(family, tokenizer, seed)
    if scramble_std is not None:
        g = torch.Generator().manual_seed(seed)
        embedding = model.get_input_embeddings().weight
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and p is not embedding:
                    p.copy_(torch.randn(p.shape, generator=g) * scramble_std)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def folder_factory(tmp_path_factory, tokenizer, scramble_std: float | None = None):
    """``folder(family) -> Path``, saving each family's folder once (for a module-scoped fixture)."""
    made: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in made:
            made[family] = save_family_folder(family, tokenizer, tmp_path_factory.mktemp(family), scramble_std=scramble_std)
        return made[family]

    return folder
