"""``lmwright eval``: metrics of a model on a local data set; prints a table and writes JSON."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, classification, generation, preference, "
                                    "retrieval or lm-eval:<task>",
                       description="Evaluate a run (or any model folder) on local data; prints a table and "
                                   "writes the metrics as JSON with --out.")
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, Hugging Face or adapter folder")
    p.add_argument("--task", required=True, help="perplexity | classification | generation | preference | "
                                                 "retrieval | lm-eval:<task> (local harness task, optional extra)")
    p.add_argument("--data", required=True, nargs="+", help="data files/folders (for lm-eval: a task folder)")
    p.add_argument("--format", default=None, help="record format; default: the task's usual one")
    p.add_argument("--out", default=None, metavar="FILE", help="write the metrics to this JSON file")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many records")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of the forward passes")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity: packed row length (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation: answer length limit (default 64)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from lmwright.eval import evaluate, scalar_metrics

    opts = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                              ("max_new_tokens", args.max_new_tokens)) if v is not None}
    data = args.data if len(args.data) > 1 else args.data[0]
    metrics = evaluate(args.model, args.task, data, fmt=args.format, limit=args.limit, **opts)
    nums = scalar_metrics(metrics)
    width = max((len(k) for k in nums), default=6)
    print(f"{args.task} on {args.data[0] if len(args.data) == 1 else args.data}")
    for k, v in nums.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0
