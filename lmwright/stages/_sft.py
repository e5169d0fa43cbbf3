"""The SFT data path, shared by the ``sft`` and ``upft`` stages: checks of a causal chat model, records ->
conversations -> (input_ids, labels) from the chat template -> packed or padded rows, the masked next-token
loss, held-out exact match and the starting model with its method. ``upft`` runs them on self-sampled
responses; neither stage imports the other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.models.introspect import model_type
from lmwright.models.presets import CAUSAL_MODEL_TYPES
from lmwright.objectives.base import IGNORE_INDEX, LossOutput, causal_lm_loss, output_dtype_kept
from lmwright.stages.common import resolve_tokenizer
from lmwright.utils.hardware import choose_mixed_precision
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.sft")

CAUSAL_FAMILIES = CAUSAL_MODEL_TYPES


# ------------------------------------------------------------------------------------ checks
def use_packing(cfg: Any) -> bool:
    from lmwright.methods import uses_virtual_tokens

    # a method that feeds virtual tokens would need them before every packed sample, so it pads
    return cfg.packing if cfg.packing is not None else not uses_virtual_tokens(cfg.method)


def check_causal(cfg: Any, stage: str) -> dict[str, Any]:
    """Checks shared by sft and upft: tokenizer with a chat template, a causal LM, method compat."""
    from lmwright.methods import check_compat, uses_virtual_tokens

    tokenizer = resolve_tokenizer(cfg.model, cfg.tokenizer or cfg.model.tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer ({cfg.tokenizer or cfg.model.name}) has no chat template; {stage} renders "
                          f"conversations with it: set tokenizer=<folder> to one trained by `lmwright data "
                          f"tokenizer` (it adds ChatML) or add a chat_template to tokenizer_config.json")
    family = model_type(cfg.model)
    if family is None:
        raise ConfigError(f"model.name={cfg.model.name} is an adapter folder; merge it first (`lmwright export`) "
                          f"or point model.name at its base model")
    if family not in CAUSAL_FAMILIES:
        raise ConfigError(f"model.name={cfg.model.name} is a {family} model; {stage} trains causal LMs "
                          f"(llama, gpt2, ...): pick another model.name")
    if cfg.model.is_preset() and cfg.model.quantize != "none":
        raise ConfigError(f"model.quantize={cfg.model.quantize} quantizes pretrained weights, but model.name="
                          f"{cfg.model.name} is a preset built from scratch: set model.name to a model folder "
                          f"or model.quantize=none")
    check_compat(cfg.method, cfg.model, "causal-lm", cfg.model.gradient_checkpointing)
    if cfg.packing and uses_virtual_tokens(cfg.method):
        raise ConfigError(f"packing=true does not work with method.name={cfg.method.name}: its virtual tokens "
                          f"would have to precede every packed sample; set packing=false")
    if cfg.seq_len > tokenizer.model_max_length:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the tokenizer's model_max_length="
                          f"{tokenizer.model_max_length}: lower seq_len")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at alpaca or messages records")
    return {"tokenizer": tokenizer}


# ------------------------------------------------------------------------------------ data path
def conversations(records: list[dict], fmt: str, system_prompt: str | None = None) -> list[list[dict]]:
    """Canonical alpaca/messages/kto records as message lists (``system_prompt`` where none is given).

    A messages record's tool schemas ride along as the list's ``tools`` (a ``Conversation``); kto records
    give their desirable replies only (SFT imitates: an undesirable reply is what not to say)."""
    from lmwright.data.chat import alpaca_to_messages
    from lmwright.data.formats.messages import Conversation

    if fmt == "alpaca":
        return [alpaca_to_messages(r, system_prompt) for r in records]
    if fmt == "kto":
        records = [{"messages": r["prompt"] + r["completion"]} for r in records if r["label"]]
    out = []
    for r in records:
        msgs = list(r["messages"])
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append(Conversation(msgs, r.get("tools")))
    return out


def keep_first_trained(ids: list[int], labels: list[int], k: int) -> tuple[list[int], list[int]]:
    """Cut a sample after its k-th trained token, and always before its last one (the end-of-turn
    token): UPFT trains on unfinished response prefixes, which must not teach the model to stop."""
    trained = [j for j, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not trained:
        return ids, labels
    cut = trained[min(k, len(trained) - 1) - 1] + 1 if len(trained) > 1 else trained[0]
    return ids[:cut], labels[:cut]


def encode(tokenizer, convs: Sequence[list[dict]], train_on: str, seq_len: int,
           keep_trained: Sequence[int | None] | None = None) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(input_ids, labels) per sample, from the chat template, and what became of the conversations (the
    ``data`` entry of run.json): ``samples``; ``truncated`` (samples cut to ``seq_len``);
    ``dropped_truncated`` (the cut left nothing to learn); ``dropped_empty_mask`` (no assistant turn to
    learn); ``dropped_token_boundary`` (served and trained tokens would differ); ``dropped_no_target`` (all
    drops); ``split_conversations`` (a template that rewrites earlier turns, Qwen3: one sample per turn)."""
    from lmwright.data.chat import SKIPPABLE_REASONS, render_training_samples
    from lmwright.data.errors import DataError

    samples: list[tuple[list[int], list[int]]] = []
    stats = {"truncated": 0, "dropped_truncated": 0, "split_conversations": 0,
             **{f"dropped_{r}": 0 for r in SKIPPABLE_REASONS}}
    for i, msgs in enumerate(convs):
        try:
            pieces = render_training_samples(tokenizer, msgs, train_on, getattr(msgs, "tools", None))
        except DataError as e:
            if e.reason not in SKIPPABLE_REASONS:
                raise
            stats[f"dropped_{e.reason}"] += 1
            continue
        stats["split_conversations"] += len(pieces) > 1
        k = keep_trained[i] if keep_trained is not None else None
        for ids, labels in pieces:
            if k is not None:
                ids, labels = keep_first_trained(ids, labels, k)
            if len(ids) > seq_len:
                stats["truncated"] += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            if all(lab == IGNORE_INDEX for lab in labels[1:]):
                stats["dropped_truncated"] += 1
                continue
            samples.append((ids, labels))
    dropped = {k: v for k, v in stats.items() if k.startswith("dropped_") and v}
    if dropped:
        log.warning("%d of %d conversations give no sample (%s)", sum(dropped.values()), len(convs),
                    ", ".join(f"{k[8:]}: {v}" for k, v in dropped.items()))
    stats["dropped_no_target"] = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    return samples, {"samples": len(samples), **stats}


def make_rows(samples: list[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad_id: int):
    """(rows, collate): bfd-packed rows of ``seq_len`` or one padded row per sample."""
    from lmwright.data.packing import collate_packed, collate_padded, pack_bfd

    if packing:
        return pack_bfd(samples, seq_len, pad_id), collate_packed
    return [{"input_ids": i, "labels": lab} for i, lab in samples], partial(collate_padded, pad_id=pad_id)


@output_dtype_kept
def sft_loss(model, batch: dict) -> LossOutput:
    """Next-token loss on the labelled tokens (a sum over target tokens, as the engine expects)."""
    return causal_lm_loss(model, batch)


def exact_match(model, tokenizer, convs: list[list[dict]], max_new_tokens: int,
                precision: str = "no") -> tuple[float, list[str]]:
    """Share of conversations whose last assistant turn is reproduced exactly (greedy; the rule of
    ``lmwright.engine.metrics.exact_match``, which ``lmwright eval --task generation`` scores with too), and
    the answers. Generation runs under the training ``precision``'s autocast whatever the method: an adapter
    model's ``generate`` would otherwise skip the accelerator's autocast that a fully trained model's gets."""
    from lmwright.data.chat import render_prompt_ids
    from lmwright.engine import metrics
    from lmwright.engine.sampling import generate_batch
    from lmwright.utils.hardware import autocast_for

    if not convs:
        return float("nan"), []
    prompts = [render_prompt_ids(tokenizer, c[:-1], tools=getattr(c, "tools", None)) for c in convs]
    with autocast_for(precision, next(model.parameters()).device.type):
        generated = generate_batch(model, tokenizer, prompts, max_new_tokens)
    answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a, _ in generated]
    hits = sum(metrics.exact_match(a, c[-1]["content"]) for a, c in zip(answers, convs))
    return hits / len(convs), answers


def held_out(convs: list[list[dict]], n: int, seed: int) -> list[list[dict]]:
    """Up to ``n`` validation conversations that end with an assistant turn (fixed seeded choice)."""
    pool = [c for c in convs if c[-1]["role"] == "assistant"]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def pad_id_of(tokenizer) -> int:
    """The id rows are padded with: the pad token, or eos where there is none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def validation_metrics(cfg: Any, model, tokenizer, val_ds: list | None, collate,
                       em_convs: list[list[dict]], device) -> tuple[dict[str, float], list[str]]:
    """(``val_loss`` on ``val_ds`` and ``val_exact_match`` on ``em_convs``, as run.json reports them; the
    greedy answers). Either part is skipped when its data is empty. ``cfg``: an sft or upft config."""
    from lmwright.engine.loop import evaluate_loss

    out: dict[str, float] = {}
    if val_ds:
        out = evaluate_loss(model, sft_loss, val_ds, collate, cfg.train.micro_batch_size, device,
                            cfg.train.eval_max_batches)
    answers: list[str] = []
    if em_convs:
        out["val_exact_match"], answers = exact_match(model, tokenizer, em_convs, cfg.max_new_tokens,
                                                      choose_mixed_precision(cfg.train.mixed_precision, model))
    return out, answers


# ------------------------------------------------------------------------------------ model
def build_causal_model(cfg: Any, tokenizer, run_dir: Path):
    """The starting model (folder or preset) with the method applied, and the base folder it came from.

    A preset built from scratch has no folder: for methods that save only what they train, its initial
    weights are written to ``<run>/base`` so that ``final/`` can be loaded."""
    from lmwright.methods import apply_method, trains_all
    from lmwright.models import build_model
    from lmwright.models.attention import prepare_packed_training
    from lmwright.models.load import resolve_model_path

    model = build_model(cfg.model, task="causal-lm", tokenizer=tokenizer, seed=cfg.train.seed)
    prepare_packed_training(model)  # per-sample attention on packed rows; fused RMSNorm / SwiGLU (bf16 on a CPU)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {cfg.model.name} embeds only {n_embed}: "
                          f"use the model's own tokenizer (unset tokenizer=)")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if not trains_all(cfg.method):
            model.enable_input_require_grads()
    base_path = None if cfg.model.is_preset() else str(resolve_model_path(cfg.model.name).resolve())
    if base_path is None and not trains_all(cfg.method):
        model.save_pretrained(str(run_dir / "base"))
        base_path = str((run_dir / "base").resolve())
    model = apply_method(model, cfg.method, "causal-lm")
    hold_base_in_bf16(cfg, model)
    return model, base_path


def hold_base_in_bf16(cfg: Any, model) -> None:
    """An adapter method (final/ holds only what trains; the base comes from its folder) training under bf16
    autocast with ``model.dtype: auto`` keeps its frozen base in bf16 (``models.frozen``): the same matmuls,
    no per-step casts, half the base's memory."""
    import torch

    from lmwright.methods import trains_all
    from lmwright.methods.base import get_method
    from lmwright.models.frozen import hold_frozen_in

    if trains_all(cfg.method) or not get_method(cfg.method.name).param_markers or cfg.model.dtype != "auto" \
            or cfg.model.quantize != "none" or choose_mixed_precision(cfg.train.mixed_precision, model) != "bf16":
        return
    saved = hold_frozen_in(model, torch.bfloat16)
    log.info("frozen base held in bf16 for bf16 training (%.0f MB less; model.dtype=float32 keeps it fp32)",
             saved / 2**20)
