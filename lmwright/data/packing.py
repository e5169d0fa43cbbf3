"""Tokenisation of documents and packing into fixed-length rows without cross-contamination.

A packed row concatenates several samples. Each sample's ``position_ids`` restart at 0, and the
model is called with ``attention_mask=None`` and ``use_cache=False`` so transformers builds a block-diagonal causal mask
from the position ids (``masking_utils.find_packed_sequence_indices``): no token attends across a
sample boundary. The first token of every sample gets label -100 so the shifted loss never asks
the last token of one sample to predict the first token of the next. The result: the loss of a
packed row equals the sum of the per-sample losses (tests/data/test_packing.py proves it).

Two strategies:
- ``concat`` (pretraining): fill rows completely; samples longer than the row continue in the next
  row (with fresh positions).
- ``bfd`` (fine-tuning): best-fit-decreasing bin packing; a sample is never split (longer ones are
  truncated to the row length); the tail of a row is padding with label -100.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

IGNORE = -100


def tokenize_documents(tokenizer, texts: Iterable[str], add_eos: bool = True, batch_size: int = 1000
                       ) -> list[list[int]]:
    """Token ids per document (the tokenizer adds <s> if configured; </s> appended when ``add_eos``)."""
    out: list[list[int]] = []
    texts = list(texts)
    eos = tokenizer.eos_token_id
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], add_special_tokens=True)["input_ids"]
        for ids in enc:
            out.append(list(ids) + ([eos] if add_eos and eos is not None else []))
    return out


def pack_concat(docs: Sequence[Sequence[int]], seq_len: int, labels: Sequence[Sequence[int]] | None = None,
                drop_last: bool = True, pad_id: int = 0) -> list[dict]:
    """Fill rows of exactly ``seq_len`` tokens with consecutive documents (pretraining)."""
    rows: list[dict] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    cur_pos: list[int] = []
    for i, doc in enumerate(docs):
        lab = list(labels[i]) if labels is not None else list(doc)
        k = 0
        while k < len(doc):
            room = seq_len - len(cur_ids)
            piece = doc[k:k + room]
            piece_lab = lab[k:k + room]
            piece_lab[0] = IGNORE  # nothing before it in this row may predict it
            cur_ids += piece
            cur_lab += piece_lab
            cur_pos += list(range(len(piece)))
            k += len(piece)
            if len(cur_ids) == seq_len:
                rows.append({"input_ids": cur_ids, "labels": cur_lab, "position_ids": cur_pos})
                cur_ids, cur_lab, cur_pos = [], [], []
    if cur_ids and not drop_last:
        n = seq_len - len(cur_ids)
        rows.append({"input_ids": cur_ids + [pad_id] * n, "labels": cur_lab + [IGNORE] * n,
                     "position_ids": cur_pos + list(range(n))})
    return rows


def pack_bfd(samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int = 0
             ) -> list[dict]:
    """Best-fit-decreasing packing of (input_ids, labels) samples into rows of ``seq_len``."""
    items = sorted(((list(i)[:seq_len], list(lab)[:seq_len]) for i, lab in samples), key=lambda x: -len(x[0]))
    bins: list[list[tuple[list[int], list[int]]]] = []
    space: list[int] = []
    for ids, lab in items:
        if not ids:
            continue
        best, best_room = -1, seq_len + 1
        for b, room in enumerate(space):  # O(n * bins): fine for the sizes we pack in memory
            if len(ids) <= room < best_room:
                best, best_room = b, room
        if best < 0:
            bins.append([])
            space.append(seq_len)
            best = len(bins) - 1
        bins[best].append((ids, lab))
        space[best] -= len(ids)
    rows = []
    for b in bins:
        ids_row, lab_row, pos_row = [], [], []
        for ids, lab in b:
            lab = list(lab)
            lab[0] = IGNORE
            ids_row += ids
            lab_row += lab
            pos_row += list(range(len(ids)))
        n = seq_len - len(ids_row)
        n_real = len(ids_row)
        rows.append({"input_ids": ids_row + [pad_id] * n, "labels": lab_row + [IGNORE] * n,
                     "position_ids": pos_row + list(range(n)), "num_tokens": n_real})
    return rows


def collate_packed(rows: list[dict]) -> dict:
    """Stack packed rows: no attention_mask (block-diagonal masking comes from position_ids)."""
    import torch

    batch = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
    batch["num_tokens"] = sum(r.get("num_tokens", len(r["input_ids"])) for r in rows)
    return batch


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, side: str = "right", length: int | None = None):
    """(B, T) long tensor of ``seqs`` padded with ``value`` on ``side`` ("right" or "left") to ``length``
    (default: the longest, at least 1). The one padding of the package: every collate and generator uses it."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    T = max(length or 0, max((len(s) for s in seqs), default=0), 1)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", pad_to_multiple: int = 1):
    """``(input_ids, attention_mask)``, each (B, T): ``seqs`` padded with ``pad_id`` on ``side`` to the longest
    (rounded up to ``pad_to_multiple``); the mask is 1 on real tokens."""
    T = max((len(s) for s in seqs), default=0)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    ids = pad_sequences(seqs, pad_id, side, T)
    return ids, pad_sequences([[1] * len(s) for s in seqs], 0, side, ids.shape[1])


def collate_padded(rows: list[dict], pad_id: int, pad_to_multiple: int = 1, labels: str | None = "tokens",
                   label_pad: int = IGNORE, side: str = "right") -> dict:
    """Pad variable-length rows (``input_ids``) to the longest in the batch, with an attention mask.

    ``labels``: ``"tokens"`` -> (B, T) per-token labels from each row's ``labels`` (its ``input_ids`` when it
    has none: causal LM), padded with ``label_pad``; ``"class"`` -> (B,) one class id per row from ``label``;
    None -> no labels."""
    import torch

    ids, mask = pad_batch([r["input_ids"] for r in rows], pad_id, side, pad_to_multiple)
    out = {"input_ids": ids}
    if labels == "tokens":
        out["labels"] = pad_sequences([r.get("labels", r["input_ids"]) for r in rows], label_pad, side, ids.shape[1])
    elif labels == "class":
        out["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    elif labels is not None:
        raise ValueError(f"labels must be 'tokens', 'class' or None, got {labels!r}")
    out["attention_mask"] = mask
    return out
