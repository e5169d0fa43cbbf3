"""Read -> rename columns -> canonicalize -> clean -> split: the one data pipeline.

``prepare`` runs it and writes a prepared folder (``train.jsonl``, ``validation.jsonl``,
``rejects.jsonl``, ``manifest.json``) atomically; ``load_records`` runs the very same code in
memory (or reads a prepared folder) and is what every training stage calls, so that a stage given
raw files and a stage given the prepared folder of those files see identical records and an
identical manifest hash.

The split is "hash-rank": every record gets a score ``blake2b(split_seed, text_of(record))`` and
the ``round(n * val_fraction)`` lowest scores (at least one when there are two or more records) go
to validation. The same record thus lands on the same side whatever the input order, identical
texts always land together (no leakage through duplicates when dedup is off), and the validation
size is exactly what was asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt, to_dict
from lmwright.data.clean import Cleaner
from lmwright.data.config import DataConfig
from lmwright.data.errors import DataError
from lmwright.data.formats import FORMATS, detect_format, rename_columns
from lmwright.data.sources import MANIFEST, is_prepared_dir, read_records, resolve_paths, source_kind
from lmwright.data.textio import has_u_escape, parse_json, read_text, surrogate_error

SPLITS = ("train", "validation")


@dataclass
class DataPrepareConfig:
    data: DataConfig = opt(DataConfig(), "what to read, how to clean and split")  # noqa: RUF009
    out: str = opt("data/prepared", "output folder (train.jsonl, validation.jsonl, rejects.jsonl, manifest.json)")
    overwrite: bool = opt(False, "replace an existing non-empty output folder")


# ------------------------------------------------------------------------------------- splitting
def split_records(records: list[dict], text_of: Callable[[dict], str], fraction: float, seed: int
                  ) -> tuple[list[dict], list[dict]]:
    """Deterministic hash-rank split (see the module docstring); both sides keep the input order."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return list(records), []
    n_val = min(n - 1, max(1, round(n * fraction)))
    prefix = f"{seed}\0".encode()
    scores = [hashlib.blake2b(prefix + text_of(r).encode("utf-8"), digest_size=8).digest() for r in records]
    val_idx = set(sorted(range(n), key=lambda i: (scores[i], i))[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


# ------------------------------------------------------------------------------------- pipeline
@dataclass
class _Outcome:
    train: list[dict]
    validation: list[dict]
    rejects: list[dict]
    reasons: Counter
    read: int
    sources: list[str]
    val_sources: list[str]


def _progress(it: Iterable, desc: str) -> Iterator:
    """A tqdm bar on an interactive terminal for runs longer than a couple of seconds; else nothing."""
    if not sys.stderr.isatty():
        yield from it
        return
    from tqdm import tqdm

    yield from tqdm(it, desc=desc, unit=" rec", delay=2.0, leave=False, mininterval=0.5)


def _check(cfg: DataConfig) -> None:
    if not cfg.path:
        raise ConfigError("data.path is empty: give the training data (files, folders, globs or a prepared "
                          "folder), e.g. data.path=data/train.jsonl")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction = {cfg.val_fraction} must be in [0, 1)")
    if cfg.max_records is not None and cfg.max_records < 1:
        raise ConfigError(f"data.max_records = {cfg.max_records} must be at least 1 (or null for all)")
    if not 0.0 < cfg.clean.near_dedup_threshold <= 1.0:
        raise ConfigError(f"data.clean.near_dedup_threshold = {cfg.clean.near_dedup_threshold} must be in (0, 1]")
    FORMATS.get(cfg.format)  # unknown format: fails with the closest name


def _resolve(paths: list[str], key: str) -> list[str]:
    """``resolve_paths``, its errors also naming the config key the paths came from."""
    try:
        return resolve_paths(paths)
    except DataError as e:
        raise DataError(f"{e} ({key})", file=e.file, line=e.line, reason=e.reason) from None


def _run(cfg: DataConfig) -> _Outcome:
    _check(cfg)
    fmt = FORMATS.get(cfg.format)
    cleaner = Cleaner(cfg.clean, fmt.text_of)
    rejects: list[dict] = []
    reasons: Counter = Counter()
    read = 0

    def reject(file: str | None, line: int | None, reason: str, message: str) -> None:
        reasons[reason] += 1
        rejects.append({"file": file, "line": line, "reason": reason, "message": message})

    def on_parse_error(err: DataError) -> None:
        nonlocal read
        read += 1
        reject(err.file, err.line, err.reason, str(err))

    def collect(paths: list[str], split: str, limit: int | None) -> list[dict]:
        nonlocal read
        kept: list[dict] = []
        records = read_records(paths, txt_mode=cfg.txt_mode, split=split,  # type: ignore[arg-type]
                               on_error=cfg.on_error, on_reject=on_parse_error)
        for rec in _progress(records, f"reading {split}"):
            read += 1
            raw = rename_columns(rec.data, cfg.columns)
            try:
                canon = fmt.canonicalize(raw, rec.where)
            except DataError as e:
                e = _suggest_format(e, raw, cfg.format)
                if cfg.on_error == "raise":
                    raise e from None
                reject(rec.file, rec.line, e.reason, str(e))
                continue
            out, reason = cleaner(canon, rec.where)
            if reason:
                reject(rec.file, rec.line, reason, f"{rec.where}: {cleaner.last_message}")
                continue
            kept.append(out)
            if limit is not None and len(kept) >= limit:
                break
        return kept

    sources = _resolve(cfg.path, "data.path")
    val_sources = _resolve(cfg.val_path, "data.val_path") if cfg.val_path else []
    if cfg.val_path:
        # Validation first: a training record that repeats a validation one is the one dropped.
        validation = collect(cfg.val_path, "validation", None)
        train = collect(cfg.path, "train", cfg.max_records)
    else:
        train, validation = split_records(collect(cfg.path, "train", cfg.max_records), fmt.text_of,
                                          cfg.val_fraction, cfg.split_seed)
    if not train:
        raise DataError(f"no training record left out of {read} read from {', '.join(cfg.path)}"
                        + (f" (rejected: {_reasons_text(reasons)}{_rule_keys(reasons)})" if reasons else ""))
    return _Outcome(train, validation, rejects, reasons, read, sources, val_sources)


def _suggest_format(err: DataError, raw: dict, fmt: str) -> DataError:
    """The error, plus the format the record looks like when that is another one (the usual cause)."""
    guess = detect_format(raw)
    if guess is None or guess == fmt:
        return err
    return DataError(f"{err} - the record looks like '{guess}' data: set data.format={guess}", file=err.file,
                     line=err.line, reason=err.reason)


_RULES = {"too_short": "data.clean.min_chars", "too_long": "data.clean.max_chars", "duplicate": "data.clean.dedup",
          "near_duplicate": "data.clean.near_dedup_threshold"}


def _rule_keys(reasons: Counter) -> str:
    keys = [key for reason, key in _RULES.items() if reasons.get(reason)]
    return f"; the cleaning options that dropped them: {', '.join(keys)}" if keys else ""


def _reasons_text(reasons: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------------------------- manifest
def _jsonl_lines(records: Iterable[dict]) -> Iterator[bytes]:
    # backslashreplace: a file name that is not UTF-8 (a reject's "file") is written as its JSON \u escape
    for r in records:
        yield (json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def _digest(records: Iterable[dict], path: Path | None = None) -> dict:
    """Serialise records as JSON lines (to ``path`` when given) and return count, bytes, sha256."""
    h = hashlib.sha256()
    n = size = 0
    f = open(path, "wb") if path is not None else None  # noqa: SIM115 - closed below
    try:
        for line in _jsonl_lines(records):
            h.update(line)
            n += 1
            size += len(line)
            if f is not None:
                f.write(line)
    finally:
        if f is not None:
            f.close()
    return {"records": n, "bytes": size, "sha256": h.hexdigest()}


def _whole_hash(files: dict) -> str:
    """The data's identity: sha256 over the train and validation file hashes (not the rejects)."""
    text = "".join(f"{name} {files[name]['sha256']}\n" for name in (f"{s}.jsonl" for s in SPLITS))
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest(cfg: DataConfig, res: _Outcome, files: dict) -> dict:
    from lmwright import __version__

    return {
        "lmwright_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "format": cfg.format,
        "sources": [{"path": p, "kind": source_kind(p)} for p in res.sources],
        "val_sources": [{"path": p, "kind": source_kind(p)} for p in res.val_sources],
        "columns": dict(cfg.columns),
        "txt_mode": cfg.txt_mode,
        "clean": to_dict(cfg.clean),
        "on_error": cfg.on_error,
        "max_records": cfg.max_records,
        "split": {"method": "val_path" if cfg.val_path else "hash-rank", "seed": cfg.split_seed,
                  "fraction": 0.0 if cfg.val_path else cfg.val_fraction},
        "counts": {"read": res.read, "kept": len(res.train) + len(res.validation), "train": len(res.train),
                   "validation": len(res.validation), "rejected": sum(res.reasons.values())},
        "rejects": dict(sorted(res.reasons.items())),
        "files": files,
        "sha256": _whole_hash(files),
    }


# ------------------------------------------------------------------------------------ public API
def prepare(cfg: DataConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Run the pipeline and write a prepared folder atomically; return its manifest.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so a crash never leaves a half-written folder that looks prepared. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    try:
        busy = out.exists() and (out.is_file() or any(out.iterdir()))
    except OSError as e:
        raise DataError(f"{out}: cannot use it as the output folder: {e.strerror or e}") from None
    if busy and not overwrite:
        raise DataError(f"{out}: already exists and is not empty; pass overwrite=true (--overwrite) or "
                        "choose another output folder")
    res = _run(cfg)
    try:
        return _write(cfg, res, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the prepared folder: {e.strerror or e}") from None


def _write(cfg: DataConfig, res: _Outcome, out: Path) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {f"{s}.jsonl": _digest(getattr(res, s), tmp / f"{s}.jsonl") for s in SPLITS}
        files["rejects.jsonl"] = _digest(res.rejects, tmp / "rejects.jsonl")
        manifest = _manifest(cfg, res, files)
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8",
                                    errors="backslashreplace")  # as in _jsonl_lines
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    if out.is_file() or out.is_symlink():
        out.unlink()
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)


def load_records(cfg: DataConfig) -> tuple[list[dict], list[dict], dict]:
    """(train, validation, manifest) for a training stage.

    A single prepared folder (and no ``val_path``) is read as it is, its files checked against its
    manifest; anything else goes through the same pipeline as :func:`prepare`, in memory, and the
    manifest is the one ``prepare`` would write (same counts, same hashes).
    """
    if len(cfg.path) == 1 and is_prepared_dir(cfg.path[0]) and not cfg.val_path:
        return _load_prepared(cfg)
    res = _run(cfg)
    files = {f"{s}.jsonl": _digest(getattr(res, s)) for s in SPLITS}
    files["rejects.jsonl"] = _digest(res.rejects)
    return res.train, res.validation, _manifest(cfg, res, files)


def _load_prepared(cfg: DataConfig) -> tuple[list[dict], list[dict], dict]:
    root = Path(cfg.path[0])
    manifest = _read_manifest(root / MANIFEST)
    if manifest.get("format") != cfg.format:
        raise DataError(f"{root}: prepared as format '{manifest.get('format')}' but data.format is "
                        f"'{cfg.format}'; set data.format={manifest.get('format')} or prepare the data again")
    splits: dict[str, list[dict]] = {}
    for s in SPLITS:
        path = root / f"{s}.jsonl"
        raw = path.read_bytes() if path.exists() else b""
        want = manifest.get("files", {}).get(f"{s}.jsonl", {}).get("sha256")
        if want and hashlib.sha256(raw).hexdigest() != want:
            raise DataError(f"{path}: changed since `lmwright data prepare` (sha256 differs from {root / MANIFEST}); "
                            "prepare the data again")
        splits[s] = _parse_jsonl(raw, str(path))
    train = splits["train"][: cfg.max_records] if cfg.max_records else splits["train"]
    return train, splits["validation"], manifest


def _read_manifest(path: Path) -> dict:
    """A prepared folder's manifest; a damaged one is a ``DataError`` that says to prepare again."""
    manifest = parse_json(read_text(path), path)
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DataError(f"{path}: not a manifest written by `lmwright data prepare` (expected an object with "
                        "format, counts and files); prepare the data again", file=str(path))
    return manifest


def _parse_jsonl(raw: bytes, where: str) -> list[dict[str, Any]]:
    out = []
    text = raw.decode("utf-8", errors="surrogateescape")
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if line.strip():
            rec = parse_json(line, where, i)
            if not isinstance(rec, dict) or (has_u_escape(line) and surrogate_error(rec, where, i)):
                raise DataError(f"{where}:{i}: not a record written by `lmwright data prepare`; prepare the data "
                                "again", file=where, line=i)
            out.append(rec)
    return out


def summary(manifest: dict, out: str | Path | None = None) -> str:
    """A few human lines about a prepared data set (printed by ``lmwright data prepare``)."""
    c = manifest["counts"]
    lines = [f"{c['kept']:,} records ({manifest['format']}) from {c['read']:,} read"
             + (f" -> {out}" if out is not None else ""),
             f"  train {c['train']:,}, validation {c['validation']:,}"]
    if c["rejected"]:
        where = f" (see {Path(out) / 'rejects.jsonl'})" if out is not None else ""
        lines.append(f"  rejected {c['rejected']:,}: {_reasons_text(Counter(manifest['rejects']))}{where}")
    lines.append(f"  sha256 {manifest['sha256']}")
    return "\n".join(lines)
