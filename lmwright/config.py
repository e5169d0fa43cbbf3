"""Typed configuration: dataclasses + YAML files + ``key.sub=value`` overrides.

Each dataclass lives next to the code that uses it; a stage composes its own config from them.
Every field carries a one-line help (``field(..., metadata={"help": ...})`` via :func:`opt`), which
feeds ``lmwright <verb> --help`` and the generated config reference in the docs.

Errors name the file (or the override) and the dotted key, and suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lmwright.registry import suggest

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message says where and how to fix it."""


def opt(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, choices: Any = None) -> Any:
    """A dataclass field with one-line help (and optional registry-backed choices for the docs)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        d = default
        return field(default_factory=lambda: type(d)(d), metadata=meta)
    if is_dataclass(default):
        d = default
        return field(default_factory=lambda: dataclasses.replace(d), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- loading
MAX_DEPTH = 32  # how deep a config may nest: far more than any real one, few enough for every walk


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    text = _decode(raw, p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(e, text, p)) from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    problem = nesting_problem(data)
    if problem:
        raise ConfigError(f"{p}: the config {problem}")
    return data


def _decode(raw: bytes, p: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); save the "
                          "config as UTF-8") from None


def _yaml_error(e: yaml.YAMLError, text: str, p: Path) -> str:
    """One line: ``file:line: invalid YAML: problem``."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(e, "position", None), int):  # a ReaderError: a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1  # type: ignore[attr-defined]
    else:
        line = None
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    return f"{p}{f':{line}' if line else ''}: invalid YAML: {' '.join(str(problem).split())}"


def nesting_problem(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why ``value`` (parsed YAML) cannot be a config value: it nests deeper than ``limit``, or a list or
    mapping contains itself (a YAML alias inside its own anchor); None when it is fine. No recursion."""
    state: dict[int, int] = {}  # id -> 1 while its children are walked, 2 when done
    stack: list[tuple[Any, int, bool]] = [(value, 1, False)]
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            state[id(node)] = 2
            continue
        if not isinstance(node, (dict, list)) or state.get(id(node)) == 2:
            continue
        if state.get(id(node)) == 1:
            return "contains itself (a YAML alias inside its own anchor)"
        if depth > limit:
            return f"nests more than {limit} levels deep"
        state[id(node)] = 1
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in (node.values() if isinstance(node, dict) else node))
    return None


def _merge(dst: dict, src: dict, sources: dict, origin: str, prefix: str = "") -> None:
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, sources, origin, key + ".")
        else:
            dst[k] = v
            sources[key] = origin
            if isinstance(v, dict):
                for sub in _flatten(v, key + "."):
                    sources[sub] = origin


def _flatten(d: dict, prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        yield prefix + str(k)
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    problem = nesting_problem(value)
    if problem:
        raise ConfigError(f"override '{key}=...': the value {problem}")
    return key, value


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def merge_sources(files: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None
                  ) -> tuple[dict, dict[str, str]]:
    """Merge YAML files (later wins) and overrides; return (raw dict, dotted key -> origin)."""
    raw: dict = {}
    sources: dict[str, str] = {}
    if base:
        _merge(raw, base, sources, "defaults")
    for f in files:
        _merge(raw, load_yaml(f), sources, str(f))
    for o in overrides:
        k, v = parse_override(o)
        patch: dict = {}
        set_dotted(patch, k, v)
        _merge(raw, patch, sources, f"override '{o}'")
    return raw, sources


def load_config(cls: type[T], files: list[str | Path] = (), overrides: list[str] = (),
                base: dict | None = None) -> T:
    """Build a ``cls`` instance from YAML files + overrides; unknown keys and bad values fail."""
    raw, sources = merge_sources(files, overrides, base)
    return from_dict(cls, raw, sources=sources)


# ------------------------------------------------------------------------------------ conversion
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _where(key: str, sources: dict[str, str] | None) -> str:
    if sources and key in sources:
        return f"{sources[key]}: "
    return ""


def _coerce(tp: Any, value: Any, key: str, sources: dict | None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, sources)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0]) if len(errors) == 1 else ConfigError(
            f"{_where(key, sources)}'{key}' = {_short(value)} does not fit {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:  # YAML reads no/yes/off/on as booleans
            for word in (("no", "false", "off") if not value else ("yes", "true", "on")):
                if word in choices:
                    return word
        if value not in choices:
            raise ConfigError(f"{_where(key, sources)}'{key}' = {_short(value)} is not one of "
                              f"{', '.join(map(repr, choices))}.{suggest(str(value), [str(c) for c in choices])}")
        return value
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a mapping, got {_short(value)}")
        return from_dict(tp, value, prefix=key + ".", sources=sources)
    if tp in (list, tuple):  # a bare list: any items
        if not isinstance(value, (list, tuple, str)):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a list, got {_short(value)}")
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_) = get_args(tp) or (Any,)
        out = [_coerce(inner, v, f"{key}[{i}]", sources) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a mapping, got {_short(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{_where(key, sources)}'{key}' must be true or false, got {_short(value)}")
    if tp is int:
        return _to_int(value, key, sources)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a number, got {_short(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a number, got {_short(value)}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{_where(key, sources)}'{key}' must be a string, got {_short(value)}")
        return str(value)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _to_int(value: Any, key: str, sources: dict | None) -> int:
    """An integer from an int, an integral float (1e3) or a string of either; anything else fails."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    bad = ConfigError(f"{_where(key, sources)}'{key}' must be an integer, got {_short(value)}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if not isinstance(value, (float, str)):
        raise bad
    try:
        f = float(value)
    except (ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(f) or f != int(f):
        raise bad
    return int(f)


def from_dict(cls: type[T], data: dict, prefix: str = "", sources: dict | None = None) -> T:
    hints = _type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    names = list(by_name)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{_where(key, sources)}unknown key '{key}'.{suggest(str(k), names)}"
                              f" Valid keys under '{prefix.rstrip('.') or 'top level'}': {', '.join(names)}")
        default = by_name[k].default_factory  # type: ignore[misc]
        if isinstance(v, dict) and is_dataclass(hints[k]) and default is not MISSING:
            # a section keeps the defaults its parent gave it (e.g. sft's data.format=alpaca)
            kwargs[k] = _onto(default(), v, key, sources)
            continue
        kwargs[k] = _coerce(hints[k], v, key, sources)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    return obj


def _onto(base: Any, data: dict, key: str, sources: dict | None) -> Any:
    """``base`` (a dataclass instance) with ``data`` applied, validated like :func:`from_dict`."""
    merged = {f.name: getattr(base, f.name) for f in fields(base) if f.init and f.name not in data}
    obj = from_dict(type(base), data, prefix=key + ".", sources=sources)
    if merged:
        obj = dataclasses.replace(obj, **merged)
        check = getattr(obj, "check", None)
        if callable(check):
            check()
    return obj


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True), encoding="utf-8")


def iter_options(cls: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, help) for every leaf option of a config class."""
    hints = _type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if is_dataclass(tp):
            yield from iter_options(tp, key + ".")
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
            if is_dataclass(default):
                yield from iter_options(type(default), key + ".")
                continue
        else:
            default = None
        yield key, _type_name(tp), default, f.metadata.get("help", "")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def options_table(cls: type) -> str:
    """Markdown table of a config class's options (for the generated reference docs)."""
    rows = ["| key | type | default | help |", "|---|---|---|---|"]
    for key, tname, default, help_ in iter_options(cls):
        rows.append(f"| `{key}` | {tname} | `{default!r}` | {help_} |")
    return "\n".join(rows)
