"""``perplexity``: exp(mean next-token loss) of a causal LM on a text set, packed like pretraining.

Documents are tokenised and packed by ``lmwright.data.packing`` (rows of ``seq_len``, per-document
positions, no attention across documents) and scored by ``lmwright.objectives.base.causal_lm_loss``,
so the number is the one the pretraining stage reports as ``val_loss``, not a re-implementation.
"""

from __future__ import annotations

import math
from typing import Any

from lmwright.eval import EVAL_TASKS, batches


@EVAL_TASKS.register("perplexity")
class Perplexity:
    name = "perplexity"
    formats = ("text", "alpaca", "messages", "classification", "preference", "pairs")
    model_task = "causal-lm"

    def run(self, model: Any, tokenizer: Any, records: list[dict], seq_len: int | None = None,
            batch_size: int = 8, fmt: str = "text", **_: Any) -> dict[str, Any]:
        import torch

        from lmwright.data import FORMATS
        from lmwright.data.packing import collate_packed, pack_concat, tokenize_documents
        from lmwright.objectives.base import causal_lm_loss

        text_of = FORMATS.get(fmt).text_of
        docs = tokenize_documents(tokenizer, [text_of(r) for r in records])
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
        seq_len = min(seq_len or 512, limit)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = pack_concat(docs, seq_len, drop_last=False, pad_id=pad)
        total, n = 0.0, 0
        model.eval()
        with torch.no_grad():
            for chunk in batches(rows, batch_size):
                out = causal_lm_loss(model, collate_packed(chunk))
                total += float(out.loss_sum)
                n += int(out.n_targets)
        loss = total / max(n, 1)
        return {"loss": loss, "perplexity": math.exp(loss) if n else float("nan"), "tokens": n,
                "documents": len(docs), "seq_len": seq_len}

