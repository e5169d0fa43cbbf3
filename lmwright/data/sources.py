"""Read local data into ``Record`` objects, lazily, whatever the file kind.

Supported: ``.txt`` (one record per non-empty line, per blank-line separated paragraph, or one per
file), ``.jsonl``, ``.json`` (a list of objects or ``{"data": [...]}``), ``.csv``, ``.parquet``,
folders (recursively, files with those extensions, in sorted order so reading is reproducible),
globs, a folder saved by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict) and a folder
written by ``lmwright data prepare``.

Every record keeps where it came from (``file``, ``line``) so that every later error can say
``data/train.jsonl:17: ...``. For line-oriented files ``line`` is the line number; for row-oriented
ones (csv, parquet, datasets folders, ``{"data": [...]}`` json) it is the 1-based row number.

Text files are read as UTF-8; a leading byte-order mark (Windows editors write one) is dropped.
``pyarrow`` and ``datasets`` are imported inside the readers that need them, so that importing
this module stays cheap.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmwright.data.errors import DataError

EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
MANIFEST = "manifest.json"
TxtMode = Literal["line", "paragraph", "file"]


@dataclass(frozen=True, slots=True)
class Record:
    """One raw record and where it came from (before column renaming and validation)."""

    data: dict
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ------------------------------------------------------------------------------------ discovery
def is_prepared_dir(path: str | Path) -> bool:
    """A folder written by ``lmwright data prepare`` (has its manifest and a train file)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file() and (p / "train.jsonl").is_file()


def is_datasets_dir(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file()
                           or ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()))


def source_kind(path: str | Path) -> str:
    """The reader a resolved path goes to: prepared, datasets, or its file extension without the dot."""
    p = Path(path)
    if is_prepared_dir(p):
        return "prepared"
    if is_datasets_dir(p):
        return "datasets"
    return p.suffix.lower().lstrip(".")


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve_paths(paths: Iterable[str | Path]) -> list[str]:
    """Expand folders and globs into the list of sources actually read, in a reproducible order.

    A folder that is itself a prepared folder or a datasets folder is one source; any other folder
    is walked recursively (hidden entries skipped) and contributes its supported files. Missing
    paths, unsupported extensions and empty matches are errors: silently reading nothing would
    train on nothing.
    """
    out: list[str] = []
    for raw in paths:
        s = str(raw)
        if _has_magic(s) and not os.path.exists(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"{s}: the pattern matches no file")
            found = []
            for m in matches:
                if os.path.isdir(m) and (is_prepared_dir(m) or is_datasets_dir(m)) or os.path.isfile(m) and m.lower().endswith(EXTENSIONS):
                    found.append(m)
            if not found:
                raise DataError(f"{s}: the pattern matches no supported file ({', '.join(EXTENSIONS)})")
            out += found
            continue
        p = Path(s)
        if not p.exists():
            raise DataError(f"{s}: no such file or folder")
        if p.is_dir():
            if is_prepared_dir(p) or is_datasets_dir(p):
                out.append(s)
                continue
            found = _walk(p)
            if not found:
                raise DataError(f"{s}: the folder holds no supported file ({', '.join(EXTENSIONS)})")
            out += found
            continue
        if p.suffix.lower() not in EXTENSIONS:
            raise DataError(f"{s}: unsupported file type '{p.suffix}'; use one of {', '.join(EXTENSIONS)}")
        out.append(s)
    return out


def _walk(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found


# -------------------------------------------------------------------------------------- reading
OnReject = Callable[[DataError], None]


def read_records(paths: Iterable[str | Path] | str | Path, *, txt_mode: TxtMode = "line",
                 split: Literal["train", "validation"] = "train", on_error: Literal["raise", "skip"] = "raise",
                 on_reject: OnReject | None = None) -> Iterator[Record]:
    """Yield the raw records of every source, lazily and in order.

    ``split`` picks the split of multi-split sources (a DatasetDict folder, a prepared folder).
    A record that cannot even be parsed (a malformed JSON line) raises ``DataError`` naming the
    file and line, or with ``on_error="skip"`` is passed to ``on_reject`` and skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for src in resolve_paths(paths):
        kind = source_kind(src)
        reader = _READERS[kind]
        for item in reader(src, txt_mode=txt_mode, split=split):
            if isinstance(item, DataError):
                if on_error == "raise":
                    raise item
                if on_reject is not None:
                    on_reject(item)
                continue
            yield item


def _read_txt(path: str, txt_mode: TxtMode = "line", **_) -> Iterator[Record | DataError]:
    with open(path, encoding="utf-8-sig", errors="strict", newline=None) as f:
        try:
            if txt_mode == "file":
                text = f.read()
                if text.strip():
                    yield Record({"text": text}, path, 1)
                return
            if txt_mode == "paragraph":
                buf: list[str] = []
                start = 0
                for i, line in enumerate(f, 1):
                    if line.strip():
                        if not buf:
                            start = i
                        buf.append(line)
                    elif buf:
                        yield Record({"text": "".join(buf).rstrip("\n")}, path, start)
                        buf = []
                if buf:
                    yield Record({"text": "".join(buf).rstrip("\n")}, path, start)
                return
            for i, line in enumerate(f, 1):
                text = line.rstrip("\n")
                if text.strip():
                    yield Record({"text": text}, path, i)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as "
                            "UTF-8", file=path) from None


def _read_jsonl(path: str, **_) -> Iterator[Record | DataError]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield DataError(f"{path}:{i}: invalid JSON at column {e.colno}: {e.msg}", file=path, line=i)
                continue
            if not isinstance(obj, dict):
                yield DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}",
                                file=path, line=i)
                continue
            yield Record(obj, path, i)


def _read_json(path: str, **_) -> Iterator[Record | DataError]:
    text = Path(path).read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Decode element by element so that each record keeps its real line number.
        yield from _scan_json_array(text, path)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}", file=path,
                        line=e.lineno) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        for i, item in enumerate(obj["data"], 1):
            if isinstance(item, dict):
                yield Record(item, path, i)
            else:
                yield DataError(f"{path}:{i}: data[{i - 1}] must be a JSON object, got {type(item).__name__}",
                                file=path, line=i)
        return
    raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, got "
                    f"{type(obj).__name__}" + (f" with keys {', '.join(list(obj)[:5])}" if isinstance(obj, dict)
                                               else ""), file=path)


def _scan_json_array(text: str, path: str) -> Iterator[Record | DataError]:
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    n = len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        at = line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}", file=path,
                            line=e.lineno) from None
        if isinstance(obj, dict):
            yield Record(obj, path, at)
        else:
            yield DataError(f"{path}:{at}: expected a JSON object, got {type(obj).__name__}", file=path, line=at)
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        at = line_at(min(pos, n))
        raise DataError(f"{path}:{at}: invalid JSON: expected ',' or ']' after an element", file=path, line=at)


def _read_csv(path: str, **_) -> Iterator[Record | DataError]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                yield DataError(f"{path}:{start}: the row has more cells than the header has columns",
                                file=path, line=start)
            elif any(v is None for v in row.values()):
                yield DataError(f"{path}:{start}: the row has fewer cells than the header has columns",
                                file=path, line=start)
            else:
                yield Record(dict(row), path, start)
            start = reader.line_num + 1


def _read_parquet(path: str, **_) -> Iterator[Record | DataError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet: {e}", file=path) from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield Record(obj, path, row)


def _read_datasets(path: str, split: str = "train", **_) -> Iterator[Record | DataError]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        wanted = {"train": ["train"], "validation": ["validation", "valid", "val", "dev", "test"]}[split]
        pick = next((n for n in wanted if n in ds), None)
        if pick is None:
            raise DataError(f"{path}: the DatasetDict has no '{split}' split (splits: {', '.join(names)}); "
                            f"save the split you want with save_to_disk, or use val_fraction")
        ds = ds[pick]
        where = f"{path}[{pick}]"
    else:
        where = path
    for i, obj in enumerate(ds, 1):
        yield Record(dict(obj), where, i)


def _read_prepared(path: str, split: str = "train", **_) -> Iterator[Record | DataError]:
    file = os.path.join(path, f"{split}.jsonl")
    if os.path.exists(file):
        yield from _read_jsonl(file)


_READERS: dict[str, Callable[..., Iterator[Record | DataError]]] = {
    "txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
    "datasets": _read_datasets, "prepared": _read_prepared,
}
