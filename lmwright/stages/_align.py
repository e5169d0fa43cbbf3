"""Glue shared by the alignment stages (reward, dpo, ppo, grpo, distill): records -> chat-template token
ids, padding, the policy and its frozen reference, a reward model as a scoring function, batched sampling
and per-token log-probs of completions. Losses are not here: they live in ``lmwright.objectives``.

The chat template stored in the tokenizer is the single source of truth: a prompt is rendered with
``render_prompt_ids`` (what the server feeds) and a prompt + reply with ``render_training_ids``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmwright.config import ConfigError
from lmwright.data.packing import pad_batch
from lmwright.objectives.base import IGNORE_INDEX

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------ records
def as_messages(value: str | Messages, role: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def prompt_and_reference(record: dict, fmt: str) -> tuple[Messages, str | None]:
    """(prompt messages, reference answer or None) of a canonical record of ``fmt``.

    alpaca: user = instruction (+ newline + input), reference = output; messages: everything before the last
    assistant turn, reference = that turn; preference: prompt, reference = chosen; text: user = text.
    """
    if fmt == "alpaca":  # the conversation SFT trains on (one home: alpaca_to_messages), minus the answer
        from lmwright.data.chat import alpaca_to_messages

        return alpaca_to_messages({**record, "output": ""}), record["output"]
    if fmt == "messages":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    if fmt == "preference":
        chosen = record["chosen"]
        ref = chosen if isinstance(chosen, str) else chosen[-1]["content"]
        return as_messages(record["prompt"], "user"), ref
    if fmt == "text":
        return [{"role": "user", "content": record["text"]}], None
    raise ConfigError(f"data.format={fmt} cannot give prompts; use alpaca, messages, preference or text")


def encode_reply(tokenizer, prompt: Messages, reply: str | Messages, max_prompt_tokens: int,
                 max_length: int) -> dict[str, list[int]] | None:
    """``input_ids``/``labels`` of prompt + reply (labels only on the reply's assistant tokens), or None when
    the prompt alone exceeds ``max_prompt_tokens`` (the caller counts the skip). The reply is truncated to
    fit ``max_length``."""
    from lmwright.data.chat import render_prompt_ids, render_training_ids

    n_prompt = len(render_prompt_ids(tokenizer, prompt))
    if n_prompt > max_prompt_tokens:
        return None
    ids, labels = render_training_ids(tokenizer, prompt + as_messages(reply, "assistant"), train_on="assistant")
    labels = [IGNORE_INDEX] * n_prompt + labels[n_prompt:]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def encode_pairs(records: list[dict], tokenizer, cfg) -> tuple[list[dict], int]:
    """Chosen and rejected replies rendered with the chat template (the reward and dpo stages' pairs); returns
    (items, skipped-too-long). ``cfg`` has max_prompt_tokens, max_length and skip_long."""
    items, skipped = [], 0
    for i, r in enumerate(records):
        prompt = as_messages(r["prompt"], "user")
        c = encode_reply(tokenizer, prompt, r["chosen"], cfg.max_prompt_tokens, cfg.max_length)
        j = encode_reply(tokenizer, prompt, r["rejected"], cfg.max_prompt_tokens, cfg.max_length)
        if c is None or j is None:
            if not cfg.skip_long:
                raise ConfigError(f"record {i}: the prompt is longer than max_prompt_tokens={cfg.max_prompt_tokens}; "
                                  "raise it or set skip_long=true")
            skipped += 1
            continue
        if c["input_ids"] == j["input_ids"]:  # identical after truncation: nothing to learn
            skipped += 1
            continue
        items.append({"chosen": c, "rejected": j})
    return items, skipped


def collate_lm(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids / labels / attention_mask (``data.packing.collate_padded``) and the
    count of real tokens."""
    from lmwright.data.packing import collate_padded

    out = collate_padded(items, pad_id, label_pad=IGNORE_INDEX)
    out["num_tokens"] = out["attention_mask"].sum()
    return out


def collate_pairs(items: list[dict], pad_id: int, keys: tuple[str, str] = ("chosen", "rejected")
                  ) -> dict[str, torch.Tensor]:
    """``keys[0]`` rows first, then ``keys[1]`` rows: one (2B, T) forward scores both. Float fields of the
    items (e.g. precomputed reference log-probs) become (B,) tensors."""
    out = collate_lm([it[keys[0]] for it in items] + [it[keys[1]] for it in items], pad_id)
    for k, v in items[0].items():
        if isinstance(v, float):
            out[k] = torch.tensor([it[k] for it in items], dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------------ models
def same_tokenizer(a, b) -> str | None:
    """None when two tokenizers encode identically (vocabulary, specials, chat template), else why not."""
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        return f"the vocabularies differ ({len(a)} vs {len(b)} tokens)"
    for attr in ("bos_token", "eos_token", "pad_token"):
        if getattr(a, attr) != getattr(b, attr):
            return f"{attr} differs ({getattr(a, attr)!r} vs {getattr(b, attr)!r})"
    if (a.chat_template or "") != (b.chat_template or ""):
        return "the chat templates differ"
    return None


def base_path_of(model_cfg, merged_base: Path | None = None) -> str | None:
    """The folder a trained method's weights apply to: the model folder, or ``merged_base`` where
    :func:`load_policy` wrote the start (an adapter run folded into its base) because no folder holds it."""
    if merged_base is not None and (merged_base / "config.json").exists():
        return str(merged_base.resolve())
    if model_cfg.is_preset():
        return None
    from lmwright.models.load import resolve_model_path

    return str(resolve_model_path(model_cfg.name).resolve())


def is_adapter_folder(path: str | Path) -> bool:
    from lmwright.models.load import resolve_model_path

    p = resolve_model_path(path)
    return (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def load_policy(model_cfg, method_cfg, tokenizer, seed: int, merged_base: Path | None = None):
    """The causal LM to train, with its method applied.

    Starting from an adapter run (e.g. an SFT LoRA run), the adapter is folded into its base first. If a
    new adapter-like method is then applied, its base (that merged model) exists in no folder: it is saved
    to ``merged_base`` (pass it, e.g. ``<run>/base``; :func:`base_path_of` then points at it) so that the
    new adapter can be loaded later."""
    from lmwright.methods import apply_method, trains_all
    from lmwright.models import build_model

    if not model_cfg.is_preset() and is_adapter_folder(model_cfg.name):
        from lmwright.methods import load_trained

        model, _ = load_trained(model_cfg.name, task="causal-lm")
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        model.train()
        if not trains_all(method_cfg):
            if merged_base is not None:
                model.save_pretrained(str(merged_base), safe_serialization=True)
                tokenizer.save_pretrained(str(merged_base))
            else:
                from lmwright.utils.logging import get_logger

                get_logger("lmwright.align").warning(
                    "model.name=%s is an adapter run and method.name=%s: the new adapter's base (the merged start) "
                    "is not saved, so final/ will not load on its own", model_cfg.name, method_cfg.name)
    else:
        model = build_model(model_cfg, task="causal-lm", tokenizer=tokenizer, seed=seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_method(model, method_cfg, "causal-lm")


def disable_dropout(model) -> None:
    """Dropout off in the policy (as trl's ``disable_dropout``): a reference computed in eval mode must equal
    the policy's training forward at the start, so the implicit rewards start at exactly 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class Reference:
    """The frozen starting policy. With a peft adapter it is the same model with the adapter disabled (no
    second copy in memory); otherwise a frozen copy, made only if ``keep_copy`` (call before training)."""

    def __init__(self, policy, keep_copy: bool):
        self.policy = policy
        self.peft = hasattr(policy, "disable_adapter")
        self.copy = None
        if keep_copy and not self.peft:
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Any]:
        if self.peft:
            with self.policy.disable_adapter():
                yield self.policy
        elif self.copy is not None:
            self.copy.to(next(self.policy.parameters()).device)
            yield self.copy
        else:  # only valid before the first optimizer step (precomputed reference log-probs)
            yield self.policy


class RewardModel:
    """A ``reward`` run (or folder) as a reward function: ``score(prompts, replies) -> (B,)`` rewards."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from lmwright.methods import load_trained

        self.model, self.tokenizer = load_trained(path, task="reward")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def score(self, prompts: list[Messages], replies: list[str], batch_size: int = 16) -> torch.Tensor:
        from lmwright.data.chat import render_training_ids

        out = []
        for s in range(0, len(prompts), batch_size):
            ids = [render_training_ids(self.tokenizer, p + as_messages(r, "assistant"))[0]
                   for p, r in zip(prompts[s:s + batch_size], replies[s:s + batch_size])]
            x, mask = pad_batch(ids, self.tokenizer.pad_token_id)
            out.append(self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device)).logits[:, 0].float().cpu())  # (b,)
        return torch.cat(out)


def reward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) scalar rewards of a sequence-classification model with one label (the last real token's score)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def autocast_for(train_cfg, device: str, model):
    """The autocast the engine trains ``model`` under (``train.mixed_precision``), so that rollout / reference
    log-probs computed outside the engine use the same precision as the training forward."""
    from lmwright.utils import hardware

    return hardware.autocast_for(hardware.choose_mixed_precision(train_cfg.mixed_precision, model), device)


# ------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
           top_k: int = 0, top_p: float = 1.0) -> dict[str, torch.Tensor]:
    """Sample one completion per prompt (left-padded batch). Returns ``input_ids`` (B, P+N), ``attention_mask``
    (B, P+N) and ``completion_mask`` (B, N): 1 on generated tokens up to and including the stop token."""
    from lmwright.data.chat import stop_token_ids

    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    x, attn = pad_batch(prompts, tokenizer.pad_token_id, side="left")  # (B, P) each
    x, attn = x.to(device), attn.to(device)
    was_training = model.training
    model.eval()
    greedy = temperature <= 0
    # every sampling option explicit: None would fall back to the folder's generation_config (e.g. top_p=0.95),
    # and the log-probs used for training must be those of the distribution actually sampled
    seq = model.generate(input_ids=x, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         temperature=1.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)  # (B, P+N)
    model.train(was_training)
    comp = seq[:, x.shape[1]:]  # (B, N)
    is_stop = torch.zeros_like(comp, dtype=torch.bool)
    for s in stops:
        is_stop |= comp == s
    # tokens after the first stop token are padding: keep positions whose count of earlier stops is 0
    before = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    cmask = before.long()
    return {"input_ids": seq, "attention_mask": torch.cat([attn, cmask], dim=1), "completion_mask": cmask,
            "prompt_len": torch.tensor(x.shape[1])}


def completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                        hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, N) of the completion tokens of a :func:`sample` batch under ``model`` at the
    sampling temperature, the completion logits (B, N, V) and, if ``hidden``, the last hidden states that
    predict each completion token (B, N, H) (the state before the token: what a value head reads)."""
    seq, attn = batch["input_ids"], batch["attention_mask"]
    P = int(batch["prompt_len"])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    out = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, P - 1:-1].float() / max(temperature, 1e-6)  # (B, N, V)
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)  # (B, N)
    h = out.hidden_states[-1][:, P - 1:-1] if hidden else None  # (B, N, H)
    return logp, logits, h


def decode_completions(tokenizer, batch: dict[str, torch.Tensor]) -> list[str]:
    P = int(batch["prompt_len"])
    comp = batch["input_ids"][:, P:] * batch["completion_mask"]
    return [tokenizer.decode([t for t, m in zip(row.tolist(), mrow.tolist()) if m], skip_special_tokens=True).strip()
            for row, mrow in zip(comp, batch["completion_mask"])]


def index_batch(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """Rows ``idx`` of every (B, ...) tensor of a rollout batch (0-dim tensors and lists pass through)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = v[idx]
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out
