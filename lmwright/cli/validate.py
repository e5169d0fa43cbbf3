"""``lmwright validate -c cfg.yaml``: check a config (keys, values, files, model/objective/method
compatibility) without training."""

from __future__ import annotations

from lmwright.cli._common import add_config_args


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a config without training",
                       description="Check a stage config: unknown keys, bad values, missing files, and "
                                   "combinations that cannot work. The stage comes from the file's `stage:` key "
                                   "or --stage.")
    add_config_args(p)
    p.add_argument("--stage", help="stage id when the config has no `stage:` key")
    p.set_defaults(func=run_validate)


def run_validate(args) -> int:
    from lmwright.config import ConfigError, load_config, merge_sources
    from lmwright.stages import STAGES

    if not args.config and not args.stage:
        raise ConfigError("give a config file with -c (and/or --stage)")
    raw, _ = merge_sources(args.config, args.overrides)
    name = args.stage or raw.get("stage")
    if not name:
        raise ConfigError(f"{args.config[-1]}: no `stage:` key; add one (e.g. stage: pretrain) or pass --stage")
    stage = STAGES.get(name)
    cfg = load_config(stage.Config, args.config, args.overrides)
    stage.check(cfg)
    print(f"ok: {', '.join(args.config) or '(defaults)'} is a valid {name} config")
    return 0
