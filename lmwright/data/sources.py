"""Read local data into ``Record`` objects, lazily, whatever the file kind.

Supported: ``.txt`` (one record per non-empty line, per blank-line separated paragraph, or one per
file), ``.jsonl``, ``.json`` (a list of objects or ``{"data": [...]}``), ``.csv``, ``.parquet``,
folders (recursively, files with those extensions, in sorted order so reading is reproducible),
globs, a folder saved by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict), a folder
written by ``lmwright data prepare`` and a data set named in a LLaMA-Factory ``dataset_info.json``
(``path/to/dataset_info.json:<name>`` or ``path/to/folder:<name>``, see :func:`llamafactory_spec`).

Every record keeps where it came from (``file``, ``line``) so that every later error can say
``data/train.jsonl:17: ...``. For line-oriented files ``line`` is the line number; for row-oriented
ones (csv, parquet, datasets folders, ``{"data": [...]}`` json) it is the 1-based row number.

Text files are read as UTF-8; a leading byte-order mark (Windows editors write one) is dropped. A
byte that is not UTF-8, JSON nested too deeply and a csv field over the csv module's limit are errors
of the record (line) they are in, so ``on_error="skip"`` skips just that record (see ``textio``).
``pyarrow`` and ``datasets`` are imported inside the readers that need them, so that importing
this module stays cheap.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

from lmwright.data.errors import DataError
from lmwright.data.textio import (
    MAX_DEPTH,
    bad_byte_at,
    deep_error,
    depth,
    has_u_escape,
    json_error,
    open_text,
    parse_json,
    read_text,
    surrogate_error,
    utf8_error,
)

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
    """The reader a resolved path goes to: prepared, datasets, llamafactory, or its file extension without the dot."""
    if llamafactory_spec(path) is not None:
        return "llamafactory"
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
        try:
            out += _resolve_one(s)
        except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission; DataError is a ValueError
            if isinstance(e, DataError):
                raise
            raise DataError(f"{s[:200]}: cannot read: {getattr(e, 'strerror', None) or e}", file=s) from None
    return out


def _resolve_one(s: str) -> list[str]:
    if not s.strip():
        raise DataError(f"{s!r}: an empty path; give a file, a folder or a glob")
    if (spec := llamafactory_spec(s)) is not None:
        lf_dataset(*spec)  # the registry, the entry and its files must be there
        return [s]
    if _has_magic(s) and not os.path.exists(s):
        return _resolve_glob(s)
    p = Path(s)
    if not p.exists():
        raise DataError(f"{s}: no such file or folder")
    if p.is_dir():
        if is_prepared_dir(p) or is_datasets_dir(p):
            return [s]
        found = _walk(p)
        if not found:
            raise DataError(f"{s}: the folder holds no supported file ({', '.join(EXTENSIONS)})")
        return found
    if p.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{s}: unsupported file type '{p.suffix}'; use one of {', '.join(EXTENSIONS)}")
    if p.name == LF_REGISTRY:
        names = ", ".join(sorted(n for n, e in _lf_registry(p).items() if isinstance(e, dict) and "file_name" in e))
        raise DataError(f"{s}: a LLaMA-Factory registry, not data: name one of its data sets, e.g. "
                        f"data.path={s}:<name> (local ones: {names or 'none'})")
    return [s]


def _resolve_glob(s: str) -> list[str]:
    matches = sorted(glob.glob(s, recursive=True))
    if not matches:
        raise DataError(f"{s}: the pattern matches no file")
    found = [m for m in matches if os.path.isdir(m) and (is_prepared_dir(m) or is_datasets_dir(m))
             or os.path.isfile(m) and m.lower().endswith(EXTENSIONS)]
    if not found:
        raise DataError(f"{s}: the pattern matches no supported file ({', '.join(EXTENSIONS)})")
    return found


def _walk(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):  # a LLaMA-Factory registry in a data folder is not data
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS) and name != LF_REGISTRY:
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
    with open_text(path) as f:
        if txt_mode == "file":
            text = f.read()
            err = utf8_error(path, text)
            if err is not None:
                yield err
            elif text.strip():
                yield Record({"text": text}, path, 1)
            return
        yield from (_txt_paragraphs if txt_mode == "paragraph" else _txt_lines)(f, path)


def _txt_lines(f, path: str) -> Iterator[Record | DataError]:
    for i, line in enumerate(f, 1):
        text = line.rstrip("\n")
        err = utf8_error(path, text, i)
        if err is not None:
            yield err
        elif text.strip():
            yield Record({"text": text}, path, i)


def _txt_paragraphs(f, path: str) -> Iterator[Record | DataError]:
    """Blank-line separated paragraphs; one with an undecodable byte is one error (at that byte's line)."""
    buf: list[str] = []
    start, err = 0, None
    for i, line in enumerate(chain(f, ["\n"]), 1):  # a final blank line flushes the last paragraph
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
            err = err or utf8_error(path, line, i)
        elif buf:
            yield err or Record({"text": "".join(buf).rstrip("\n")}, path, start)
            buf, err = [], None


def _read_jsonl(path: str, **_) -> Iterator[Record | DataError]:
    with open_text(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_record(line, path, i)


def _jsonl_record(line: str, path: str, i: int) -> Record | DataError:
    try:
        obj = parse_json(line, path, i)
    except DataError as e:
        return e
    if not isinstance(obj, dict):
        return DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}", file=path, line=i)
    return (has_u_escape(line) and surrogate_error(obj, path, i)) or Record(obj, path, i)


def _read_json(path: str, **_) -> Iterator[Record | DataError]:
    text = read_text(path)
    if text.lstrip().startswith("["):
        # Decode element by element so that each record keeps its real line number.
        yield from _scan_json_array(text, path)
        return
    obj = parse_json(text, path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        escapes = has_u_escape(text)
        for i, item in enumerate(obj["data"], 1):
            if isinstance(item, dict):
                yield (escapes and surrogate_error(item, path, i)) or Record(item, path, i)
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
        start = pos
        obj, pos = _decode_element(dec, text, pos, path)
        yield _json_element(obj, text[start:pos], path, at)
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        at = line_at(min(pos, n))
        raise bad_byte_at(path, text, pos) or DataError(
            f"{path}:{at}: invalid JSON: expected ',' or ']' after an element", file=path, line=at)


def _decode_element(dec: json.JSONDecoder, text: str, pos: int, path: str) -> tuple[object, int]:
    """The JSON value at ``pos`` and where it ends; an error that leaves its end unknown is raised."""
    try:
        return dec.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise bad_byte_at(path, text, e.pos) or json_error(path, e) from None
    except RecursionError:
        raise deep_error(path, text[pos:], text.count("\n", 0, pos) + 1) from None


def _json_element(obj: object, raw: str, path: str, at: int) -> Record | DataError:
    err = utf8_error(path, raw, at)
    if err is None and depth(raw) > MAX_DEPTH:
        err = deep_error(path, raw, at)
    if err is not None:
        return err
    if not isinstance(obj, dict):
        return DataError(f"{path}:{at}: expected a JSON object, got {type(obj).__name__}", file=path, line=at)
    return (has_u_escape(raw) and surrogate_error(obj, path, at)) or Record(obj, path, at)


def _read_csv(path: str, **_) -> Iterator[Record | DataError]:
    with open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        try:
            names = reader.fieldnames
        except csv.Error as e:
            raise _csv_error(path, 1, e) from None
        if not names:
            return
        err = utf8_error(path, ",".join(names))
        if err is not None:
            raise err
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # the reader goes on with the next line
                yield _csv_error(path, start, e)
            else:
                yield _csv_row(row, path, start)
            start = reader.line_num + 1


def _csv_error(path: str, line: int, e: csv.Error) -> DataError:
    msg = str(e)
    if "field limit" in msg:
        msg = (f"a field is longer than {csv.field_size_limit()} characters (the csv reader's limit); store long "
               "texts in .jsonl, .json or .parquet files")
    return DataError(f"{path}:{line}: cannot parse the csv row: {msg}", file=path, line=line)


def _csv_row(row: dict, path: str, line: int) -> Record | DataError:
    if None in row:  # more cells than header columns
        return DataError(f"{path}:{line}: the row has more cells than the header has columns", file=path, line=line)
    if any(v is None for v in row.values()):
        return DataError(f"{path}:{line}: the row has fewer cells than the header has columns", file=path, line=line)
    for v in row.values():
        err = utf8_error(path, v, line)
        if err is not None:
            return err
    return Record(dict(row), path, line)


def _read_parquet(path: str, **_) -> Iterator[Record | DataError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet: {_one_line(e)}", file=path) from None
    row = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
            objs = batch.to_pylist() if batch is not None else []
        except Exception as e:  # noqa: BLE001 - a corrupt page, a value Python cannot hold
            raise DataError(f"{path}: cannot read parquet at row {row + 1}: {_one_line(e)}; the file is damaged, "
                            "truncated or holds values Python cannot represent: write it again", file=path,
                            line=row + 1) from None
        if batch is None:
            return
        for obj in objs:
            row += 1
            yield Record(obj, path, row)


def _one_line(e: Exception) -> str:
    """A library's error message on one line (pyarrow's span several), without its final full stop."""
    return " ".join(str(e).split()).rstrip(".")


def _read_datasets(path: str, split: str = "train", **_) -> Iterator[Record | DataError]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types for a damaged folder
        raise DataError(f"{path}: cannot read the datasets folder: {type(e).__name__}: {_one_line(e)}; save it "
                        "again with save_to_disk", file=path) from None
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


# ---------------------------------------------------------------------- LLaMA-Factory dataset_info.json
LF_REGISTRY = "dataset_info.json"
LF_FORMATTINGS = ("alpaca", "sharegpt", "openai")
# LLaMA-Factory column -> the field name lmwright's formats read (alpaca and sharegpt layouts)
LF_COLUMNS = {"system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label",
              "prompt": "instruction", "query": "input", "response": "output", "history": "history",
              "messages": "conversations"}
LF_MEDIA = ("images", "videos", "audios")
# tag -> (its default, the sharegpt role it names)
LF_TAGS = {"role_tag": ("from", None), "content_tag": ("value", None), "user_tag": ("human", "human"),
           "assistant_tag": ("gpt", "gpt"), "observation_tag": ("observation", "observation"),
           "function_tag": ("function_call", "function_call"), "system_tag": ("system", "system")}


def llamafactory_spec(path: str | Path) -> tuple[Path, str] | None:
    """``(registry file, data set name)`` when ``path`` names a data set of a LLaMA-Factory registry:
    ``<dir>/dataset_info.json:<name>`` or ``<dir>:<name>`` where ``<dir>`` holds a ``dataset_info.json``."""
    s = str(path)
    head, sep, name = s.rpartition(":")
    if not sep or not head or not name or "/" in name or "\\" in name:
        return None
    h = Path(head)
    if h.name == LF_REGISTRY:
        return h, name
    if h.is_dir() and (h / LF_REGISTRY).is_file() and not (h / "state.json").exists():
        return h / LF_REGISTRY, name
    return None


def _lf_registry(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such file (a LLaMA-Factory dataset_info.json)")
    reg = parse_json(read_text(path), path)
    if not isinstance(reg, dict):
        raise DataError(f"{path}: expected an object that maps data set names to their descriptions, got "
                        f"{type(reg).__name__}", file=str(path))
    return reg


def _lf_line(path: Path, name: str) -> int:
    """The line of ``"name":`` in the registry (for errors), 1 when not found."""
    text = read_text(path)
    m = re.search(r'^\s*"' + re.escape(name) + r'"\s*:', text, flags=re.M)
    return text.count("\n", 0, m.start()) + 1 if m else 1


@dataclass(frozen=True)
class LFDataset:
    """One validated entry of a LLaMA-Factory registry: its local files and how to read their records."""

    name: str
    registry: Path
    files: tuple[str, ...]
    formatting: str
    ranking: bool
    columns: dict  # LLaMA-Factory column -> source column
    tags: dict  # tag -> value
    num_samples: int | None


def lf_dataset(registry: Path, name: str) -> LFDataset:
    """Read and check the entry ``name`` of a ``dataset_info.json`` (errors name the file, line and field)."""
    reg = _lf_registry(registry)
    if name not in reg:
        local = sorted(n for n, e in reg.items() if isinstance(e, dict) and "file_name" in e)
        close = difflib.get_close_matches(name, list(reg), n=1)
        raise DataError(f"{registry}: no data set '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                        + f" (local ones: {', '.join(local) or 'none'})", file=str(registry))
    entry = reg[name]
    where = f"{registry}:{_lf_line(registry, name)}"

    def bad(field: str, problem: str, hint: str) -> DataError:
        return DataError(f"{where}: field '{name}.{field}': {problem} ({hint})", file=str(registry))

    if not isinstance(entry, dict):
        raise bad("", f"must be an object, got {type(entry).__name__}", "see LLaMA-Factory's data/README.md")
    if "file_name" not in entry:
        remote = next((f"{k}={entry[k]}" for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
                       if k in entry), "no file_name")
        raise bad("file_name", f"missing ({remote})", "lmwright reads local files: download the data set and add "
                  "its file_name, or point data.path at the files")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in LF_FORMATTINGS:
        raise bad("formatting", f"{formatting!r} is not one of {', '.join(LF_FORMATTINGS)}", "fix dataset_info.json")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise bad("ranking", f"must be true or false, got {ranking!r}", "fix dataset_info.json")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    for field, mapping, known in (("columns", columns, (*LF_COLUMNS, *LF_MEDIA)), ("tags", tags, LF_TAGS)):
        if not isinstance(mapping, dict):
            raise bad(field, f"must be an object, got {type(mapping).__name__}", "fix dataset_info.json")
        for k, v in mapping.items():
            if k not in known:
                raise bad(f"{field}.{k}", f"unknown (known: {', '.join(known)})", "fix dataset_info.json")
            if not isinstance(v, str):
                raise bad(f"{field}.{k}", f"must be a string, got {type(v).__name__}", "fix dataset_info.json")
    media = [k for k in LF_MEDIA if k in columns]
    if media:
        raise bad(f"columns.{media[0]}", "a multimodal data set", "lmwright trains on text: pick a text data set")
    num = entry.get("num_samples")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise bad("num_samples", f"must be a positive integer, got {num!r}", "fix dataset_info.json")
    target = registry.parent / str(entry["file_name"])
    if not target.exists():
        raise bad("file_name", f"{target}: no such file or folder", "the path is relative to dataset_info.json's folder")
    files = tuple(resolve_paths([target]))
    return LFDataset(name, registry, files, formatting, ranking, dict(columns), dict(tags), num)


def _lf_convert(ds: LFDataset, rec: Record) -> Record | DataError:
    """A record of ``ds`` with LLaMA-Factory's columns and tags applied: the field names lmwright's formats
    read (instruction/input/output/history or conversations, system, tools, chosen, rejected, label) and
    sharegpt turns with the standard ``from``/``value`` and roles (human, gpt, system, function_call,
    observation)."""
    sharegpt = ds.formatting != "alpaca"
    defaults = {"messages": "conversations"} if sharegpt else {"prompt": "instruction", "query": "input",
                                                               "response": "output"}
    skip = ("prompt", "query", "response", "history") if sharegpt else ("messages",)  # the other formatting's
    src_msgs = ds.columns.get("messages", "conversations")
    # keep the source's name where the formats know it, so that their errors name the source's field
    msgs_key = src_msgs if src_msgs in ("messages", "conversations") else "conversations"
    out: dict = {}
    for col, field in LF_COLUMNS.items():
        src = ds.columns.get(col, defaults.get(col))
        if col not in skip and src is not None and src in rec.data:
            out[msgs_key if col == "messages" else field] = rec.data[src]
    if not sharegpt and "instruction" in out:
        out["text"] = out["instruction"]  # LLaMA-Factory pretraining reads the prompt column as text
    if sharegpt:
        tag = {k: ds.tags.get(k, d) for k, (d, _) in LF_TAGS.items()}
        roles = {tag[k]: r for k, (_, r) in LF_TAGS.items() if r is not None}
        try:
            if isinstance(out.get(msgs_key), list):
                out[msgs_key] = [_lf_turn(t, f"{src_msgs}[{i}]", tag, roles, ds, rec)
                                 for i, t in enumerate(out[msgs_key])]
            for k in ("chosen", "rejected"):
                if isinstance(out.get(k), dict):
                    out[k] = _lf_turn(out[k], ds.columns.get(k, k), tag, roles, ds, rec)
        except DataError as e:
            return e
    return Record(out, rec.file, rec.line)


def _lf_turn(t, field: str, tag: dict, roles: dict, ds: LFDataset, rec: Record) -> dict:
    hint = f"dataset_info.json's tags for '{ds.name}': " + ", ".join(f"{k}={v}" for k, v in tag.items())
    if not isinstance(t, dict):
        raise DataError(f"{rec.where}: field '{field}': must be an object, got {type(t).__name__} ({hint})",
                        file=rec.file, line=rec.line)
    role = t.get(tag["role_tag"])
    if role not in roles:
        what = "missing" if role is None else f"{role!r} is not one of the role tags {', '.join(roles)}"
        raise DataError(f"{rec.where}: field '{field}.{tag['role_tag']}': {what} ({hint})", file=rec.file,
                        line=rec.line)
    out = {"from": roles[role], "value": t.get(tag["content_tag"])}
    for k in ("tool_calls", "tool_call_id", "name"):  # OpenAI fields of formatting: openai
        if k in t:
            out[k] = t[k]
    return out


def _read_llamafactory(path: str, txt_mode: TxtMode = "line", split: str = "train", **_
                       ) -> Iterator[Record | DataError]:
    spec = llamafactory_spec(path)
    assert spec is not None
    ds = lf_dataset(*spec)
    n = 0
    for src in ds.files:
        for item in _READERS[source_kind(src)](src, txt_mode=txt_mode, split=split):
            if ds.num_samples is not None and n >= ds.num_samples:
                return
            n += 1
            yield item if isinstance(item, DataError) else _lf_convert(ds, item)


_READERS: dict[str, Callable[..., Iterator[Record | DataError]]] = {
    "txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
    "datasets": _read_datasets, "prepared": _read_prepared, "llamafactory": _read_llamafactory,
}
