"""Sentence vectors, once: the pooling function and the pooling a model folder was trained with.

A contrastive run records its ``contrastive.pooling`` in ``lmwright.json`` (``pooling``); a
sentence-transformers folder says it in ``1_Pooling/config.json``. Every path that embeds text (the
contrastive objective's loss and evaluation, ``lmwright embed``, ``lmwright.load(...).embed`` and so
``/v1/embeddings``, ``lmwright eval --task retrieval``) pools with :func:`pool` as :func:`read_pooling`
says, so a model trained on its first (CLS) token is not served or evaluated on the mean of its tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError
from lmwright.models.meta import read_meta

POOLINGS = ("mean", "cls")


def pool(hidden: Any, attention_mask: Any, pooling: str) -> Any:
    """(N, T, D) hidden states -> (N, D) sentence vectors: the mean over real tokens (``attention_mask``
    1), or the first real token's state (``cls``; the first column for right-padded batches)."""
    if pooling == "cls":
        import torch

        first = attention_mask.long().argmax(dim=1)  # (N,) first real token, whatever the padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if pooling != "mean":
        raise ConfigError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_vectors(model: Any, input_ids: Any, attention_mask: Any, pooling: str = "mean") -> Any:
    """(N, D) L2-normalised float sentence vectors from ``model``'s last hidden states (a bare encoder's
    ``last_hidden_state``; the last of ``hidden_states`` for models with a head, e.g. causal LMs)."""
    import torch.nn.functional as F

    hidden = None
    if not _has_head(model):  # no output_hidden_states: it would keep every layer's (N, T, D) states alive
        hidden = getattr(model(input_ids=input_ids, attention_mask=attention_mask), "last_hidden_state", None)
    if hidden is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (N, T, D)
    return F.normalize(pool(hidden, attention_mask, pooling).float(), dim=-1)


def _has_head(model: Any) -> bool:
    """A transformers model with a task head (``...ForCausalLM``, ``GPT2LMHeadModel``, ...), under a peft
    wrapper or not: its output has no ``last_hidden_state``."""
    from lmwright.models.introspect import unwrap

    name = type(unwrap(model)).__name__
    return "For" in name or name.endswith("LMHeadModel")


def read_pooling(folder: str | Path) -> str:
    """The pooling the model in ``folder`` (a resolved model folder) was trained with: ``lmwright.json``'s
    ``pooling``, else a sentence-transformers ``1_Pooling/config.json``, else ``mean``."""
    pooling = read_meta(folder).get("pooling")
    if pooling is None:
        f = Path(folder) / "1_Pooling" / "config.json"
        pooling = "cls" if f.is_file() and json.loads(f.read_text()).get("pooling_mode_cls_token") else "mean"
    if pooling not in POOLINGS:
        raise ConfigError(f"{Path(folder) / 'lmwright.json'}: pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
    return str(pooling)
