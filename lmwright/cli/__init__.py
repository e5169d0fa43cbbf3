"""The ``lmwright`` command line: parse arguments, call a stage or a tool; no logic here.

Every module in this package exposes ``register(subparsers)`` and is discovered automatically, so a
new verb is a new file. Imports of heavy libraries happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from lmwright import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmwright",
        description="lmwright: data -> tokenizer -> pretrain -> fine-tune -> align -> evaluate -> export -> serve",
    )
    parser.add_argument("--version", action="version", version=f"lmwright {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    pkg = importlib.import_module(__name__)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from lmwright.config import ConfigError
    from lmwright.utils.logging import quiet_third_party

    quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from lmwright.registry import RegistryError

        # by class name (the MRO, so subclasses too): importing their modules here would load torch
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, RegistryError) or names & {"DataError", "TokenizerError", "ExportError", "ResumeError"}:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if "TrainingDiverged" in names:
            print(f"error: training diverged: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
