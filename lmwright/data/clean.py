"""Cleaning: unicode normalisation, whitespace, length filters, exact and near-duplicate removal.

Everything here is deterministic and streaming: a :class:`Cleaner` sees canonical records one at a
time and keeps the first of every (near-)duplicate group, so the result does not depend on anything
but the input order. Near-duplicates are found with MinHash over character 5-shingles and LSH
banding (pure Python + numpy, no extra dependency); see :class:`MinHashLSH`.

Normalisation and whitespace rules apply to every string of a record except ``role`` and ``label``
(those are identifiers, not text); filters and dedup look at the format's ``text_of``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from lmwright.data.config import CleanConfig

_KEEP_KEYS = frozenset({"role", "label"})
_SPACE_RUN = re.compile(r"[ \t]+")


def normalize_unicode(text: str, form: str) -> str:
    """NFC (default) only composes characters; NFKC also folds compatibility forms (full-width
    letters, ligatures, and full-width CJK punctuation - which is why it is not the default)."""
    return text if form == "none" else unicodedata.normalize(form, text)


def normalize_whitespace(text: str) -> str:
    """Strip the ends, unify line breaks, collapse runs of spaces/tabs inside lines, drop trailing
    spaces; keep newlines and each line's leading indentation (code and verse depend on it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)]
        body = _SPACE_RUN.sub(" ", body).rstrip(" \t")
        lines.append(indent + body if body else "")
    return "\n".join(lines).strip()


def map_strings(value: Any, fn: Callable[[str], str], key: str | None = None) -> Any:
    """Apply ``fn`` to every string inside a record (dicts, lists), except identifier fields."""
    if isinstance(value, str):
        return value if key in _KEEP_KEYS else fn(value)
    if isinstance(value, dict):
        return {k: map_strings(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn, key) for v in value]
    return value


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------- MinHash
_PRIME = np.uint64(4294967311)  # smallest prime above 2**32: shingle hashes are 32-bit crc32 values
_CHUNK = 8192


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the equally weighted false-positive and false-negative areas of
    the S-curve ``1 - (1 - s**rows)**bands`` around ``threshold`` (the choice datasketch makes)."""
    s = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


class MinHashLSH:
    """Streaming near-duplicate detector: :meth:`add` says whether a text is a near-duplicate of
    one already added (and then does not add it).

    Signatures are ``num_perm`` minima of universal hashes ``(a*h + b) mod p`` over the crc32 of
    the text's character shingles (lowercased, whitespace collapsed); the ``a, b`` come from a
    fixed-seed legacy ``RandomState``, whose stream numpy guarantees across versions, so results
    are reproducible. LSH bands propose candidates; a candidate counts when the estimated Jaccard
    similarity (share of equal minima) reaches ``threshold``.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dedup_threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle = shingle
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.RandomState(seed)
        self.a = rng.randint(1, 2**31 - 1, size=num_perm).astype(np.uint64)
        self.b = rng.randint(0, 2**31 - 1, size=num_perm).astype(np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[np.ndarray] = []
        self._pending: tuple[np.ndarray, list[bytes]] = (np.empty(0, dtype=np.uint64), [])

    def signature(self, text: str) -> np.ndarray:
        t = " ".join(text.lower().split())
        k = self.shingle
        grams = {t[i:i + k] for i in range(max(1, len(t) - k + 1))}
        h = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(h), _CHUNK):
            part = (h[i:i + _CHUNK, None] * self.a[None, :] + self.b[None, :]) % _PRIME  # (S, P)
            np.minimum(sig, part.min(axis=0), out=sig)
        return sig

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def query(self, text: str) -> int | None:
        """Index of an earlier added text whose estimated Jaccard similarity reaches the threshold,
        or None; :meth:`insert` then adds the text just queried."""
        sig = self.signature(text)
        keys = self._band_keys(sig)
        self._pending = (sig, keys)
        seen: set[int] = set()
        for bucket, key in zip(self._buckets, keys):
            for j in bucket.get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if float(np.mean(self._sigs[j] == sig)) >= self.threshold:
                        return j
        return None

    def insert(self) -> int:
        sig, keys = self._pending
        idx = len(self._sigs)
        self._sigs.append(sig)
        for bucket, key in zip(self._buckets, keys):
            bucket.setdefault(key, []).append(idx)
        return idx

    def add(self, text: str) -> bool:
        """True if ``text`` is a near-duplicate of an earlier one (not added); else add it, False."""
        if self.query(text) is not None:
            return True
        self.insert()
        return False


# ---------------------------------------------------------------------------------------- Cleaner
class Cleaner:
    """Apply a :class:`CleanConfig` to canonical records, one at a time, counting drops by reason.

    ``__call__`` returns ``(record, None)`` for a kept (cleaned) record or ``(None, reason)``, reason
    one of ``too_short``, ``too_long``, ``duplicate``, ``near_duplicate``; ``last_message`` then
    says why in words (for duplicates: which earlier record it repeats). Share one cleaner between
    validation and training data so that a training record duplicating a validation one is dropped.
    """

    def __init__(self, cfg: CleanConfig, text_of: Callable[[dict], str]):
        self.cfg = cfg
        self.text_of = text_of
        self.rejects: Counter[str] = Counter()
        self.last_message = ""
        self._seen: dict[str, str] = {}
        self._lsh = MinHashLSH(cfg.near_dedup_threshold) if cfg.near_dedup else None
        self._lsh_where: list[str] = []

    def clean_record(self, record: dict) -> dict:
        cfg = self.cfg
        if cfg.normalize != "none" and cfg.whitespace:
            return map_strings(record, lambda s: normalize_whitespace(normalize_unicode(s, cfg.normalize)))
        if cfg.normalize != "none":
            return map_strings(record, lambda s: normalize_unicode(s, cfg.normalize))
        if cfg.whitespace:
            return map_strings(record, normalize_whitespace)
        return record

    def __call__(self, record: dict, where: str = "") -> tuple[dict | None, str | None]:
        cfg = self.cfg
        record = self.clean_record(record)
        text = self.text_of(record)
        h = text_hash(text) if cfg.dedup else ""
        if len(text) < cfg.min_chars:
            return self._drop("too_short", f"{len(text)} characters < min_chars={cfg.min_chars}")
        if len(text) > cfg.max_chars:
            return self._drop("too_long", f"{len(text)} characters > max_chars={cfg.max_chars}")
        if cfg.dedup and h in self._seen:
            return self._drop("duplicate", f"same text as {self._seen[h]}")
        if self._lsh is not None:
            match = self._lsh.query(text)
            if match is not None:
                return self._drop("near_duplicate", f"near-duplicate of {self._lsh_where[match]} "
                                                    f"(threshold {cfg.near_dedup_threshold})")
            self._lsh.insert()
            self._lsh_where.append(where)
        if cfg.dedup:
            self._seen[h] = where
        return record, None

    def _drop(self, reason: str, message: str) -> tuple[None, str]:
        self.rejects[reason] += 1
        self.last_message = message
        return None, reason
