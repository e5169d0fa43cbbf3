"""``pairs``: ``{anchor, positive, negative, score}`` for sentence-embedding (contrastive) training.

``negative`` (a hard negative) and ``score`` (a similarity label, e.g. STS in [0, 1]) are optional
and canonicalised to ``None`` so that every record has the same keys.
"""

from __future__ import annotations

import math

from lmwright.data.formats import FORMATS, field_error, join_texts, optional_str, required_str

HINT = "pairs records need anchor and positive; negative (text) and score (number) are optional"


class PairsFormat:
    name = "pairs"

    def canonicalize(self, record: dict, where: str) -> dict:
        anchor = required_str(record, "anchor", where, HINT)
        positive = required_str(record, "positive", where, HINT)
        negative = optional_str(record, "negative", where, HINT) or None
        score = record.get("score")
        if score is not None and score != "":
            if isinstance(score, bool):
                raise field_error(where, "score", "must be a number, got bool", HINT)
            try:
                score = float(score)
            except (TypeError, ValueError):
                raise field_error(where, "score", f"must be a number, got {score!r}", HINT) from None
            if not math.isfinite(score):
                raise field_error(where, "score", f"must be finite, got {score!r}", HINT)
        else:
            score = None
        return {"anchor": anchor, "positive": positive, "negative": negative, "score": score}

    def text_of(self, record: dict) -> str:
        return join_texts(record["anchor"], record["positive"], record.get("negative") or "")


FORMATS.register("pairs", PairsFormat())
