"""``lmwright models``: the named presets and their sizes; ``lmwright models import``: a GGUF file to a
Hugging Face folder."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list model presets (built from config, no download); import a GGUF file",
                       description="Without a sub-command: list the model presets. `lmwright models import FILE.gguf "
                                   "--out DIR` writes a GGUF file as a Hugging Face folder.")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size used for the parameter counts")
    p.set_defaults(func=run_models)
    inner = p.add_subparsers(dest="models_verb", metavar="<import>")
    i = inner.add_parser("import", help="write a .gguf file as a Hugging Face folder (safetensors, dequantized, "
                                        "tokenizer + chat template, generation config)")
    i.add_argument("gguf", metavar="FILE.gguf", help="a GGUF file, or a folder holding exactly one")
    i.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype of the written folder (default float32: the GGUF weights dequantized)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    i.set_defaults(func=run_import)


def run_models(args) -> int:
    from lmwright.models.presets import PRESETS, estimate_params, preset_names

    print(f"{'preset':<12} {'family':<7} {'params':>9}  about (params at vocab {args.vocab_size})")
    for name in preset_names():
        p = PRESETS[name]
        n = estimate_params(name, args.vocab_size)
        print(f"{name:<12} {p['family']:<7} {n / 1e6:>8.2f}M  {p['about']}")
    print("\nAny local Hugging Face model folder (or lmwright run folder) works as model.name too, and so does a "
          ".gguf file\n(converted once, cached; `lmwright models import FILE.gguf --out DIR` writes the folder "
          "where you choose).")
    return 0


def run_import(args) -> int:
    from lmwright.models.gguf_import import import_gguf

    s = import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, log=print)
    tok = s["tokenizer"]
    types = ", ".join(f"{k} x{v}" for k, v in s["tensor_types"].items())
    rows = [
        ("source", f"{s['source']} ({s['architecture']}: {s['name']})"),
        ("tensors", types or "?"),
        ("model", f"{s['model_type']}, {s['params'] / 1e6:.1f}M params, {s['layers']} layers, hidden "
                  f"{s['hidden_size']}, vocab {s['vocab_size']}, context {s['context_length']}"
                  f"{', tied embeddings' if s['tie_word_embeddings'] else ''}"),
        ("rope scaling", s["rope"] or "none"),
        ("tokenizer", f"{tok['model']} (pre {tok['pre']}), {tok['size']} tokens; bos {tok['bos']}, eos {tok['eos']}, "
                      f"pad {tok['pad']}, unk {tok['unk']}; adds bos: {'yes' if tok['add_bos'] else 'no'}"),
        ("chat template", "yes" if s["chat_template"] else "none in the file"),
        ("stop ids", s["stop_token_ids"]),
        ("weights", f"{s['dtype']} safetensors"),
    ]
    print(f"imported in {s['seconds']:.1f} s -> {s['out']}")
    for k, v in rows:
        print(f"  {k:<14} {v}")
    for w in s["warnings"]:
        print(f"  warning: {w}")
    print(f"Use it as model.name={s['out']} (train, eval, serve, export).")
    return 0
