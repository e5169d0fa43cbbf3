"""Denoising maths on fixed inputs: T5 noise masks, sentinels, BART infilling, sentence permutation."""

from __future__ import annotations

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.data import corruption
from lmwright.objectives.base import IGNORE_INDEX
from lmwright.objectives.denoise import Denoise, DenoiseCollator, DenoiseConfig, sentinel_ids


def _spans(mask: torch.Tensor) -> list[tuple[bool, int]]:
    out: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_random_spans_noise_mask_counts():
    # length 100, density 0.15 -> 15 noise tokens in round(15 / 3) = 5 spans, starting with non-noise
    for seed in range(50):
        m = corruption.random_spans_noise_mask(100, 0.15, 3.0, generator=torch.Generator().manual_seed(seed))
        spans = _spans(m)
        assert int(m.sum()) == 15
        assert sum(1 for noise, _ in spans if noise) == 5
        assert spans[0][0] is False and spans[-1][0] is True  # non-noise first, noise last (T5)


def test_noise_mask_mean_span_length_and_limits():
    lengths = []
    for seed in range(200):
        m = corruption.random_spans_noise_mask(200, 0.3, 4.0, generator=torch.Generator().manual_seed(seed))
        lengths += [n for noise, n in _spans(m) if noise]
    assert abs(sum(lengths) / len(lengths) - 4.0) < 0.05  # 60 noise tokens / 15 spans exactly
    m = corruption.random_spans_noise_mask(100, 0.15, 1.0, max_spans=4, generator=torch.Generator().manual_seed(0))
    assert sum(1 for noise, _ in _spans(m) if noise) == 4  # capped by the number of sentinels
    assert corruption.random_spans_noise_mask(3, 0.01, 3.0).sum() == 1  # at least one noise token


def test_spans_to_sentinels_hand_checked():
    ids = [10, 11, 12, 13, 14, 15]
    noise = torch.tensor([False, False, True, True, False, True])
    inp, tgt = corruption.spans_to_sentinels(ids, noise, [90, 91, 92], eos_id=1)
    assert inp == [10, 11, 90, 14, 91, 1]
    assert tgt == [90, 12, 13, 91, 15, 1]


def test_text_infilling_one_mask_per_span_and_ratio():
    n_masked, n_total = 0, 0
    for seed in range(100):
        ids = list(range(10, 110))
        out = corruption.text_infilling(ids, 3, 0.3, 3.0, generator=torch.Generator().manual_seed(seed))
        kept = [t for t in out if t != 3]
        assert kept == [t for t in ids if t in set(kept)]  # order kept, no token invented
        assert all(not (a == 3 and b == 3) for a, b in zip(out, out[1:]))  # never two masks in a row
        n_masked += len(ids) - len(kept)
        n_total += len(ids)
    assert 0.2 < n_masked / n_total <= 0.3  # overlapping spans merge, so at most the ratio


def test_text_infilling_protects_and_permutation():
    ids = [2, 10, 11, 12, 4]
    prot = torch.tensor([True, False, False, False, True])
    out = corruption.text_infilling(ids, 3, 0.99, 3.0, prot, generator=torch.Generator().manual_seed(0))
    assert out[0] == 2 and out[-1] == 4
    ends = torch.tensor([False, True, False, False, True, False])
    perm = corruption.permute_sentences([1, 2, 3, 4, 5, 6], ends, generator=torch.Generator().manual_seed(3))
    sentences = {(1, 2), (3, 4, 5), (6,)}
    assert sorted(perm) == [1, 2, 3, 4, 5, 6]
    parts, i = [], 0
    for s in sorted(sentences, key=lambda s: perm.index(s[0])):
        assert tuple(perm[i:i + len(s)]) == s
        parts.append(s)
        i += len(s)


def test_collate_span_mode(tokenizer):
    col = DenoiseCollator(tokenizer, DenoiseConfig(noise_density=0.15, mean_span_length=3.0))
    rows = [{"input_ids": tokenizer("The red fox runs to the river in the morning and the owl sings.",
                                    add_special_tokens=False)["input_ids"]}, {"input_ids": [50, 51, 52, 53]}]
    batch = col(rows, generator=torch.Generator().manual_seed(0))
    sents = set(sentinel_ids(tokenizer))
    lab = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    inp = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert lab[0] in sents and lab[-1] == tokenizer.eos_token_id and inp[-1] == tokenizer.eos_token_id
    assert [t for t in inp if t in sents] == [t for t in lab if t in sents]  # same sentinels, same order
    # reconstruct: fill each sentinel of the input with its span from the target
    spans, cur = {}, None
    for t in lab[:-1]:
        if t in sents:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    rebuilt = [x for t in inp[:-1] for x in (spans[t] if t in sents else [t])]
    assert rebuilt == rows[0]["input_ids"]
    assert (batch["labels"][1] == IGNORE_INDEX).sum() > 0  # the short row's labels are padded with -100


def test_collate_infill_mode_target_is_original(tokenizer):
    col = DenoiseCollator(tokenizer, DenoiseConfig(mode="infill", permute_sentences=True))
    ids = tokenizer("Anna likes bread. The fox sleeps. Ben walks.", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    batch = col([{"input_ids": ids}])
    assert batch["labels"][0].tolist() == ids + [tokenizer.eos_token_id]
    assert tokenizer.mask_token_id in batch["input_ids"][0].tolist()


def test_loss_on_t5(tokenizer):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="t5-tiny"), task="seq2seq", tokenizer=tokenizer, seed=0)
    obj = Denoise()
    ds = obj.build_dataset(["The red fox runs to the river in the morning."] * 6, tokenizer, 24)
    torch.manual_seed(0)
    batch = obj.collate(tokenizer)(ds[:2])
    out = obj.loss(model, batch)
    assert int(out.n_targets) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert torch.isfinite(out.loss_sum)


def test_check_messages(tokenizer):
    with pytest.raises(ConfigError, match="encoder-decoder"):
        Denoise().check("bert", tokenizer)
    Denoise().check("t5", tokenizer)
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    no_sent = train_tokenizer(["some text here"] * 10, TokenizerConfig(vocab_size=300, min_frequency=1))
    with pytest.raises(ConfigError, match="sentinels=32"):
        Denoise().check("t5", no_sent)
    Denoise(DenoiseConfig(mode="infill")).check("t5", no_sent)
    no_sent.pad_token = None
    with pytest.raises(ConfigError, match="pad token"):
        Denoise(DenoiseConfig(mode="infill")).check("t5", no_sent)
