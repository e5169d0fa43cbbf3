"""``lmwright train <stage>``: run a training stage from YAML configs + key=value overrides."""

from __future__ import annotations

import os
import sys

from lmwright.cli._common import add_config_args, config_epilog

STAGE_HELP = {
    "pretrain": "pretrain a model: objective clm, mlm, denoise or contrastive",
    "sft": "instruction / chat fine-tuning of a causal LM (any method)",
    "classify": "sequence classification fine-tuning (any method)",
    "upft": "unsupervised prefix fine-tuning from unlabeled prompts",
    "reward": "train a reward model on preference pairs",
    "dpo": "direct preference optimisation (dpo, ipo, hinge, robust, simpo, orpo, kto)",
    "ppo": "RLHF with PPO against a reward model or a reward function",
    "grpo": "group-relative policy optimisation with verifiable rewards",
    "distill": "distil a teacher model into a smaller student",
}


def register(sub) -> None:
    import argparse

    p = sub.add_parser("train", help="train a stage: " + ", ".join(STAGE_HELP),
                       description="Train a stage. Every option is a config key: set it in a -c YAML file or "
                                   "as key=value (see `lmwright train <stage> --help`).")
    from lmwright.cli._common import IntermixedParser

    stages = p.add_subparsers(dest="stage", metavar="<stage>", parser_class=IntermixedParser)
    from lmwright.stages import STAGES

    for name in STAGES.names():
        stage = STAGES.get(name)
        sp = stages.add_parser(name, help=STAGE_HELP.get(name, name), description=STAGE_HELP.get(name, name),
                               epilog=config_epilog(stage.Config),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(sp)
        sp.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes (torchrun underneath; gloo on CPU, nccl on GPU)")
        sp.set_defaults(func=run_stage)
    p.set_defaults(func=lambda a: p.print_help())


def run_stage(args) -> int:
    from lmwright.config import load_config
    from lmwright.stages import STAGES

    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args)
    stage = STAGES.get(args.stage)
    cfg = load_config(stage.Config, args.config, args.overrides)
    if args.nproc > 1:
        cfg.train.nproc = args.nproc
    out = stage.run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {out}")
    return 0


def launch(args) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes (DDP)."""
    from torch.distributed.run import main as torchrun

    argv = ["--standalone", f"--nproc_per_node={args.nproc}", "-m", "lmwright.cli", "train", args.stage]
    for c in args.config:
        argv += ["-c", c]
    argv += list(args.overrides) + [f"--nproc={args.nproc}"]
    try:
        torchrun(argv)
    except SystemExit as e:  # torchrun exits on failure; surface its code
        return int(e.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
