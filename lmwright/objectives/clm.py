"""``clm``: causal language modelling (next-token prediction) on packed rows."""

from __future__ import annotations

import math
from typing import Any

from lmwright.config import ConfigError
from lmwright.models.presets import CAUSAL_MODEL_TYPES
from lmwright.objectives.base import PRETRAIN_OBJECTIVES, LossOutput, causal_lm_loss


@PRETRAIN_OBJECTIVES.register("clm")
class CausalLM:
    name = "clm"
    task = "causal-lm"
    families = set(CAUSAL_MODEL_TYPES)

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def check(self, family: str | None, tokenizer) -> None:
        if family is not None and family not in self.families:
            raise ConfigError(f"objective=clm needs a decoder-only model (llama or gpt2 presets, or a local causal "
                              f"LM folder), got a {family} model: change model.name or the objective")
        if tokenizer.eos_token_id is None:
            raise ConfigError("objective=clm needs a tokenizer with an eos token to separate documents")

    def build_dataset(self, texts: list[str], tokenizer, seq_len: int, packing: bool = True) -> list[dict]:
        from lmwright.data.packing import pack_concat, tokenize_documents

        docs = tokenize_documents(tokenizer, texts, add_eos=True)
        if packing:
            return pack_concat(docs, seq_len, drop_last=False, pad_id=tokenizer.pad_token_id or 0)
        return [{"input_ids": d[:seq_len], "labels": d[:seq_len]} for d in docs if len(d) > 1]

    def collate(self, tokenizer, packing: bool = True):
        from functools import partial

        from lmwright.data.packing import collate_packed, collate_padded

        return collate_packed if packing else partial(collate_padded, pad_id=tokenizer.pad_token_id or 0)

    def loss(self, model, batch: dict) -> LossOutput:
        return causal_lm_loss(model, batch)

    def metrics_from_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        if "val_loss" in metrics:
            return {"val_ppl": math.exp(min(metrics["val_loss"], 50.0))}
        return {}
