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


def stage_names() -> list[str]:
    """Stage modules in lmwright/stages (a stage's name is its module's name), found without importing
    them: `lmwright --help` must not load torch."""
    import pkgutil

    import lmwright.stages as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name not in ("common", "compare"))


def _lazy_help(stage: str):
    import argparse

    class StageHelp(argparse.Action):
        """-h/--help that imports the stage only when asked, to list every config option."""

        def __init__(self, option_strings, dest, **kw):
            super().__init__(option_strings, dest, nargs=0, help="show this help with every config option and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            from lmwright.stages import STAGES

            parser.epilog = config_epilog(STAGES.get(stage).Config)
            parser.print_help()
            parser.exit()

    return StageHelp


def register(sub) -> None:
    import argparse

    from lmwright.cli._common import IntermixedParser

    p = sub.add_parser("train", help="train a stage: " + ", ".join(STAGE_HELP),
                       description="Train a stage. Every option is a config key: set it in a -c YAML file or "
                                   "as key=value (see `lmwright train <stage> --help`).")
    stages = p.add_subparsers(dest="stage", metavar="<stage>", parser_class=IntermixedParser)
    for name in stage_names():
        sp = stages.add_parser(name, help=STAGE_HELP.get(name, name), description=STAGE_HELP.get(name, name),
                               formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
        sp.add_argument("-h", "--help", action=_lazy_help(name))
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
    # the worker learns the process count from the override (torchrun's own parser would read a
    # trailing "--nproc=N" as an ambiguous abbreviation of its --nproc-per-node and exit)
    argv += list(args.overrides) + [f"train.nproc={args.nproc}"]
    if not any(o.startswith("train.run_name=") for o in args.overrides):
        argv.append(f"train.run_name={_run_name(args)}")  # one folder for every rank
    try:
        torchrun(argv)
    except SystemExit as e:  # torchrun exits on failure; surface its code
        return int(e.code or 0)
    return 0


def _run_name(args) -> str:
    """The run folder all ranks of a launch share: the newest unfinished run of this config, else a new
    ``<stage>-<timestamp>`` (each rank naming its own could straddle a second)."""
    import time

    from lmwright.config import load_config
    from lmwright.engine.run import resume_candidate
    from lmwright.stages import STAGES

    cfg = load_config(STAGES.get(args.stage).Config, args.config, [*args.overrides, f"train.nproc={args.nproc}"])
    return resume_candidate(cfg.train.output_dir, args.stage, cfg, None) or \
        f"{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
