"""Cleaning: unicode forms, whitespace, length filters, exact and near-duplicate removal."""

from __future__ import annotations

import random

from lmwright.data import FORMATS, CleanConfig
from lmwright.data.clean import Cleaner, MinHashLSH, lsh_params, normalize_unicode, normalize_whitespace

TEXT = FORMATS.get("text")

WORDS = ["river", "mountain", "quiet", "garden", "lantern", "orange", "violet", "thunder", "pebble", "harbor", "meadow", "silver", "candle", "window", "forest", "copper", "marble", "winter", "summer", "basket", "feather", "ladder", "rocket", "pencil"]


def _doc(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_unicode_forms():
    decomposed = "Cafe\u0301"  # e + combining acute
    assert normalize_unicode(decomposed, "NFC") == "Café"
    assert normalize_unicode("ﬁne ＡＢＣ", "NFKC") == "fine ABC"
    assert normalize_unicode("ﬁne", "NFC") == "ﬁne"
    assert normalize_unicode(decomposed, "none") == decomposed


def test_whitespace_keeps_newlines_and_indent():
    assert normalize_whitespace("  a \t  b  \r\n\n    c   d  ") == "a b\n\n    c d"
    assert normalize_whitespace("def f():\n    return  1\n") == "def f():\n    return 1"


def test_chinese_untouched_by_default():
    s = "我喜欢苹果，北京是中国的首都。\n第二行：你好！"
    c = Cleaner(CleanConfig(), TEXT.text_of)
    rec, reason = c({"text": s})
    assert reason is None and rec == {"text": s}


def test_roles_and_labels_are_not_rewritten():
    c = Cleaner(CleanConfig(normalize="NFKC"), FORMATS.get("classification").text_of)
    rec, _ = c({"text": "ＡＢＣ  x", "label": "ＰＯＳ  "})
    assert rec == {"text": "ABC x", "label": "ＰＯＳ  "}


def test_length_filters_and_exact_dedup():
    c = Cleaner(CleanConfig(min_chars=3, max_chars=10), TEXT.text_of)
    assert c({"text": "ab"}) == (None, "too_short")
    assert c({"text": "x" * 11}) == (None, "too_long")
    assert c({"text": "hello  world"}, "f:1") == (None, "too_long")
    assert c({"text": "hello"}, "f:1")[1] is None
    assert c({"text": "  hello "}, "f:2") == (None, "duplicate")  # equal after whitespace cleaning
    assert "f:1" in c.last_message
    assert dict(c.rejects) == {"too_short": 1, "too_long": 2, "duplicate": 1}


def test_dedup_off_keeps_duplicates():
    c = Cleaner(CleanConfig(dedup=False), TEXT.text_of)
    assert c({"text": "a"})[1] is None and c({"text": "a"})[1] is None


def test_near_dedup_catches_one_word_edit_keeps_different_texts():
    base = _doc(1)
    words = base.split()
    words[30] = "zeppelin"
    edited = " ".join(words)
    c = Cleaner(CleanConfig(near_dedup=True, near_dedup_threshold=0.8), TEXT.text_of)
    assert c({"text": base}, "a:1")[1] is None
    assert c({"text": edited}, "a:2") == (None, "near_duplicate")
    assert "a:1" in c.last_message
    kept = [c({"text": _doc(s)}, f"b:{s}")[1] for s in range(2, 12)]
    assert kept == [None] * 10


def test_near_dedup_is_deterministic():
    texts = [_doc(s, 20) for s in range(30)] + [_doc(3, 20) + " extra"]
    runs = []
    for _ in range(2):
        lsh = MinHashLSH(0.7)
        runs.append([lsh.add(t) for t in texts])
    assert runs[0] == runs[1] and runs[0][-1] is True
    assert (MinHashLSH(0.7).signature(texts[0]) == MinHashLSH(0.7).signature(texts[0])).all()


def test_lsh_params_follow_threshold():
    b_lo, r_lo = lsh_params(0.5, 128)
    b_hi, r_hi = lsh_params(0.9, 128)
    assert b_lo * r_lo <= 128 and b_hi * r_hi <= 128
    assert r_hi > r_lo  # stricter threshold: more rows per band
