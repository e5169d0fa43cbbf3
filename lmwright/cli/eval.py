"""``lmwright eval``: metrics of a model on a local data set; prints a table and writes JSON."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, classification, generation, preference, "
                                    "retrieval or lm-eval:<task>",
                       description="Evaluate a run (or any model folder) on local data; prints a table and "
                                   "writes the metrics as JSON with --out. Without --data, a run folder is "
                                   "evaluated on its own validation data, as its stage measured it: "
                                   "--task perplexity prints run.json's val_loss/val_ppl (pretrain, sft "
                                   "runs), "
                                   "--task generation its val_exact_match (sft runs).")
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, Hugging Face or adapter folder")
    p.add_argument("--task", required=True, help="perplexity | classification | generation | preference | "
                                                 "retrieval | lm-eval:<task> (local harness task, optional extra)")
    p.add_argument("--data", default=None, nargs="+",
                   help="data files/folders (for lm-eval: a task folder); default for a run folder: the "
                        "run's validation split (config.yaml) and the stage's measurement")
    p.add_argument("--format", default=None, help="record format; default: the task's usual one")
    p.add_argument("--out", default=None, metavar="FILE", help="write the metrics to this JSON file")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate at most this many records (without --data: validation rows / held-out "
                        "prompts)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of the forward passes")
    p.add_argument("--seq-len", type=int, default=None,
                   help="perplexity: packed row length (default 512; without --data: the run's seq_len)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation: answer length limit (default 64; without --data: the run's "
                        "max_new_tokens)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from lmwright.eval import evaluate, scalar_metrics

    opts = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                              ("max_new_tokens", args.max_new_tokens)) if v is not None}
    data = None if args.data is None else args.data if len(args.data) > 1 else args.data[0]
    metrics = evaluate(args.model, args.task, data, fmt=args.format, limit=args.limit, **opts)
    nums = scalar_metrics(metrics)
    width = max((len(k) for k in nums), default=6)
    if data is None:
        print(f"{args.task} on the validation data of {metrics['stage']} run {metrics['run']}")
    else:
        print(f"{args.task} on {data}")
    for k, v in nums.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    ref = {k: v for k, v in (metrics.get("reference") or {}).items() if k != "source"}
    if ref:
        print(f"  recorded in {metrics['reference']['source']}: "
              + ", ".join(f"{k}={v:.4f}" for k, v in ref.items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0
