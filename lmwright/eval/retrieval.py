"""``retrieval``: recall@k and MRR of an embedding model on ``pairs`` records.

Each anchor is a query; the corpus is every distinct positive and hard negative of the set; the
relevant document of a query is its own positive. Embeddings are the last hidden states pooled as the
model was trained (``pooling``: what :func:`lmwright.eval.evaluate` reads from the folder with
``lmwright.models.pooling.read_pooling``; mean or first token), L2-normalised (cosine similarity).
"""

from __future__ import annotations

from typing import Any

from lmwright.eval import EVAL_TASKS, batches

KS = (1, 5, 10)


def retrieval_metrics(sim: Any, relevant: list[int], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``sim`` (Q, D) similarities, ``relevant[q]`` the index of query q's document.

    A document's rank counts the documents scored strictly higher, so ties are resolved in the
    query's favour only when nothing beats its document.
    """
    import numpy as np

    sim = np.asarray(sim, dtype=np.float64)
    ranks = np.array([(sim[q] > sim[q, d]).sum() for q, d in enumerate(relevant)])  # 0 = first
    out = {f"recall@{k}": float((ranks < k).mean()) for k in ks}
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    out["queries"] = len(relevant)
    out["corpus"] = int(sim.shape[1])
    return out


def embed(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 256,
          pooling: str = "mean") -> Any:
    """(N, D) normalised vectors of ``texts`` (numpy), pooled with ``pooling``."""
    import torch

    from lmwright.models.pooling import sentence_vectors

    out = []
    model.eval()
    with torch.no_grad():
        for chunk in batches(texts, batch_size):
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(sentence_vectors(model, enc["input_ids"], enc["attention_mask"], pooling))  # (B, D)
    return torch.cat(out).numpy()


@EVAL_TASKS.register("retrieval")
class Retrieval:
    name = "retrieval"
    formats = ("pairs",)
    model_task = None

    def run(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32, pooling: str = "mean",
            **_: Any) -> dict[str, Any]:
        corpus: list[str] = []
        index: dict[str, int] = {}
        for r in records:
            for t in (r["positive"], r.get("negative")):
                if t and t not in index:
                    index[t] = len(corpus)
                    corpus.append(t)
        q = embed(model, tokenizer, [r["anchor"] for r in records], batch_size, pooling=pooling)
        d = embed(model, tokenizer, corpus, batch_size, pooling=pooling)
        return retrieval_metrics(q @ d.T, [index[r["positive"]] for r in records])
