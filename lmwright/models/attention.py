"""Attention for packed rows: each sample of a packed row attends only within itself, computed per sample.

A packed row (``data/packing.py``) holds several samples whose ``position_ids`` restart at 0, and the model
is called with ``attention_mask=None``. With transformers' ``sdpa`` attention that becomes a block-diagonal
causal mask over the whole row: every head computes the full (T x T) score square and masks most of it away
(a 512-token row of ~2.5 samples computes ~2.5x the scores it needs, and the masked kernel is slower than the
causal one). ``packed_sdpa`` is registered as the attention implementation ``lmwright_packed``. A training
forward over packed rows passes the rows' samples as ``lmwright_segments`` (:func:`packed_kwargs`; transformers
hands unknown keyword arguments down to the attention function, and gradient checkpointing replays them), and
then each sample's own slice runs SDPA with ``is_causal=True``: exactly the attention of the block-diagonal
mask (the same keys, causal order and scale). Without that argument (padded batches, a KV cache, generation,
evaluation) the call goes to transformers' own ``sdpa_attention_forward`` unchanged, as do sliding windows,
soft-capping and requested attention weights. The mask function is sdpa's, and ``_attn_implementation`` is
not written into ``config.json``. On a CPU with bf16 q, k, v (bf16 autocast casts them, as it does for SDPA) and
a head size that is a multiple of 32, every sample and head of the batch runs in one call of lmwright's own
kernel, forward and backward (``models/cpu_attention.py``); otherwise per sample through torch's SDPA, in fp32
on a CPU.

``lmwright_sdpa_fp32`` (:func:`fp32_sdpa`, :func:`use_fp32_attention`) is transformers' sdpa over fp32 upcasts of
q, k and v, for bf16 models served on a CPU: torch's CPU SDPA is ~8x slower in bf16 than in fp32 (a decode step
of 16 rows x 150 cached positions over SmolLM2's 30 layers: 143 vs 18 ms on an AMD EPYC with avx512_bf16 and no
AMX, torch 2.13). q, k and v come out of bf16 projections, so the upcast is exact; the output is cast back.
"""

from __future__ import annotations

import contextlib
from typing import Any

NAME = "lmwright_packed"
FP32_NAME = "lmwright_sdpa_fp32"


def segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sample: a new sample starts where the position does not go up by one
    (the rule of transformers' ``find_packed_sequence_indices``)."""
    import torch

    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    T = position_ids.shape[1]
    out = []
    for row in starts.tolist():
        idx = [t for t, s in enumerate(row) if s] or [0]
        if idx[0] != 0:
            idx = [0] + idx
        out.append(list(zip(idx, idx[1:] + [T])))
    return out


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any):
    """``(B, T, H, D)`` attention output, like transformers' ``sdpa_attention_forward``."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segs_per_row = kwargs.pop("lmwright_segments", None)
    T = query.shape[2]
    plain = (segs_per_row is None or key.shape[2] != T or len(segs_per_row) != query.shape[0]
             or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions") or kwargs.get("position_bias") is not None
             or not getattr(module, "is_causal", True) or any(segs[-1][1] != T for segs in segs_per_row))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if not (dropout and module.training):
        from lmwright.models import cpu_attention

        q, k, v = cpu_attention.autocast_inputs(query, key, value)
        if cpu_attention.usable(q, k, v):  # bf16 on a CPU: one kernel for every sample and head
            return cpu_attention.packed_attention(q, k, v, segs_per_row, scaling), None
    B = query.shape[0]
    groups = getattr(module, "num_key_value_groups", 1)
    out_dtype = query.dtype
    upcast = query.device.type == "cpu" and out_dtype == torch.bfloat16  # CPU SDPA is slower in bf16 (fp32_sdpa)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    # split, not slices: the backward of a split is one concatenation, that of each slice a zero-filled tensor of
    # the whole input (per sample, per q/k/v, per layer: ~0.1 s of a SmolLM2 LoRA step on one CPU core)
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # autocast would cast back
        for q, k, v, segs in zip(query.split(1), key.split(1), value.split(1), segs_per_row):
            lengths = [e - s for s, e in segs]
            parts = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True,
                                                    enable_gqa=groups > 1)
                     for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if B == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).to(out_dtype).contiguous(), None


def fp32_sdpa(module, query, key, value, attention_mask, **kwargs: Any):
    """transformers' ``sdpa_attention_forward`` over fp32 copies of ``query``, ``key``, ``value``; the output in
    the query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def register(name: str = NAME) -> None:
    """Make ``name`` (``lmwright_packed`` or ``lmwright_sdpa_fp32``) a name transformers' attention and mask
    interfaces know (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, {NAME: packed_sdpa, FP32_NAME: fp32_sdpa}[name])
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def saved_name(name: str | None) -> str | None:
    """The attention implementation to write into a saved model's metadata (and to reload with): ``sdpa`` for
    lmwright's own names, which switch a model on ``sdpa`` for training or serving and are registered only in the
    process that switched it (an adapter saved with ``lmwright_packed`` failed to reload in a fresh process)."""
    return "sdpa" if name in (NAME, FP32_NAME) else name


def _switch(model, name: str) -> bool:
    """Switch a model that uses ``sdpa`` to the attention implementation ``name``; False (left alone) for a model
    on eager, flash or flex attention, or an encoder-decoder."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" \
            or getattr(config, "is_encoder_decoder", False):
        return False
    register(name)
    config._attn_implementation = name
    for sub in (getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        sub_cfg = getattr(sub, "config", None)
        if sub_cfg is not None and sub_cfg is not config and getattr(sub_cfg, "_attn_implementation", None) == "sdpa":
            sub_cfg._attn_implementation = name
    return True


def use_packed_attention(model) -> bool:
    """Switch a model that uses ``sdpa`` to ``lmwright_packed`` (same results, per-sample attention on packed
    rows). Returns whether it switched; a model on eager, flash or flex attention is left alone."""
    return _switch(model, NAME)


def prepare_packed_training(model) -> None:
    """What a causal LM trained on packed rows gets (the sft and pretrain stages' model builders, the benchmarks):
    per-sample attention (:func:`use_packed_attention`) and the fused RMSNorm / SwiGLU kernels in training forwards
    (``models.cpu_fused.fuse_for_training``: bf16 on a CPU; evaluation and generation keep transformers' code)."""
    from lmwright.models.cpu_fused import fuse_for_training

    use_packed_attention(model)
    fuse_for_training(model)


def use_fp32_attention(model) -> bool:
    """Switch a bf16 model on a CPU that uses ``sdpa`` to ``lmwright_sdpa_fp32`` (see the module docstring);
    returns whether it switched (other models are left alone)."""
    import torch

    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.bfloat16:
        return False
    return _switch(model, FP32_NAME)


def packed_kwargs(model, batch: dict) -> dict:
    """The extra forward arguments for a packed batch (rows with ``position_ids`` and no ``attention_mask``) of a
    model switched by :func:`use_packed_attention`; empty otherwise (the model then runs as before)."""
    pos = batch.get("position_ids")
    if pos is None or batch.get("attention_mask") is not None:
        return {}
    bare = getattr(model, "module", model)  # DDP wraps the module
    if hasattr(bare, "_orig_mod"):  # torch.compile: a Python list argument would be a guard (a recompile per batch)
        return {}
    if getattr(getattr(bare, "config", None), "_attn_implementation", None) != NAME:
        return {}
    return {"lmwright_segments": segments(pos)}
