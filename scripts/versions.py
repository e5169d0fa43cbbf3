"""The tested set of versions: write it, or compare what is installed with it.

    python scripts/versions.py --freeze                    # the lock file's text, from this environment
    python scripts/versions.py --against constraints.txt   # installed vs locked; exit 1 if any differ

The lock pins every installed distribution except lmwright itself, torch (setup.sh chooses the CPU or
CUDA build) and the CUDA runtime wheels that come with a CUDA torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

UNLOCKED = re.compile(r"^(lmwright|torch|triton|nvidia-.*|pip|setuptools|wheel)$")
HEADER = ("# The tested set of versions: `bash scripts/setup.sh` installs through it (pip -c).\n"
          "# Written by `bash scripts/lock.sh` after the test suite passed on these versions; see that script\n"
          "# to move it forward. torch is chosen by setup.sh (CPU or CUDA build).\n")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and not UNLOCKED.match(canonical(name)):
            out[canonical(name)] = dist.version
    return out


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def drift(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    """Lines 'name: installed X, locked Y' for every locked package whose installed version differs."""
    lines = []
    for name, version in sorted(lock.items()):
        now = have.get(name)
        if now != version:
            lines.append(f"{name}: installed {now or 'none'}, locked {version}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freeze", action="store_true", help="print the lock file's text")
    ap.add_argument("--against", type=Path, help="compare installed versions with this lock file")
    args = ap.parse_args(argv)
    if args.freeze:
        sys.stdout.write(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(installed().items())))
        return 0
    if args.against:
        if not args.against.exists():
            print(f"{args.against}: no lock file")
            return 1
        lines = drift(read_lock(args.against), installed())
        print("\n".join(lines) if lines else f"every package matches {args.against}")
        return 1 if lines else 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
