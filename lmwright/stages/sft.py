"""``lmwright train sft``: instruction and chat fine-tuning of a causal LM, with any method.

Read top to bottom: config -> tokenizer -> conversations (alpaca records become messages) -> token
ids and loss masks from the tokenizer's chat template -> packed (bfd) or padded rows -> model +
method -> exact match before -> engine.train -> final/ -> exact match after + sample answers -> report.

The helpers ``conversations``, ``encode``, ``make_rows``, ``sft_loss`` and ``generate`` are the SFT data
path; ``upft`` reuses them on self-sampled responses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.introspect import model_type
from lmwright.models.presets import CAUSAL_MODEL_TYPES, ModelConfig
from lmwright.objectives.base import IGNORE_INDEX, LossOutput, token_cross_entropy
from lmwright.stages.common import STAGES, flops_per_token, resolve_tokenizer, save_final
from lmwright.utils.hardware import choose_mixed_precision
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.sft")

CAUSAL_FAMILIES = CAUSAL_MODEL_TYPES


@dataclass
class SFTConfig:
    stage: str = opt("sft", "stage id (lets `lmwright validate` know what the file configures)")
    model: ModelConfig = opt(ModelConfig(), "starting model: a local folder or run (typical), or a preset + tokenizer")
    tokenizer: str | None = opt(None, "tokenizer folder; default: the model folder's (or its run's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="alpaca", val_fraction=0.1), "alpaca or messages records")
    train: TrainConfig = opt(TrainConfig(lr=2e-4, eval_every=50), "the training loop")
    seq_len: int = opt(512, "tokens per row; longer conversations are truncated (and counted in run.json)")
    packing: bool | None = opt(None, "pack conversations into full rows (best-fit decreasing, no attention across "
                                     "them); default: on, off for prefix/ptuning/prompt (their virtual tokens "
                                     "cannot be packed)")
    train_on: Literal["assistant", "last", "all"] = opt(
        "assistant", "tokens with loss: every assistant turn, only the last one, or every token")
    system_prompt: str | None = opt(None, "system message added to conversations that have none")
    eval_generate: int = opt(32, "held-out prompts answered greedily for exact match at each evaluation (0 = off)")
    max_new_tokens: int = opt(64, "answer length cap for exact match and samples")
    samples: int = opt(4, "sample answers (before/after) shown in the report")

    def check(self) -> None:
        if self.seq_len < 16:
            raise ConfigError(f"seq_len = {self.seq_len} is too short for a conversation; use at least 16")
        if self.eval_generate < 0 or self.max_new_tokens < 1:
            raise ConfigError("eval_generate must be >= 0 and max_new_tokens >= 1")


# ------------------------------------------------------------------------------------ validation
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


def check(cfg: SFTConfig) -> dict[str, Any]:
    """Everything that can be verified before training (used by `lmwright validate`)."""
    if cfg.data.format not in ("alpaca", "messages", "kto"):
        raise ConfigError(f"data.format={cfg.data.format}: sft trains on conversations; set data.format=alpaca, "
                          f"data.format=messages (also sharegpt and tool-call data) or data.format=kto (its "
                          f"desirable replies)")
    return check_causal(cfg, "sft")


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


def sft_loss(model, batch: dict) -> LossOutput:
    """Next-token loss on the labelled tokens (a sum over target tokens, as the engine expects)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    out = model(**kwargs)
    T = batch["labels"].shape[1]
    logits = out.logits[:, -T:]  # prompt/ptuning prepend virtual tokens: (B, P+T, V) -> (B, T, V)
    loss_sum, n = token_cross_entropy(logits, batch["labels"], shift=True)
    return LossOutput(loss_sum=loss_sum, n_targets=n)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 16, seed: int = 0) -> list[tuple[list[int], bool]]:
    """(new token ids without the stop token, finished) per prompt; left-padded batches, greedy at 0."""
    import torch

    from lmwright.data.chat import stop_token_ids

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    from lmwright.methods.peft_methods import generate_uncached, is_prompt_learning

    if is_prompt_learning(model):  # peft's cached generate disagrees with their forward: see generate_uncached
        out = generate_uncached(model, prompts, max_new_tokens, stops, temperature)
        model.train(was_training)
        return out
    out: list[tuple[list[int], bool]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **sampling)
        for row in gen[:, T:].tolist():
            end = next((j for j, t in enumerate(row) if t in stops), None)
            out.append((row[:end] if end is not None else row, end is not None))
    model.train(was_training)
    return out


def exact_match(model, tokenizer, convs: list[list[dict]], max_new_tokens: int,
                precision: str = "no") -> tuple[float, list[str]]:
    """Share of conversations whose last assistant turn is reproduced exactly (greedy; the rule of
    ``lmwright.engine.metrics.exact_match``, which ``lmwright eval --task generation`` scores with too), and
    the answers. Generation runs under the training ``precision``'s autocast whatever the method: an adapter
    model's ``generate`` would otherwise skip the accelerator's autocast that a fully trained model's gets."""
    from lmwright.data.chat import render_prompt_ids
    from lmwright.engine import metrics
    from lmwright.utils.hardware import autocast_for

    if not convs:
        return float("nan"), []
    prompts = [render_prompt_ids(tokenizer, c[:-1], tools=getattr(c, "tools", None)) for c in convs]
    with autocast_for(precision, next(model.parameters()).device.type):
        generated = generate(model, tokenizer, prompts, max_new_tokens)
    answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a, _ in generated]
    hits = sum(metrics.exact_match(a, c[-1]["content"]) for a, c in zip(answers, convs))
    return hits / len(convs), answers


def held_out(convs: list[list[dict]], n: int, seed: int) -> list[list[dict]]:
    """Up to ``n`` validation conversations that end with an assistant turn (fixed seeded choice)."""
    pool = [c for c in convs if c[-1]["role"] == "assistant"]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def validation_data(cfg: SFTConfig, tokenizer, val_recs: list[dict] | None = None):
    """(validation rows or None, their collate, held-out exact-match conversations): what the stage's
    ``val_loss`` and ``val_exact_match`` are measured on. ``val_recs`` default to the validation split of
    ``cfg.data``; ``lmwright eval`` calls this too."""
    if val_recs is None:
        from lmwright.data import load_records

        val_recs = load_records(cfg.data)[1]
    val_convs = conversations(val_recs, cfg.data.format, cfg.system_prompt)
    val_samples, _ = encode(tokenizer, val_convs, cfg.train_on, cfg.seq_len)
    rows, collate = make_rows(val_samples, cfg.seq_len, use_packing(cfg), _pad_id(tokenizer))
    return rows or None, collate, held_out(val_convs, cfg.eval_generate, cfg.data.split_seed)


def validation_metrics(cfg: SFTConfig, model, tokenizer, val_ds: list | None, collate,
                       em_convs: list[list[dict]], device) -> tuple[dict[str, float], list[str]]:
    """(``val_loss`` on ``val_ds`` and ``val_exact_match`` on ``em_convs``, as run.json reports them; the
    greedy answers). Either part is skipped when its data is empty."""
    from lmwright.engine.loop import evaluate_loss

    out: dict[str, float] = {}
    if val_ds:
        out = evaluate_loss(model, sft_loss, val_ds, collate, cfg.train.micro_batch_size, device,
                            cfg.train.eval_max_batches)
    answers: list[str] = []
    if em_convs:
        out["val_exact_match"], answers = exact_match(model, tokenizer, em_convs, cfg.max_new_tokens,
                                                      choose_mixed_precision(cfg.train.mixed_precision))
    return out, answers


def build_causal_model(cfg: Any, tokenizer, run_dir: Path):
    """The starting model (folder or preset) with the method applied, and the base folder it came from.

    A preset built from scratch has no folder: for methods that save only what they train, its initial
    weights are written to ``<run>/base`` so that ``final/`` can be loaded."""
    from lmwright.methods import apply_method, trains_all
    from lmwright.models import build_model
    from lmwright.models.load import resolve_model_path

    model = build_model(cfg.model, task="causal-lm", tokenizer=tokenizer, seed=cfg.train.seed)
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
    return apply_method(model, cfg.method, "causal-lm"), base_path


# ------------------------------------------------------------------------------------ the stage
def run(cfg: SFTConfig) -> Path:
    import torch

    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.methods import trainable_report

    tokenizer = check(cfg)["tokenizer"]
    packing = use_packing(cfg)

    # data: records -> conversations -> (ids, labels) -> rows
    train_recs, val_recs, manifest = load_records(cfg.data)
    train_convs = conversations(train_recs, cfg.data.format, cfg.system_prompt)
    train_samples, train_stats = encode(tokenizer, train_convs, cfg.train_on, cfg.seq_len)
    train_ds, collate = make_rows(train_samples, cfg.seq_len, packing, _pad_id(tokenizer))
    val_ds, _, em_convs = validation_data(cfg, tokenizer, val_recs)
    log.info("data: %d conversations -> %d %s rows (%d truncated to %d tokens); %d validation rows, %d for "
             "exact match", len(train_convs), len(train_ds), "packed" if packing else "padded",
             train_stats["truncated"], cfg.seq_len, len(val_ds or []), len(em_convs))

    # model + method
    run_ = Run.start(cfg, "sft", manifest)
    model, base_path = build_causal_model(cfg, tokenizer, run_.dir)
    params = trainable_report(model)
    run_.write_info(model=cfg.model.name, base=base_path, method=cfg.method.name, quantize=cfg.model.quantize,
                    trainable=params["trainable"], total_parameters=params["total"],
                    trainable_pct=params["trainable_pct"], packing=packing, data=train_stats,
                    data_counts=manifest.get("counts"),
                    train_rows=len(train_ds), val_rows=len(val_ds or []))
    tokenizer.save_pretrained(str(run_.dir / "tokenizer"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    before, answers_before = validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)
    log.info("before training: %s", before)

    def evaluate(m) -> dict[str, float]:
        return {"val_exact_match": exact_match(m, tokenizer, em_convs, cfg.max_new_tokens,
                                               choose_mixed_precision(cfg.train.mixed_precision))[0]} if em_convs else {}

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "causal-lm", method_cfg=cfg.method, base_path=base_path)

    result = train(model, train_ds, collate, sft_loss, cfg.train, run_, val_data=val_ds,
                   evaluate=evaluate if em_convs else None, save_model=save_model,
                   flops_per_token=flops_per_token(model, cfg.seq_len))
    if result.interrupted:
        return run_.dir
    after, answers_after = validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)
    save_final(model, tokenizer, run_.final, "causal-lm", extra={"stage": "sft", "train_on": cfg.train_on},
               method_cfg=cfg.method, base_path=base_path)

    # report
    samples = [{"prompt": c[-2]["content"], "reference": c[-1]["content"], "before": b, "after": a}
               for c, b, a in list(zip(em_convs, answers_before, answers_after))[:cfg.samples]]
    tokens_per_s = result.tokens_seen / max(result.train_seconds, 1e-9)
    run_.write_info(before=before, after=after, samples=samples, tokens_per_s=tokens_per_s)
    summary: dict[str, Any] = {"model": cfg.model.name, "method": cfg.method.name,
                               "trainable %": round(params["trainable_pct"], 3), "steps": result.step,
                               "train_seconds": round(result.train_seconds, 1), "tokens/s": round(tokens_per_s)}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    sections = [("Sample answers (greedy)", table(samples))] if samples else []
    write_report(run_.dir, f"lmwright sft ({cfg.method.name}) - {run_.dir.name}", sections, summary)
    log.info("after training: %s", after)
    return run_.dir


class _Stage:
    name = "sft"
    Config = SFTConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("sft", _Stage)
