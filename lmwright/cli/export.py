"""``lmwright export``: a run (or any model folder) to hf / onnx / gguf, with an automatic parity check.

``lmwright export merge --model RUN --to DIR`` is an alias of ``--format hf`` (fold the adapter in).
"""

from __future__ import annotations

import argparse


def _add_common(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="run folder, checkpoint folder, Hugging Face or adapter folder")
    p.add_argument("--to", required=required, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--atol", type=float, default=None,
                   help="parity tolerance override (scaled by the output magnitude); default by format")


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to hf (merged safetensors), onnx or gguf, with a parity check",
                       description="Export a model; every export is followed by a parity check against the "
                                   "source, and a failed check leaves nothing behind.")
    _add_common(p, required=False)  # checked in run_export: `export merge --model ...` fills them later
    p.add_argument("--format", default="hf", choices=["hf", "onnx", "gguf"], help="artefact format (default hf)")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "q8_0"], help="gguf: weight type")
    p.set_defaults(func=run_export)
    inner = p.add_subparsers(dest="export_verb", metavar="<merge>")
    m = inner.add_parser("merge", help="fold an adapter into its base and write a plain Hugging Face folder "
                                       "(same as --format hf)")
    _add_common(m)
    m.set_defaults(func=run_export, format="hf", gguf_type="f16")


def run_export(args) -> int:
    from lmwright.config import ConfigError
    from lmwright.export import export

    if not args.model or not args.to:
        raise ConfigError("lmwright export needs --model RUN and --to DIR")
    opts = {"gguf_type": args.gguf_type} if args.format == "gguf" else {}
    if args.atol is not None:
        opts["atol"] = args.atol
    export(args.model, args.to, args.format, overwrite=args.overwrite, **opts)
    return 0
