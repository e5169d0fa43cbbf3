"""Corruption and batching maths of the self-supervised objectives: the one home of

- BERT dynamic masking (80% ``<mask>`` / 10% random / 10% kept; optional whole-word masking),
- T5 span corruption (``random_spans_noise_mask`` of the T5 paper's code, sentinels),
- BART text infilling (Poisson span lengths, one ``<mask>`` per span) and sentence permutation.

Every random draw uses ``generator`` when one is given and torch's global RNG otherwise, so that a
collate function called by the engine is reproducible and resumes exactly (the engine checkpoints
the global RNG state). Inputs are plain token-id lists or ``(B, T)`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100


# --------------------------------------------------------------------------------------- MLM
def word_start_table(tokenizer) -> torch.Tensor:
    """(V,) bool: does token id ``i`` start a word?

    Byte-level BPE marks a word start with a leading 'Ġ', Unigram/SentencePiece with '▁', WordPiece
    marks *continuations* with '##'. Special tokens always start a word (they are never masked).
    """
    vocab = tokenizer.get_vocab()
    table = torch.ones(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    toks = list(vocab)
    if any(t.startswith("##") for t in toks):
        for t, i in vocab.items():
            table[i] = not t.startswith("##")
    elif any(t.startswith("Ġ") for t in toks) or any(t.startswith("▁") for t in toks):
        for t, i in vocab.items():
            table[i] = t.startswith(("Ġ", "▁"))
    for i in tokenizer.all_special_ids:
        table[i] = True
    return table


def special_table(tokenizer) -> torch.Tensor:
    """(V,) bool: special token ids (pad, bos, eos, mask, chat markers, sentinels)."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    table[torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)] = True
    return table


def mlm_mask(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
             probability: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
             word_starts: torch.Tensor | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT dynamic masking of ``input_ids`` (B, T); returns (corrupted ids, labels).

    ``special`` is a (V,) bool table: those ids are never selected. Each other token (or each
    word, when ``word_starts`` (V,) is given) is selected with ``probability``; a selected token is
    replaced by ``mask_id`` with ``mask_frac``, by a random non-special token with ``random_frac``,
    else kept. Labels hold the original id at selected positions and -100 elsewhere.
    """
    ids = input_ids.clone()
    is_special = special[input_ids]  # (B, T)
    if word_starts is None:
        p = torch.full(ids.shape, probability)
        p.masked_fill_(is_special, 0.0)
        selected = torch.bernoulli(p, generator=generator).bool()  # (B, T)
    else:
        starts = word_starts[input_ids] | is_special  # (B, T)
        word_id = torch.cumsum(starts.long(), dim=1) - 1  # (B, T) word index within the row
        n_words = int(word_id.max()) + 1 if word_id.numel() else 0
        pick = torch.bernoulli(torch.full((ids.shape[0], max(n_words, 1)), probability), generator=generator).bool()
        selected = pick.gather(1, word_id.clamp(min=0)) & ~is_special  # (B, T): whole words in or out
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    r = torch.rand(ids.shape, generator=generator)  # (B, T) one draw decides mask/random/keep
    to_mask = selected & (r < mask_frac)
    to_random = selected & (r >= mask_frac) & (r < mask_frac + random_frac)
    ids[to_mask] = mask_id
    n_rand = int(to_random.sum())
    if n_rand:
        allowed = (~special[:vocab_size]).nonzero().squeeze(1)  # (V',) ordinary tokens
        pick = torch.randint(len(allowed), (n_rand,), generator=generator)
        ids[to_random] = allowed[pick]
    return ids, labels


# ------------------------------------------------------------------------------ T5 span corruption
def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator | None) -> torch.Tensor:
    """Split ``num_items`` into ``num_segments`` non-empty segments at random; (num_segments,) lengths."""
    first = torch.zeros(num_items, dtype=torch.long)
    if num_segments > 1:
        cuts = torch.randperm(num_items - 1, generator=generator)[:num_segments - 1] + 1
        first[cuts] = 1
    segment_id = torch.cumsum(first, 0)
    return torch.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            max_spans: int | None = None, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """(length,) bool noise mask, as T5's ``random_spans_noise_mask``.

    ``round(length * noise_density)`` noise tokens (at least 1, at most length - 1) in
    ``round(noise / mean_span_length)`` spans (at least 1; at most ``max_spans``, e.g. the number of
    sentinels), interleaved with as many non-noise spans; the sequence starts with non-noise.
    """
    if length < 2:
        return torch.zeros(length, dtype=torch.bool)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    num_nonnoise = length - num_noise
    num_spans = min(num_spans, num_noise, num_nonnoise, max_spans or num_spans)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, generator)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=1).reshape(-1)  # (2 * spans,)
    span_starts = torch.cumsum(interleaved, 0)[:-1]
    indicator = torch.zeros(length, dtype=torch.long)
    indicator[span_starts] = 1
    return torch.cumsum(indicator, 0) % 2 == 1


def spans_to_sentinels(ids: Sequence[int], noise: torch.Tensor, sentinel_ids: Sequence[int],
                       eos_id: int | None) -> tuple[list[int], list[int]]:
    """T5 inputs and targets from a noise mask.

    Inputs keep the non-noise tokens and replace noise span k by sentinel k; targets are sentinel k
    followed by span k's tokens, for every span, then eos. E.g. ``a b [c d] e [f]`` ->
    inputs ``a b <0> e <1> </s>``, targets ``<0> c d <1> f </s>``.
    """
    inputs: list[int] = []
    targets: list[int] = []
    k, prev = -1, False
    for tok, n in zip(ids, noise.tolist()):
        if n:
            if not prev:
                k += 1
                inputs.append(sentinel_ids[k])
                targets.append(sentinel_ids[k])
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = n
    if eos_id is not None:
        inputs.append(eos_id)
        targets.append(eos_id)
    return inputs, targets


# ------------------------------------------------------------------------------- BART infilling
def text_infilling(ids: Sequence[int], mask_id: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                   protected: torch.Tensor | None = None, generator: torch.Generator | None = None) -> list[int]:
    """BART text infilling: spans with Poisson(``poisson_lambda``) lengths covering about
    ``mask_ratio`` of the tokens each become one ``mask_id``; a 0-length span inserts a mask.

    ``protected`` (len(ids),) bool marks positions never masked (e.g. bos/eos). Overlapping or
    adjacent spans merge into one mask.
    """
    n = len(ids)
    prot = protected if protected is not None else torch.zeros(n, dtype=torch.bool)
    candidates = (~prot).nonzero().squeeze(1)  # (C,)
    if n == 0 or len(candidates) == 0:
        return list(ids)
    num_to_mask = int(round(len(candidates) * mask_ratio))
    if num_to_mask == 0:
        return list(ids)
    lengths: list[int] = []
    while sum(lengths) < num_to_mask:
        draw = torch.poisson(torch.full((max(4, num_to_mask),), float(poisson_lambda)), generator=generator)
        for v in draw.long().tolist():
            lengths.append(v)
            if sum(lengths) >= num_to_mask:
                break
    lengths[-1] -= sum(lengths) - num_to_mask  # trim the last span to the budget
    lengths = lengths[:len(candidates)]
    starts = candidates[torch.randperm(len(candidates), generator=generator)[:len(lengths)]].tolist()
    deleted = torch.zeros(n, dtype=torch.bool)
    insert_before: set[int] = set()
    for s, ln in zip(starts, lengths):
        if ln == 0:
            insert_before.add(s)
            continue
        span = torch.arange(s, min(s + ln, n))
        deleted[span[~prot[span]]] = True
    out: list[int] = []
    for i, tok in enumerate(ids):
        if i in insert_before and not (out and out[-1] == mask_id):
            out.append(mask_id)
        if deleted[i]:
            if not (out and out[-1] == mask_id):
                out.append(mask_id)
            continue
        out.append(tok)
    return out


def permute_sentences(ids: Sequence[int], is_sentence_end: torch.Tensor,
                      generator: torch.Generator | None = None) -> list[int]:
    """Shuffle the sentences of ``ids``; a sentence ends at a token marked in ``is_sentence_end``
    (len(ids),). Trailing tokens after the last end form a sentence too."""
    sents: list[list[int]] = []
    cur: list[int] = []
    for tok, end in zip(ids, is_sentence_end.tolist()):
        cur.append(tok)
        if end:
            sents.append(cur)
            cur = []
    if cur:
        sents.append(cur)
    order = torch.randperm(len(sents), generator=generator).tolist()
    return [t for i in order for t in sents[i]]


def sentence_end_table(tokenizer) -> torch.Tensor:
    """(V,) bool: tokens that end a sentence (their text ends with . ! ? or 。)."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for t, i in tokenizer.get_vocab().items():
        if i < len(table) and t.rstrip().endswith((".", "!", "?", "。")) and i not in tokenizer.all_special_ids:
            table[i] = True
    return table
