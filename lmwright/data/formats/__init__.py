"""Record formats: validate a raw record and return its canonical dict.

A format is a plugin registered by name in ``FORMATS`` where it is defined (one module per format
in this package); adding one touches no stage and no CLI code. Every format object has:

- ``name``: the registry name;
- ``canonicalize(record, where) -> dict``: validate a raw record (after column renaming) and
  return the canonical dict (always the same keys, so that a list of them is a table); raise
  ``DataError`` naming ``where`` (``file:line``), the field and the fix;
- ``text_of(record) -> str``: the text of a canonical record, for cleaning, dedup and length
  filters, and for tokenizer training.

Canonical records contain only the format's fields: extra source columns are dropped, because a
stage must be able to rely on exactly these keys.
"""

from __future__ import annotations

from typing import Any, Protocol

from lmwright.data.errors import DataError
from lmwright.registry import Registry

FORMATS = Registry("format", package="lmwright.data.formats")
ROLES = ("system", "user", "assistant", "tool")


class Format(Protocol):
    name: str

    def canonicalize(self, record: dict, where: str) -> dict: ...

    def text_of(self, record: dict) -> str: ...


def rename_columns(record: dict, columns: dict) -> dict:
    """Apply ``columns`` ({source: target}) before validation; unmapped keys are kept as they are."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns}
    for src, dst in columns.items():
        if src in record:
            out[str(dst)] = record[src]
    return out


def field_error(where: str, field: str, problem: str, hint: str) -> DataError:
    return DataError(f"{where}: field '{field}': {problem} ({hint})")


def _keys(record: dict) -> str:
    keys = ", ".join(map(str, list(record)[:8])) or "none"
    return f"; the record has: {keys} - rename with data.columns"


def _as_str(value: Any) -> str | None:
    """Strings as they are; numbers as text (csv/parquet columns are often typed); anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def required_str(record: dict, key: str, where: str, hint: str) -> str:
    """A field that must be a non-blank string."""
    value = record.get(key)
    if value is None:
        raise field_error(where, key, "missing", hint + (_keys(record) if key not in record else ""))
    s = _as_str(value)
    if s is None:
        raise field_error(where, key, f"must be a string, got {type(value).__name__}", hint)
    if not s.strip():
        raise field_error(where, key, "empty", hint)
    return s


def optional_str(record: dict, key: str, where: str, hint: str, default: str = "") -> str:
    value = record.get(key)
    if value is None:
        return default
    s = _as_str(value)
    if s is None:
        raise field_error(where, key, f"must be a string, got {type(value).__name__}", hint)
    return s


def messages_list(value: Any, where: str, field: str, hint: str, *, need_assistant: bool) -> list[dict]:
    """Validate an OpenAI-style ``[{role, content}]`` list and return it with only those two keys.

    ShareGPT-style ``{from, value}`` turns (human/gpt/system) are accepted too, because many local
    datasets use them; they come out in the OpenAI form.
    """
    if not isinstance(value, list):
        raise field_error(where, field, f"must be a list of {{role, content}} messages, got {type(value).__name__}",
                          hint)
    if not value:
        raise field_error(where, field, "empty", hint)
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise field_error(where, f, f"must be an object with role and content, got {type(m).__name__}", hint)
        if "role" not in m and "from" in m:
            m = {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        role = m.get("role")
        if role not in ROLES:
            raise field_error(where, f"{f}.role", f"{role!r} is not one of {', '.join(ROLES)}", hint)
        content = m.get("content")
        if not isinstance(content, str):
            raise field_error(where, f"{f}.content", "missing" if content is None else
                              f"must be a string, got {type(content).__name__}", hint)
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise field_error(where, field, "no assistant turn", hint)
    if need_assistant and not any(m["content"].strip() for m in out if m["role"] == "assistant"):
        raise field_error(where, field, "every assistant turn is empty", hint)
    return out


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}


def join_texts(*parts: Any) -> str:
    """Concatenate the non-empty text parts (strings or message lists) with newlines."""
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            if p:
                out.append(p)
        elif isinstance(p, list):
            out += [m["content"] for m in p if isinstance(m, dict) and m.get("content")]
    return "\n".join(out)


__all__ = [
    "FORMATS",
    "ROLES",
    "Format",
    "field_error",
    "join_texts",
    "messages_list",
    "optional_str",
    "rename_columns",
    "required_str",
]
