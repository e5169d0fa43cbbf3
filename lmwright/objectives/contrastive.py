"""``contrastive``: sentence embeddings trained with InfoNCE (in-batch negatives).

Data (the stage passes *records*, not texts):

- ``pairs`` records ``{anchor, positive, negative?, score?}``: each anchor must pick its positive
  among the batch's positives (and every hard ``negative`` of the batch);
- ``text`` records: unsupervised SimCSE, the same sentence twice; dropout makes the two views
  differ (so keep the model's dropout > 0).

The model is an encoder loaded as ``AutoModel`` (a preset such as bert-tiny from scratch, or a
pretrained folder such as all-MiniLM-L6-v2, ``model.name=<folder>``), pooled by attention-masked
mean or the first (CLS) token, then L2-normalised: similarities are cosines over ``temperature``.

Evaluation on held-out pairs: retrieval ``val_recall@1``, ``val_recall@5`` and ``val_mrr`` (each
anchor ranks all held-out positives and hard negatives) and ``val_spearman`` between the cosine and
``score`` where pairs have one. ``final/`` is a Hugging Face ``AutoModel`` folder *and* a
sentence-transformers folder (``modules.json``, ``1_Pooling/``, ``sentence_bert_config.json``)::

    SentenceTransformer("runs/x/final").encode(["a sentence"])
    # or, plain transformers:
    model, tok = AutoModel.from_pretrained(p), AutoTokenizer.from_pretrained(p)
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    h = model(**enc).last_hidden_state                                   # (B, T, D)
    m = enc["attention_mask"].unsqueeze(-1).float()                      # (B, T, 1)
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # mean pooling

Note for DDP: negatives are in-batch per process (no all-gather), so the loss of ``micro x N``
processes is not that of one process with ``N x micro`` rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmwright.config import ConfigError, opt
from lmwright.data.packing import pad_batch
from lmwright.models.pooling import pool, sentence_vectors  # noqa: F401 (pool: re-exported)
from lmwright.objectives.base import PRETRAIN_OBJECTIVES, LossOutput

ENCODER_FAMILIES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet",
                    "modernbert", "albert", "camembert"}


@dataclass
class ContrastiveConfig:
    temperature: float = opt(0.05, "softmax temperature of the cosine similarities")
    symmetric: bool = opt(False, "also make each positive pick its anchor (loss averaged over both directions)")
    pooling: Literal["mean", "cls"] = opt("mean", "sentence vector: attention-masked mean of tokens, or the first token")
    hard_negatives: bool = opt(True, "use the `negative` of pairs records as extra candidates")
    eval_max_pairs: int = opt(1000, "held-out pairs used for retrieval / Spearman evaluation")

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"contrastive.temperature = {self.temperature} must be > 0, e.g. 0.05")


@PRETRAIN_OBJECTIVES.register("contrastive")
class Contrastive:
    name = "contrastive"
    task = "embedding"
    input = "records"  # the stage passes canonical records, not texts
    formats = {"pairs", "text"}

    def __init__(self, cfg: ContrastiveConfig | None = None):
        self.cfg = cfg or ContrastiveConfig()

    def check(self, family: str | None, tokenizer) -> None:
        if family is not None and family not in ENCODER_FAMILIES:
            raise ConfigError(f"objective=contrastive needs an encoder (bert-tiny/bert-small presets, or a local "
                              f"sentence encoder such as all-MiniLM-L6-v2), got a {family} model: change model.name")
        if tokenizer.pad_token_id is None:
            raise ConfigError("objective=contrastive needs a tokenizer with a pad token to batch sentences")

    # ------------------------------------------------------------------------------------- data
    def build_dataset(self, records: list[dict], tokenizer, seq_len: int, packing: bool = True) -> list[dict]:
        rows = []
        for i, r in enumerate(records):
            if "anchor" in r:
                a, p = r["anchor"], r["positive"]
                neg = r.get("negative") if self.cfg.hard_negatives else None
            elif r.get("text"):
                a, p, neg = r["text"], r["text"], None  # SimCSE: dropout makes the two views
            else:
                raise ConfigError(f"objective=contrastive: record {i} has neither anchor/positive nor text; use "
                                  f"data.format=pairs or data.format=text")
            if not a.strip() or not p.strip():
                raise ConfigError(f"objective=contrastive: record {i} has an empty anchor or positive; fix or "
                                  f"drop it")
            enc = tokenizer([a, p] + ([neg] if neg else []), truncation=True, max_length=seq_len)["input_ids"]
            rows.append({"anchor": enc[0], "positive": enc[1], "negative": enc[2] if neg else None,
                         "score": r.get("score")})
        return rows

    def collate(self, tokenizer, packing: bool = True):
        return PairCollator(tokenizer.pad_token_id)

    def prepare_model(self, model):
        """Freeze the unused pooler head (BertModel's tanh pooler): DDP fails on unused trainable params."""
        for n, p in model.named_parameters():
            if n.startswith("pooler.") or ".pooler." in n:
                p.requires_grad_(False)
        return model

    # ------------------------------------------------------------------------------------- loss
    def loss(self, model, batch: dict) -> LossOutput:
        emb = encode(model, batch["input_ids"], batch["attention_mask"], self.cfg.pooling)  # (N, D)
        b = batch["n_anchor"]
        a, p, n = emb[:b], emb[b:2 * b], emb[2 * b:]  # (B, D), (B, D), (Bn, D)
        return info_nce(a, p, n, self.cfg.temperature, self.cfg.symmetric)

    def metrics_from_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def extra_eval(self, model, val_ds, tokenizer) -> dict[str, float]:
        rows = list(val_ds[:self.cfg.eval_max_pairs]) if val_ds else []
        if not rows or all(r["anchor"] == r["positive"] for r in rows):
            return {}  # SimCSE text rows: retrieval of the identical sentence says nothing
        return retrieval_metrics(model, rows, tokenizer.pad_token_id, self.cfg.pooling)

    def model_meta(self) -> dict[str, Any]:
        """What ``lmwright.json`` records beside the model (final/ and checkpoints): the pooling it trained
        with, which every embedding path reads back (``lmwright.models.pooling.read_pooling``)."""
        return {"pooling": self.cfg.pooling}

    def finalize(self, model, tokenizer, final_dir: Path) -> None:
        longest = min(getattr(model.config, "max_position_embeddings", 512), tokenizer.model_max_length)
        write_sentence_transformers(final_dir, model.config.hidden_size, self.cfg.pooling, longest)


class PairCollator:
    """Anchors, positives and hard negatives stacked into one padded (N, T) batch: one forward pass."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        negs = [r["negative"] for r in rows if r.get("negative")]
        seqs = [r["anchor"] for r in rows] + [r["positive"] for r in rows] + negs
        ids, mask = pad_batch(seqs, self.pad_id)  # (2B + Bn, T)
        return {"input_ids": ids, "attention_mask": mask, "n_anchor": len(rows), "n_negative": len(negs)}


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(N, D) L2-normalised sentence vectors (``lmwright.models.pooling``: the one pooling every path uses)."""
    return sentence_vectors(model, input_ids, attention_mask, pooling)


def info_nce(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, temperature: float = 0.05,
             symmetric: bool = False) -> LossOutput:
    """InfoNCE over normalised vectors: anchor i's positive is p[i]; the other positives and all hard
    negatives ``n`` are its negatives. Sum over anchors (``n_targets`` = B); ``acc`` counts anchors
    whose positive scores highest."""
    cands = p if n is None or len(n) == 0 else torch.cat([p, n], dim=0)  # (B + Bn, D)
    logits = a @ cands.T / temperature  # (B, B + Bn)
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    if symmetric:
        back = p @ a.T / temperature  # (B, B): each positive picks its anchor
        loss = (loss + F.cross_entropy(back, target, reduction="sum")) / 2
    acc = (logits.argmax(-1) == target).sum().float()
    return LossOutput(loss_sum=loss, n_targets=torch.tensor(a.shape[0], device=a.device),
                      metrics={"acc": acc})


@torch.no_grad()
def embed_rows(model, seqs: list[list[int]], pad_id: int, pooling: str = "mean", batch_size: int = 64) -> torch.Tensor:
    """(N, D) normalised vectors of token-id rows, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s:s + batch_size], pad_id)
        out.append(encode(model, ids.to(device), mask.to(device), pooling).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def retrieval_metrics(model, rows: list[dict], pad_id: int, pooling: str = "mean") -> dict[str, float]:
    """Each anchor ranks all positives (+ hard negatives): recall@1, recall@5, MRR; Spearman on scores."""
    negs = [r["negative"] for r in rows if r.get("negative")]
    a = embed_rows(model, [r["anchor"] for r in rows], pad_id, pooling)  # (N, D)
    c = embed_rows(model, [r["positive"] for r in rows] + negs, pad_id, pooling)  # (N + Nn, D)
    sims = a @ c.T  # (N, N + Nn)
    gold = sims[torch.arange(len(rows)), torch.arange(len(rows))]  # (N,)
    rank = (sims > gold.unsqueeze(1)).sum(1) + 1  # (N,) 1 = best
    res = {"val_recall@1": float((rank <= 1).float().mean()), "val_recall@5": float((rank <= 5).float().mean()),
           "val_mrr": float((1.0 / rank.float()).mean())}
    scored = [(float(gold[i]), r["score"]) for i, r in enumerate(rows) if r.get("score") is not None]
    if len(scored) >= 3:
        res["val_spearman"] = spearman([s for s, _ in scored], [y for _, y in scored])
    return res


def _ranks(x: list[float]) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions)."""
    t = torch.tensor(x, dtype=torch.float64)
    order = torch.argsort(t)
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(t):
        idx = (t == v).nonzero().squeeze(1)
        if len(idx) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else 0.0


# ------------------------------------------------------------------------ sentence-transformers
def write_sentence_transformers(out: Path, dim: int, pooling: str, max_seq_length: int) -> None:
    """Make ``out`` (already a saved AutoModel + tokenizer) loadable by ``SentenceTransformer``."""
    out = Path(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": int(max_seq_length),
                                                               "do_lower_case": False}, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": int(dim), "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "README.md").write_text(
        "# Sentence embedding model (lmwright contrastive)\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        "vecs = SentenceTransformer('PATH').encode(['a sentence'])  # normalised\n```\n\n"
        f"Plain transformers: `AutoModel` + {pooling} pooling over `last_hidden_state` "
        f"({'attention-masked mean of the tokens' if pooling == 'mean' else 'the first token'}), then L2 "
        "normalisation. Or `lmwright embed --model PATH \"text\"`.\n")


def embed_texts(model, tokenizer, texts: list[str], pooling: str = "mean", max_length: int = 512) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of ``texts``."""
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    seqs = tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
    return embed_rows(model, seqs, tokenizer.pad_token_id, pooling)
