"""Text and JSON decoding for the data layer, with every failure located: ``file:line: ...``.

Files are opened as UTF-8 (a leading byte-order mark dropped) with ``errors="surrogateescape"``: an
undecodable byte becomes a code point in U+DC80..U+DCFF that strict UTF-8 decoding never yields, so a
reader finds it in the line it belongs to (:func:`utf8_error`) instead of failing somewhere in the
file with a raw ``UnicodeDecodeError``.

JSON is refused when it nests deeper than ``MAX_DEPTH`` (checked before parsing, so Python's
recursive parser never hits ``RecursionError``; no real record nests that deep, and a shallow record
is safe for every later step that walks it), and when a string holds a lone surrogate escape
(``"\\ud800"``): ``json`` accepts it, but it cannot be written as UTF-8 later.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

from lmwright.data.errors import DataError

MAX_DEPTH = 200
_ESCAPED = re.compile("[\udc80-\udcff]")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def open_text(path: str | Path, newline: str | None = None) -> IO[str]:
    """``path`` opened for reading as UTF-8, undecodable bytes kept as surrogate escapes."""
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}", file=str(path)) from None


def read_text(path: str | Path) -> str:
    with open_text(path) as f:
        return f.read()


def _locate(text: str, pos: int, line: int) -> tuple[int, int]:
    """(line, column) of ``pos`` in ``text`` whose first line is ``line``."""
    return line + text.count("\n", 0, pos), pos - text.rfind("\n", 0, pos)


def utf8_error(path: str | Path, text: str, line: int = 1) -> DataError | None:
    """The error for the first undecodable byte of ``text`` (read by :func:`open_text`), else None."""
    if text.isascii():
        return None
    m = _ESCAPED.search(text)
    return None if m is None else _utf8_error(path, text, m.start(), line)


def bad_byte_at(path: str | Path, text: str, pos: int) -> DataError | None:
    """The UTF-8 error when the character at ``pos`` of a whole file's ``text`` is an undecodable byte."""
    if pos >= len(text) or not _ESCAPED.match(text, pos):
        return None
    return _utf8_error(path, text, pos, 1)


def _utf8_error(path: str | Path, text: str, pos: int, line: int) -> DataError:
    at, col = _locate(text, pos, line)
    byte = ord(text[pos]) - 0xDC00
    return DataError(f"{path}:{at}: not valid UTF-8 (byte 0x{byte:02x} at column {col}): a binary file or another "
                     "encoding; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)", file=str(path), line=at)


def depth(text: str) -> int:
    """How deep the brackets of JSON ``text`` nest (strings skipped); exact only above ``MAX_DEPTH``."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def deep_error(path: str | Path, text: str, line: int = 1) -> DataError:
    """The error for JSON ``text`` that nests too deeply, at the line where it passes ``MAX_DEPTH``."""
    level, pos = 0, 0
    for m in _TOKENS.finditer(text):
        level += _STEP.get(m.group(), 0)
        if level > MAX_DEPTH:
            pos = m.start()
            break
    at, _ = _locate(text, pos, line)
    return DataError(f"{path}:{at}: JSON nested too deeply (more than {MAX_DEPTH} levels of lists/objects); "
                     "flatten the record", file=str(path), line=at)


def json_error(path: str | Path, e: json.JSONDecodeError, line: int = 1) -> DataError:
    at = line + e.lineno - 1
    return DataError(f"{path}:{at}: invalid JSON at column {e.colno}: {e.msg}", file=str(path), line=at)


def parse_json(text: str, path: str | Path, line: int = 1) -> Any:
    """``json.loads(text)``; bad bytes, too deep nesting and invalid JSON raise ``DataError`` at their line
    (``line`` is the line ``text`` starts on in its file)."""
    err = utf8_error(path, text, line)
    if err is None and depth(text) > MAX_DEPTH:
        err = deep_error(path, text, line)
    if err is not None:
        raise err
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json_error(path, e, line) from None
    except RecursionError:  # not reached under MAX_DEPTH, unless the stack is already deep
        raise deep_error(path, text, line) from None


def has_u_escape(text: str) -> bool:
    """Whether JSON ``text`` may hold a surrogate escape (when not, :func:`surrogate_error` need not run)."""
    return "\\ud" in text or "\\uD" in text


def surrogate_error(obj: Any, path: str | Path, line: int) -> DataError | None:
    """The error when ``obj`` (parsed JSON) holds a lone surrogate, else None; gate it with :func:`has_u_escape`."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return DataError(f"{path}:{line}: a string holds a lone surrogate escape ({e.object[e.start]!a}), which is "
                         "not text; fix the \\u escape (a pair like \\ud83d\\ude00 is fine)", file=str(path),
                         line=line)
    return None
