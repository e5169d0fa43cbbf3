"""Answer metrics, once: the SFT stage's held-out ``val_exact_match`` and ``lmwright eval --task
generation`` (and the demos that quote either) score generated answers with these functions.

The rule: a generated answer matches its reference when the two are equal after stripping leading and
trailing whitespace. Case and inner whitespace count. Why: decoding leaves spaces and newlines at the ends
(a SentencePiece leading space, a newline before the stop token), which no reader would call a different
answer; but case can be the answer (the synthetic "Write the word in capital letters." task), and inner
whitespace is part of code, JSON and word-order answers. Equality after this strip is what a held-out
exact match has always meant in run.json.
"""

from __future__ import annotations


def exact_match(prediction: str, reference: str) -> bool:
    """``prediction`` equals ``reference`` once both are stripped of surrounding whitespace (case and inner
    whitespace count)."""
    return prediction.strip() == reference.strip()


def contains_match(prediction: str, reference: str) -> bool:
    """The stripped ``reference`` occurs in ``prediction`` (a chattier answer that still gives it); same
    rule as :func:`exact_match` otherwise: case and inner whitespace count."""
    return reference.strip() in prediction
