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

    @classmethod
    def start(cls, cfg: Any, stage: str, manifest: dict | None = None, is_main: bool = True) -> Run:
        """The run folder of a stage config, checked before anything is written into it.

        Without ``train.run_name`` the newest unfinished run of the same config and data is resumed (with
        ``train.resume`` auto or force), else a new ``<stage>-<timestamp>`` folder is made. Resuming a run
        whose config or data changed raises :class:`ResumeError` naming the changes, unless
        ``train.resume=force``; then the original config stays next to the new one. Writes ``config.yaml`` and
        the data manifest hash in run.json."""
        t = cfg.train
        data_sha = manifest_sha256(manifest) if manifest is not None else None
        name = t.run_name or resume_candidate(t.output_dir, stage, cfg, data_sha)
        run = cls.create(t.output_dir, name, stage, is_main=is_main)
        if is_main:
            run._check_resume(cfg, data_sha)
            run.write_config(cfg)
            if data_sha is not None:
                run.write_info(data_manifest_sha256=data_sha)
        return run

    def _check_resume(self, cfg: Any, data_sha: str | None) -> None:
        from lmwright.engine.checkpoint import ResumeError, list_checkpoints

        old_cfg = self.dir / "config.yaml"
        if cfg.train.resume == "never" or not list_checkpoints(self.checkpoints) or not old_cfg.exists():
            return  # nothing to resume (resume=never with checkpoints is refused by the loop)
        changes = config_changes(old_cfg, cfg)
        old_sha = self._read_info().get("data_manifest_sha256")
        if data_sha is not None and old_sha is not None and old_sha != data_sha:
            changes.append(f"data: manifest sha256 {old_sha[:12]}... -> {data_sha[:12]}...")
        if not changes:
            return
        if cfg.train.resume != "force":
            shown = "; ".join(changes[:8]) + (f" (+{len(changes) - 8} more)" if len(changes) > 8 else "")
            raise ResumeError(f"{self.dir} was started with another config or data, so resuming it would not "
                              f"continue the same run: {shown}. Use a new train.run_name, or train.resume=force "
                              f"to continue anyway (the original config is kept next to the new one)")
        keep = self.dir / "config.original.yaml"
        if keep.exists():  # a second forced change: keep every earlier config
            keep = self.dir / f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        os.replace(old_cfg, keep)
        self.write_info(resumed_with_changes=changes)
        from lmwright.utils.logging import get_logger

        get_logger("lmwright.engine").warning("train.resume=force: resuming %s with changes (%s); the original "
                                              "config is %s", self.dir, "; ".join(changes), keep.name)

    def _read_info(self) -> dict[str, Any]:
        f = self.dir / "run.json"
        try:
            return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
        except (OSError, ValueError):
            return {}

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


# train options a resume may change: how often to log, evaluate and save, and how to show progress. Any
# other change (model, method, data, objective, schedule, seed...) means another run.
RESUME_FREE_KEYS = frozenset(f"train.{k}" for k in (
    "run_name", "resume", "output_dir", "progress", "tensorboard", "log_every", "eval_every", "eval_max_batches",
    "save_every", "keep_last", "early_stopping_patience", "load_best_at_end", "compile", "mixed_precision"))


def manifest_sha256(manifest: dict) -> str:
    """The data's identity: the manifest's own sha256, else a hash of the manifest itself."""
    import hashlib

    return manifest.get("sha256") or hashlib.sha256(
        json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(old_file: Path, cfg: Any) -> list[str]:
    """``key: old -> new`` for every option that differs between a run's config.yaml and ``cfg``, except
    :data:`RESUME_FREE_KEYS`. A config.yaml that does not read back counts as one change."""
    import yaml

    from lmwright.config import to_dict

    try:
        old = _flat(yaml.safe_load(old_file.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError) as e:
        return [f"{old_file.name} does not read back ({type(e).__name__})"]
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # the same YAML round trip config.yaml had
    keys = sorted((set(old) | set(new)) - RESUME_FREE_KEYS)
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]


def resume_candidate(output_dir: str | Path, stage: str, cfg: Any, data_sha: str | None) -> str | None:
    """Without a run name, "run the same command again" resumes: the newest unfinished ``<stage>-*`` run
    (checkpoints, no final/) in ``output_dir`` with the same config and data; None when there is none or
    ``train.resume`` is not auto/force."""
    from lmwright.engine.checkpoint import list_checkpoints

    if cfg.train.resume not in ("auto", "force"):
        return None
    root = Path(output_dir)
    runs = sorted((d for d in root.glob(f"{stage}-*") if d.is_dir()), key=lambda d: d.stat().st_mtime,
                  reverse=True) if root.is_dir() else []
    for d in runs:
        if (d / "final").exists() or not list_checkpoints(d / "checkpoints") or not (d / "config.yaml").exists():
            continue
        if config_changes(d / "config.yaml", cfg):
            continue
        info = Run(dir=d, stage=stage)._read_info()
        if data_sha is not None and info.get("data_manifest_sha256") not in (None, data_sha):
            continue
        from lmwright.utils.logging import get_logger

        get_logger("lmwright.engine").warning("resuming the unfinished run %s (same config and data); "
                                              "train.resume=never starts a new run", d)
        return d.name
    return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
