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


# ------------------------------------------------------------------------------------ padding (one home)
def test_pad_sequences_sides_and_length():
    from lmwright.data.packing import pad_sequences

    assert pad_sequences([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad_sequences([[1, 2], [3]], 9, side="left").tolist() == [[1, 2], [9, 3]]
    assert pad_sequences([[1], (2, 3)], -1, length=4).tolist() == [[1, -1, -1, -1], [2, 3, -1, -1]]
    assert pad_sequences([[], []], 5).tolist() == [[5], [5]]  # never a (B, 0) batch
    with pytest.raises(ValueError):
        pad_sequences([[1]], 0, side="middle")


def test_pad_batch_mask_and_multiple():
    from lmwright.data.packing import pad_batch

    ids, mask = pad_batch([[4, 5, 6], [7]], 0, pad_to_multiple=4)
    assert ids.tolist() == [[4, 5, 6, 0], [7, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    ids, mask = pad_batch([[4, 5, 6], [7]], 2, side="left")
    assert ids.tolist() == [[4, 5, 6], [2, 2, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_collate_padded_label_options():
    from lmwright.data.packing import collate_padded

    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4]}]
    b = collate_padded(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]  # no labels: the ids (causal LM)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    b = collate_padded(rows, pad_id=0, pad_to_multiple=4, label_pad=-1, side="left")
    assert b["labels"].tolist() == [[-1, IGNORE, 2, 3], [-1, -1, -1, 4]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    b = collate_padded([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}], 0, labels="class")
    assert b["labels"].tolist() == [1, 0] and b["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert set(collate_padded(rows, 0, labels=None)) == {"input_ids", "attention_mask"}

