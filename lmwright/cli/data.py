"""``lmwright data ...``: prepare data sets (here) and train tokenizers (``_data_tokenizer``).

This module creates the ``data`` verb and its sub-verb group; other sub-verbs register themselves
into that group from their own module, so adding one does not touch this file beyond one call.
"""

from __future__ import annotations

import os

from lmwright.cli._common import IntermixedParser as _IntermixedParser
from lmwright.cli._common import add_config_args, subparser


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare data sets and train tokenizers",
                       description="prepare data sets and train tokenizers")
    data_sub = p.add_subparsers(dest="data_verb", metavar="<sub-verb>", parser_class=_IntermixedParser)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    register_prepare(data_sub)
    try:
        from lmwright.cli._data_tokenizer import register_tokenizer
    except ModuleNotFoundError as e:  # only the module itself may be missing, not its imports
        if e.name != "lmwright.cli._data_tokenizer":
            raise
    else:
        register_tokenizer(data_sub)


def register_prepare(data_sub) -> None:
    from lmwright.data.prepare import DataPrepareConfig

    p = subparser(data_sub, "prepare", "read, validate, clean, deduplicate and split data into a prepared "
                  "folder (train.jsonl, validation.jsonl, rejects.jsonl, manifest.json)", DataPrepareConfig)
    add_config_args(p)
    p.add_argument("--out", "-o", help="output folder (same as out=...)")
    p.add_argument("--format", "-f", help="record format (same as data.format=...)")
    p.add_argument("--on-error", choices=["raise", "skip"], help="same as data.on_error=...")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")
    p.add_argument("--input", "-i", action="append", default=[], metavar="PATH",
                   help="input file, folder or glob (repeatable; same as data.path=[...]); existing paths "
                        "given as positional arguments count as inputs too")
    p.set_defaults(func=run_prepare)


def _split_positionals(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are overrides (key=value) unless they name an existing path or a glob."""
    overrides, inputs = [], []
    for item in items:
        if os.path.exists(item) or "=" not in item:
            inputs.append(item)
        else:
            overrides.append(item)
    return overrides, inputs


def run_prepare(args) -> int:
    from lmwright.config import load_config
    from lmwright.data.prepare import DataPrepareConfig, prepare, summary

    overrides, inputs = _split_positionals(args.overrides)
    cfg = load_config(DataPrepareConfig, args.config, overrides)
    # Flags win over files and overrides; set after loading so paths are taken literally.
    if args.input or inputs:
        cfg.data.path = [*args.input, *inputs]
    if args.out:
        cfg.out = args.out
    if args.format:
        cfg.data.format = args.format
    if args.on_error:
        cfg.data.on_error = args.on_error
    if args.overwrite:
        cfg.overwrite = True
    manifest = prepare(cfg.data, cfg.out, overwrite=cfg.overwrite)
    print(f"prepared {summary(manifest, cfg.out)}")
    return 0
