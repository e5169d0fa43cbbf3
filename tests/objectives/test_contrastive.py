"""Contrastive maths on fixed inputs: InfoNCE (in-batch, hard negatives, symmetric), pooling,
batching, retrieval metrics, Spearman, the sentence-transformers layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmwright.config import ConfigError
from lmwright.objectives.contrastive import (
    Contrastive,
    ContrastiveConfig,
    PairCollator,
    info_nce,
    pool,
    spearman,
)


def test_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = info_nce(a, p, None, temperature=1.0)
    # anchor 0: logits [1, 0.6] target 0; anchor 1: logits [0, 0.8] target 1
    want = -math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.exp(0.8) / (1 + math.exp(0.8)))
    assert float(out.loss_sum) == pytest.approx(want, rel=1e-5)
    assert int(out.n_targets) == 2 and float(out.metrics["acc"]) == 2.0


def test_hard_negatives_and_symmetric():
    torch.manual_seed(0)
    a, p, n = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    with_neg = info_nce(a, p, n, 0.1)
    logits = a @ torch.cat([p, n]).T / 0.1  # (4, 8)
    assert float(with_neg.loss_sum) == pytest.approx(float(F.cross_entropy(logits, torch.arange(4), reduction="sum")),
                                                     rel=1e-5)
    sym = info_nce(a, p, None, 0.1, symmetric=True)
    fwd = F.cross_entropy(a @ p.T / 0.1, torch.arange(4), reduction="sum")
    bwd = F.cross_entropy(p @ a.T / 0.1, torch.arange(4), reduction="sum")
    assert float(sym.loss_sum) == pytest.approx(float((fwd + bwd) / 2), rel=1e-5)


def test_pooling():
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])  # (1, 3, 2); last token is padding
    m = torch.tensor([[1, 1, 0]])
    assert pool(h, m, "mean").tolist() == [[2.0, 2.0]]
    assert pool(h, m, "cls").tolist() == [[1.0, 1.0]]
    left = torch.tensor([[[100.0, 100.0], [1.0, 1.0], [3.0, 3.0]]])  # left padding: cls is the first real token
    assert pool(left, torch.tensor([[0, 1, 1]]), "cls").tolist() == [[1.0, 1.0]]
    with pytest.raises(ConfigError, match="pooling 'max'"):
        pool(h, m, "max")


def test_collate_stacks_anchor_positive_negative():
    rows = [{"anchor": [5, 6], "positive": [7], "negative": [8, 9, 10]}, {"anchor": [11], "positive": [12, 13],
                                                                          "negative": None}]
    b = PairCollator(pad_id=0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 0], [11, 0, 0], [7, 0, 0], [12, 13, 0], [8, 9, 10]]
    assert b["n_anchor"] == 2 and b["n_negative"] == 1 and int(b["attention_mask"].sum()) == 9


def test_build_dataset_pairs_and_simcse(tokenizer):
    obj = Contrastive()
    rows = obj.build_dataset([{"anchor": "a fox", "positive": "the fox", "negative": "a cat", "score": 0.5},
                              {"text": "the owl sings"}], tokenizer, 16)
    assert rows[0]["negative"] and rows[0]["score"] == 0.5
    assert rows[1]["anchor"] == rows[1]["positive"] and rows[1]["negative"] is None  # SimCSE: same text twice
    assert Contrastive(ContrastiveConfig(hard_negatives=False)).build_dataset(
        [{"anchor": "a", "positive": "b", "negative": "c"}], tokenizer, 8)[0]["negative"] is None
    with pytest.raises(ConfigError, match="empty anchor"):
        obj.build_dataset([{"anchor": " ", "positive": "b"}], tokenizer, 8)


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [0.5, 0.5, 2, 3], y ranks [0, 1, 2, 3]
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-5)


def test_retrieval_metrics_with_a_fake_encoder():
    from lmwright.objectives.contrastive import retrieval_metrics

    class Fake(torch.nn.Module):  # token id t -> one-hot-ish vector; a sentence = mean of its tokens
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 20)
            torch.nn.init.eye_(self.emb.weight)

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"last_hidden_state": self.emb(input_ids)})()

    rows = [{"anchor": [1], "positive": [1], "negative": None, "score": None},
            {"anchor": [2], "positive": [3], "negative": None, "score": None},  # all cosines 0: a tie
            {"anchor": [4], "positive": [4, 5], "negative": [4], "score": None}]
    m = retrieval_metrics(Fake(), rows, pad_id=0)
    # anchor 0: its positive is the only match (rank 1); anchor 1: all cosines 0, none strictly higher
    # (rank 1); anchor 2: the hard negative [4] (cos 1) beats its positive [4, 5] (cos .707): rank 2
    assert m["val_recall@1"] == pytest.approx(2 / 3) and m["val_mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["val_recall@5"] == 1.0


def test_check_messages(tokenizer):
    with pytest.raises(ConfigError, match="encoder"):
        Contrastive().check("llama", tokenizer)
    Contrastive().check("bert", tokenizer)
    with pytest.raises(ConfigError, match="temperature"):
        ContrastiveConfig(temperature=0).check()


def test_pairs_format_rejects_empty_sides(tmp_path):
    from lmwright.data import load_records
    from lmwright.data.config import DataConfig

    f = tmp_path / "p.jsonl"
    f.write_text('{"anchor": "a fox", "positive": "the fox"}\n{"anchor": "x", "positive": ""}\n')
    with pytest.raises(Exception, match="positive.*empty|empty.*positive"):
        load_records(DataConfig(path=[str(f)], format="pairs"))
