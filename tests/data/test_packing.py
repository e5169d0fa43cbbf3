"""Packing without cross-contamination: packed loss == the sum of per-sample losses."""

from __future__ import annotations

import pytest
import torch

from lmwright.data.packing import IGNORE, collate_packed, pack_bfd, pack_concat, tokenize_documents
from lmwright.models import ModelConfig, build_model
from lmwright.objectives.base import causal_lm_loss


def test_concat_boundaries():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    rows = pack_concat(docs, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0]
    assert rows[1]["position_ids"] == [0, 1, 2, 3]  # the continued document restarts its positions
    assert rows[0]["labels"] == [IGNORE, 2, 3, IGNORE]  # first token of each piece is never a target
    last = pack_concat(docs, 4, drop_last=False, pad_id=0)[-1]
    assert last["input_ids"] == [9, 10, 0, 0] and last["labels"] == [IGNORE, 10, IGNORE, IGNORE]


def test_bfd_never_splits_and_fills():
    samples = [([1] * 5, [1] * 5), ([2] * 3, [2] * 3), ([3] * 2, [3] * 2), ([4] * 6, [4] * 6)]
    rows = pack_bfd(samples, 8)
    assert len(rows) == 2
    for r in rows:
        assert len(r["input_ids"]) == 8
        runs = []  # every sample sits whole inside one row
        for t, p in zip(r["input_ids"], r["position_ids"]):
            if p == 0:
                runs.append([])
            runs[-1].append(t)
        assert all(len(set(x)) == 1 for x in runs)
    assert sum(r["num_tokens"] for r in rows) == 16


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny"])
def test_packed_loss_equals_per_sample_loss(tokenizer, preset):
    model = build_model(ModelConfig(name=preset), "causal-lm", tokenizer=tokenizer, seed=0).eval()
    texts = ["The red fox runs to the river.", "Anna likes bread.", "北京是中国的首都。", "3 plus 4 is 7."]
    docs = tokenize_documents(tokenizer, texts)
    seq_len = sum(len(d) for d in docs)
    rows = pack_concat(docs, seq_len)
    assert len(rows) == 1
    with torch.no_grad():
        packed = causal_lm_loss(model, collate_packed(rows))
        single_sum, single_n = 0.0, 0
        for d in docs:
            ids = torch.tensor([d])
            out = causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()})
            single_sum += float(out.loss_sum)
            single_n += int(out.n_targets)
    assert int(packed.n_targets) == single_n
    assert float(packed.loss_sum) == pytest.approx(single_sum, rel=1e-5)


def test_packed_attention_does_not_cross_documents(tokenizer):
    """Changing document A must not change the logits of document B packed after it."""
    model = build_model(ModelConfig(name="llama-tiny"), "causal-lm", tokenizer=tokenizer, seed=0).eval()
    a1, a2, b = tokenize_documents(tokenizer, ["The cat sleeps.", "A dog swims far away.", "Ben likes fish."])
    a2 = a2[:len(a1)]
    outs = []
    for a in (a1, a2):
        row = collate_packed(pack_concat([a, b], len(a) + len(b)))
        with torch.no_grad():
            # use_cache=False matters: transformers only derives the packed mask when no KV cache exists
            logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        outs.append(logits[0, len(a):])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
