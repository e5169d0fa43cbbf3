"""The stages pad through the one padding, ``data.packing.collate_padded``."""

from __future__ import annotations

from lmwright.data.packing import IGNORE


def test_stage_collates_are_the_one_padding():
    """classify, distill and the alignment stages pad through collate_padded: same tensors, their keys."""
    from lmwright.stages import _align, classify, distill

    cls_rows = [{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}]
    a, b = classify.collate(cls_rows, 1), distill.collate(cls_rows, 1)
    for batch in (a, b):
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert batch["labels"].tolist() == [2, 0]
    lm_rows = [{"input_ids": [5, 6], "labels": [IGNORE, 6]}, {"input_ids": [7, 8, 9], "labels": [IGNORE, 8, 9]}]
    c = _align.collate_lm(lm_rows, 0)
    assert c["labels"].tolist() == [[IGNORE, 6, IGNORE], [IGNORE, 8, 9]] and int(c["num_tokens"]) == 5
    assert {k: v.tolist() for k, v in distill.collate(lm_rows, 0).items()} == {k: v.tolist() for k, v in c.items()}
    pairs = _align.collate_pairs([{"chosen": lm_rows[0], "rejected": lm_rows[1], "ref": 0.5}], 0)
    assert pairs["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]] and pairs["ref"].tolist() == [0.5]
