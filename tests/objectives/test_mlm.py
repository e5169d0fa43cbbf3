"""MLM masking maths on fixed inputs: rates, the 80/10/10 split, special tokens, whole words, labels."""

from __future__ import annotations

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.data import corruption
from lmwright.objectives.base import IGNORE_INDEX
from lmwright.objectives.mlm import MaskedLM, MLMCollator, MLMConfig

V, MASK = 100, 3
SPECIAL = torch.zeros(V, dtype=torch.bool)
SPECIAL[:5] = True  # ids 0..4 are special (pad, unk, bos, mask, eos)


def test_masking_rates_and_split():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (400, 50), generator=g)  # (B, T) all ordinary tokens
    ids[:, 0] = 2  # bos
    ids[:, -1] = 4  # eos
    out, labels = corruption.mlm_mask(ids, SPECIAL, MASK, V, 0.15, generator=g)
    sel = labels != IGNORE_INDEX
    ordinary = ~SPECIAL[ids]
    assert abs(sel.sum().item() / ordinary.sum().item() - 0.15) < 0.01
    assert not sel[:, 0].any() and not sel[:, -1].any()  # special tokens never selected
    assert torch.equal(labels[sel], ids[sel])  # labels hold the original ids
    assert torch.equal(out[~sel], ids[~sel])  # unselected tokens untouched
    n = sel.sum().item()
    masked = (out[sel] == MASK).sum().item() / n
    kept = (out[sel] == ids[sel]).sum().item() / n
    rand = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 + 1 / V and abs(rand - 0.1) < 0.02
    assert not SPECIAL[out[sel & (out != MASK)]].any()  # random replacements are ordinary tokens


def test_whole_word_masking_selects_all_pieces_of_a_word():
    # tokens: 10 11 | 12 | 13 14 15 | 16 ; continuation tokens: 11, 14, 15 (id -> start flag)
    starts = torch.ones(V, dtype=torch.bool)
    starts[[11, 14, 15]] = False
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 4]]).repeat(2000, 1)  # (B, T)
    out, labels = corruption.mlm_mask(ids, SPECIAL, MASK, V, 0.3, word_starts=starts,
                                      generator=torch.Generator().manual_seed(1))
    sel = labels != IGNORE_INDEX
    assert torch.equal(sel[:, 1], sel[:, 2])  # word "10 11"
    assert torch.equal(sel[:, 4], sel[:, 5]) and torch.equal(sel[:, 5], sel[:, 6])  # word "13 14 15"
    assert not sel[:, 0].any() and not sel[:, 8].any()
    words = sel[:, [1, 3, 4, 7]].float().mean().item()  # each word selected with p = 0.3
    assert abs(words - 0.3) < 0.02


def test_word_start_tables(tokenizer):
    table = corruption.word_start_table(tokenizer)
    vocab = tokenizer.get_vocab()
    assert table[vocab["Ġthe"]]
    cont = [i for t, i in vocab.items() if not t.startswith("Ġ") and i not in tokenizer.all_special_ids]
    assert cont and not table[cont].any()  # no 'Ġ': continues the previous word
    assert all(table[i] for i in tokenizer.all_special_ids)

    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    wp = train_tokenizer(["the cats are running happily", "the dogs were jumping"] * 20,
                         TokenizerConfig(type="wordpiece", vocab_size=70, min_frequency=1))
    wt = corruption.word_start_table(wp)
    for tok, i in wp.get_vocab().items():
        assert bool(wt[i]) == (not tok.startswith("##"))


def test_collate_uses_global_rng_and_pads(tokenizer):
    col = MLMCollator(tokenizer, MLMConfig())
    rows = [{"input_ids": tokenizer("The red fox runs to the river.")["input_ids"]},
            {"input_ids": tokenizer("Anna likes bread.")["input_ids"]}]
    torch.manual_seed(5)
    a = col(rows)
    torch.manual_seed(5)
    b = col(rows)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    short = len(rows[1]["input_ids"])
    assert a["attention_mask"][1, short:].sum() == 0
    assert (a["labels"][1, short:] == IGNORE_INDEX).all()  # padding never a target


def test_loss_counts_only_masked_positions(tokenizer):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="bert-tiny"), task="masked-lm", tokenizer=tokenizer, seed=0)
    obj = MaskedLM()
    ds = obj.build_dataset(["The red fox runs to the river in the morning."] * 4, tokenizer, 16, packing=True)
    assert all(len(r["input_ids"]) == 16 for r in ds[:-1])
    torch.manual_seed(0)
    batch = obj.collate(tokenizer)(ds)
    out = obj.loss(model, batch)
    assert int(out.n_targets) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert 0 <= float(out.metrics["acc"]) <= int(out.n_targets)


def test_check_rejects_bad_models_and_tokenizers(tokenizer):
    with pytest.raises(ConfigError, match="encoder"):
        MaskedLM().check("llama", tokenizer)
    MaskedLM().check("bert", tokenizer)
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(["some text here"] * 10, TokenizerConfig(vocab_size=300, min_frequency=1))
    tok.mask_token = None
    with pytest.raises(ConfigError, match="mask token"):
        MaskedLM().check("bert", tok)
    with pytest.raises(ConfigError, match="mlm.probability"):
        MLMConfig(probability=1.5).check()
