"""``lmwright data tokenizer``: train a tokenizer on prepared or raw data."""

from __future__ import annotations

from dataclasses import dataclass

from lmwright.cli._common import add_config_args, subparser
from lmwright.config import opt
from lmwright.data.config import DataConfig
from lmwright.data.tokenizer import TokenizerConfig


@dataclass
class TokenizerJobConfig:
    data: DataConfig = opt(DataConfig(), "the text to train on")
    tokenizer: TokenizerConfig = opt(TokenizerConfig(), "tokenizer options")
    out: str = opt("tokenizer", "output folder (loadable by AutoTokenizer.from_pretrained)")


def register_tokenizer(data_sub) -> None:
    p = subparser(data_sub, "tokenizer", "train a tokenizer (byte-level BPE, Unigram or WordPiece)",
                  TokenizerJobConfig)
    add_config_args(p)
    p.add_argument("--out", help="output folder (same as out=...)")
    p.add_argument("--type", choices=["bpe", "unigram", "wordpiece"], help="same as tokenizer.type=...")
    p.add_argument("--vocab-size", type=int, help="same as tokenizer.vocab_size=...")
    p.add_argument("--input", action="append", default=[], help="input path(s) (same as data.path=...)")
    p.set_defaults(func=run_tokenizer)


def run_tokenizer(args) -> int:
    from lmwright.config import load_config
    from lmwright.data import FORMATS, load_records
    from lmwright.data.tokenizer import check_round_trip, train_tokenizer

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.type:
        overrides.append(f"tokenizer.type={args.type}")
    if args.vocab_size:
        overrides.append(f"tokenizer.vocab_size={args.vocab_size}")
    if args.input:
        overrides.append("data.path=[" + ",".join(f'"{i}"' for i in args.input) + "]")
    cfg = load_config(TokenizerJobConfig, args.config, overrides)
    train, val, _ = load_records(cfg.data)
    fmt = FORMATS.get(cfg.data.format)
    texts = [fmt.text_of(r) for r in train + val]
    tok = train_tokenizer(texts, cfg.tokenizer, cfg.out)
    bad = check_round_trip(tok, texts[:200]) if cfg.tokenizer.type != "wordpiece" else []
    print(f"tokenizer: {cfg.tokenizer.type}, {len(tok)} tokens, trained on {len(texts)} texts -> {cfg.out}")
    if bad:
        print(f"warning: {len(bad)} of the first 200 texts do not round-trip exactly, e.g. {bad[0][:80]!r}")
    return 0
