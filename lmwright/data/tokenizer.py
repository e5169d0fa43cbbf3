"""Tokenizer training with the ``tokenizers`` library: byte-level BPE (default), Unigram, WordPiece.

The result is a folder that ``AutoTokenizer.from_pretrained`` loads, with lmwright's special tokens
and the default chat template (``lmwright.data.chat``), the single source of truth for how a
conversation becomes tokens in training and in serving.

Round-trip: byte-level BPE is lossless for any text (it works on UTF-8 bytes); Unigram round-trips
every text made of characters seen in training (unseen characters become <unk>); WordPiece is
BERT-style and, like BERT, does not preserve whitespace exactly (use it for encoders).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmwright.config import ConfigError, opt
from lmwright.data.chat import CHAT_TEMPLATE, IM_END, IM_START

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
CORE_SPECIALS = [PAD, UNK, BOS, EOS, MASK, IM_START, IM_END]


def sentinel_tokens(n: int) -> list[str]:
    """T5-style sentinels ``<extra_id_0>`` ... used by span-corruption denoising."""
    return [f"<extra_id_{i}>" for i in range(n)]


@dataclass
class TokenizerConfig:
    type: Literal["bpe", "unigram", "wordpiece"] = opt("bpe", "tokenizer model: byte-level BPE, Unigram or WordPiece")
    vocab_size: int = opt(8000, "target vocabulary size (special tokens included)")
    min_frequency: int = opt(2, "minimum pair/piece frequency to enter the vocabulary (BPE, WordPiece)")
    sentinels: int = opt(0, "number of <extra_id_N> sentinel tokens to add (T5 span corruption needs them)")
    add_bos: bool = opt(True, "prepend <s> when encoding plain text")
    lowercase: bool = opt(False, "lowercase input (WordPiece/BERT style)")
    model_max_length: int = opt(2048, "maximum sequence length recorded in the tokenizer")
    chat_template: str | None = opt(None, "Jinja chat template; default: lmwright's ChatML template")
    max_texts: int | None = opt(None, "train on at most this many texts")

    def check(self) -> None:
        if self.vocab_size < 64:
            raise ConfigError(f"tokenizer.vocab_size = {self.vocab_size} is too small; use at least 64")


class TokenizerError(ValueError):
    pass


def _limit(texts: Iterable[str], n: int | None) -> Iterator[str]:
    for i, t in enumerate(texts):
        if n is not None and i >= n:
            return
        if t:
            yield t


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig | None = None, out_dir: str | Path | None = None):
    """Train a tokenizer on ``texts``; return a ``PreTrainedTokenizerFast`` (saved to ``out_dir`` if given)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = cfg or TokenizerConfig()
    specials = CORE_SPECIALS + sentinel_tokens(cfg.sentinels)
    texts = list(_limit(texts, cfg.max_texts))
    if not texts:
        raise TokenizerError("no text to train the tokenizer on: the data is empty after cleaning")
    norm = [normalizers.NFC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])

    if cfg.type == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif cfg.type == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
        trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, unk_token=UNK,
                                          show_progress=False, max_piece_length=16)
    elif cfg.type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                            special_tokens=specials, show_progress=False)
    else:  # pragma: no cover - Literal-checked by the config loader
        raise ConfigError(f"unknown tokenizer.type {cfg.type!r}")

    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if cfg.add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B", special_tokens=[(BOS, bos_id), (EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END] + sentinel_tokens(cfg.sentinels),
        model_max_length=cfg.model_max_length, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = cfg.chat_template or CHAT_TEMPLATE
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


def check_round_trip(tokenizer, texts: Iterable[str]) -> list[str]:
    """Texts that do not decode back exactly (empty list = all round-trip)."""
    bad = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids) != t:
            bad.append(t)
    return bad
