"""``lmwright embed --model RUN "text" ...``: sentence vectors of a contrastive (embedding) model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("embed", help="print sentence embeddings of texts (objective=contrastive models)",
                       description="Print one JSON line per text: the text and its L2-normalised embedding "
                                   "(the pooling saved with the model). --model is a run folder, a checkpoint "
                                   "or a sentence-transformers / Hugging Face encoder folder.")
    p.add_argument("--model", required=True, help="run folder, checkpoint or model folder")
    p.add_argument("--similarity", action="store_true", help="also print the cosine similarity matrix")
    p.add_argument("texts", nargs="+", help="texts to embed")
    p.set_defaults(func=run_embed)


def run_embed(args) -> int:
    import json

    from lmwright.objectives.contrastive import embed_texts
    from lmwright.serve.api import load

    lm = load(args.model, task="embedding")  # the loader every command uses; pooling as it was trained
    vecs = embed_texts(lm.model, lm.tokenizer, args.texts, lm.pooling)  # (N, D)
    for text, v in zip(args.texts, vecs.tolist()):
        print(json.dumps({"text": text, "embedding": [round(x, 6) for x in v]}))
    if args.similarity:
        for row in (vecs @ vecs.T).tolist():
            print(" ".join(f"{x:.3f}" for x in row))
    return 0
