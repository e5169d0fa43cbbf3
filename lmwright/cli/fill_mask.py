"""``lmwright fill-mask --model RUN "Beijing is the <mask> of China"``: a masked LM's top predictions."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("fill-mask", help="predict the <mask> tokens of a text with a masked LM (objective=mlm)",
                       description="Print the most likely tokens for every <mask> in each text. --model is a run "
                                   "folder, a checkpoint folder or a Hugging Face masked-LM folder.")
    p.add_argument("--model", required=True, help="run folder, checkpoint or model folder")
    p.add_argument("--top-k", type=int, default=5, help="predictions per mask")
    p.add_argument("texts", nargs="+", help='texts with <mask>, e.g. "The capital of Norland is <mask>."')
    p.set_defaults(func=run_fill_mask)


def run_fill_mask(args) -> int:
    from lmwright.objectives.mlm import fill_mask
    from lmwright.serve.api import load

    lm = load(args.model, task="masked-lm")  # the loader every command uses (load_trained)
    model, tokenizer = lm.model, lm.tokenizer
    for text in args.texts:
        print(text)
        for k, preds in enumerate(fill_mask(model, tokenizer, text, args.top_k)):
            print(f"  mask {k}: " + "  ".join(f"{tok!r} {p:.3f}" for tok, p in preds))
    return 0
