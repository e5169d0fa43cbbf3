"""Shared argparse helpers: config files, overrides, and --help drawn from config fields."""

from __future__ import annotations

import argparse


class IntermixedParser(argparse.ArgumentParser):
    """Let positionals (inputs, key=value overrides) come after options too.

    Plain argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``prepare in.jsonl --format alpaca data.val_fraction=0.1`` would fail on the last word. The
    intermixed parse calls ``parse_known_args`` itself, hence the re-entrancy flag.
    """

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def config_epilog(cls) -> str:
    from lmwright.config import iter_options

    lines = ["config options (set in a -c YAML file or as key=value):"]
    for key, tname, default, help_ in iter_options(cls):
        lines.append(f"  {key:<34} {help_} [{tname}, default {default!r}]")
    return "\n".join(lines)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config file (repeatable; later files win)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=1e-3 model.name=llama-tiny")


def subparser(sub, name: str, help: str, cls=None, **kw) -> argparse.ArgumentParser:
    epilog = config_epilog(cls) if cls is not None else None
    return sub.add_parser(name, help=help, description=help, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
