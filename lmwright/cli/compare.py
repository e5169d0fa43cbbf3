"""``lmwright compare -c cfg.yaml methods=full,lora,qlora,...``: train one sft/classify config once per
method on the same data, model and budget; write a decision table (markdown + HTML) with plots."""

from __future__ import annotations

from lmwright.cli._common import add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="train a config with several methods and compare them",
        description="Train one sft or classify config once per method (methods=full,freeze,lora,qlora,prefix,"
                    "adapter,ia3,qat; qlora = lora + model.quantize=nf4) and write compare.md, compare.json and "
                    "report.html: trainable %%, peak memory, tokens/s, wall time, size of final/ and the "
                    "validation metrics.")
    add_config_args(p)
    p.set_defaults(func=run_compare)


def run_compare(args) -> int:
    from lmwright.stages.compare import run_compare as compare

    out = compare(args.config, args.overrides)
    print(f"compare folder: {out}")
    return 0
