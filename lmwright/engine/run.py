"""The run folder: ``config.yaml``, ``run.json``, ``metrics.jsonl``, ``checkpoints/``, ``final/``,
``report.html``. Only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lmwright", "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Run:
    dir: Path
    stage: str
    is_main: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, output_dir: str, run_name: str | None, stage: str, is_main: bool = True) -> Run:
        name = run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        d = Path(output_dir) / name
        if is_main:
            (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        return cls(dir=d, stage=stage, is_main=is_main)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.jsonl"

    def write_config(self, cfg: Any) -> None:
        from lmwright.config import dump_yaml

        if self.is_main:
            dump_yaml(cfg, self.dir / "config.yaml")

    def write_info(self, **extra: Any) -> None:
        """Merge ``extra`` into run.json (versions, git sha, hardware are added on the first call)."""
        if not self.is_main:
            return
        f = self.dir / "run.json"
        if not self.info and f.exists():
            self.info = json.loads(f.read_text(encoding="utf-8"))
        if "versions" not in self.info:
            from lmwright.utils.hardware import describe

            self.info.update(stage=self.stage, created=time.strftime("%Y-%m-%dT%H:%M:%S"), git_sha=git_sha(),
                             versions=versions(), hardware=describe())
        self.info.update(extra)
        tmp = f.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.info, indent=2, default=str))
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename publishes it
        os.replace(tmp, f)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
