"""``lmwright models``: the named presets and their sizes."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list model presets (built from config, no download)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size used for the parameter counts")
    p.set_defaults(func=run_models)


def run_models(args) -> int:
    from lmwright.models.presets import PRESETS, estimate_params, preset_names

    print(f"{'preset':<12} {'family':<7} {'params':>9}  about (params at vocab {args.vocab_size})")
    for name in preset_names():
        p = PRESETS[name]
        n = estimate_params(name, args.vocab_size)
        print(f"{name:<12} {p['family']:<7} {n / 1e6:>8.2f}M  {p['about']}")
    print("\nAny local Hugging Face model folder (or lmwright run folder) works as model.name too.")
    return 0
