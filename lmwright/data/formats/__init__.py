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

import json
from typing import Any, Protocol

from lmwright.data.errors import DataError
from lmwright.data.textio import has_u_escape, parse_json, surrogate_error
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
    """Validate a conversation and return it as canonical OpenAI messages.

    Accepted turns: OpenAI ``{role, content}`` (assistant turns may carry ``tool_calls``, tool results are
    ``role: tool``; content may be a list of text parts) and ShareGPT / LLaMA-Factory ``{from, value}`` with
    roles human, gpt, system, function_call (a JSON ``{name, arguments}`` or a list of them: becomes an
    assistant turn with ``tool_calls``) and observation (becomes a ``tool`` turn). See :func:`parse_turn`
    for the canonical message.
    """
    if not isinstance(value, list):
        raise field_error(where, field, f"must be a list of {{role, content}} messages, got {type(value).__name__}",
                          hint)
    if not value:
        raise field_error(where, field, "empty", hint)
    out = [parse_turn(m, where, f"{field}[{i}]", hint) for i, m in enumerate(value)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise field_error(where, field, "no assistant turn", hint)
    if need_assistant and not any(m["content"].strip() or m.get("tool_calls") for m in out if m["role"] == "assistant"):
        raise field_error(where, field, "every assistant turn is empty", hint)
    return out


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
                   "function_call": "function_call"}
_ROLE_NAMES = "system, user, assistant, tool (sharegpt: system, human, gpt, function_call, observation)"


def parse_turn(m: Any, where: str, field: str, hint: str) -> dict:
    """One turn as a canonical message: ``{role, content}`` with ``content`` always a string, plus
    ``tool_calls`` on assistant turns that call tools and ``tool_call_id`` / ``name`` on tool results
    when the source has them (nothing else: extra keys are dropped)."""
    if not isinstance(m, dict):
        raise field_error(where, field, f"must be an object with role and content, got {type(m).__name__}", hint)
    sharegpt = "role" not in m and "from" in m
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    raw_role, content = m.get(role_key), m.get(content_key)
    role = _SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None or (not sharegpt and raw_role not in ROLES):
        raise field_error(where, f"{field}.{role_key}", f"{raw_role!r} is not one of {_ROLE_NAMES}", hint)
    if role == "function_call":  # LLaMA-Factory: the value is the call as JSON
        return {"role": "assistant", "content": "",
                "tool_calls": tool_calls(content, where, f"{field}.{content_key}", from_json=True)}
    out: dict[str, Any] = {"role": role}
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None and calls != []:
        out["content"] = "" if content is None else _content(content, where, f"{field}.{content_key}", hint)
        out["tool_calls"] = tool_calls(calls, where, f"{field}.tool_calls", from_json=False)
        return out
    if role == "tool" and isinstance(content, (dict, list)) and not _is_parts(content):
        # a structured tool result, as the model will read it
        content = json.dumps(_writable(content, where, f"{field}.{content_key}", hint), ensure_ascii=False)
    out["content"] = _content(content, where, f"{field}.{content_key}", hint)
    if role == "tool":
        for k in ("tool_call_id", "name"):
            if isinstance(m.get(k), str) and m[k]:
                out[k] = m[k]
    return out


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value)


def _content(value: Any, where: str, field: str, hint: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if value is None:
        raise field_error(where, field, "missing", hint)
    if _is_parts(value):
        kinds = {p["type"] for p in value} - {"text"}
        if kinds:
            raise field_error(where, field, f"content parts of type {', '.join(sorted(map(str, kinds)))}: lmwright "
                              "trains on text only", "keep the text parts")
        return "".join(str(p.get("text", "")) for p in value)
    raise field_error(where, field, f"must be a string, got {type(value).__name__}", hint)


TOOL_HINT = ("a tool call is {name, arguments} (sharegpt function_call: that object as JSON) or OpenAI "
             "{type: function, function: {name, arguments}}; arguments is an object or its JSON")


def _json(value: str, where: str, field: str, hint: str) -> Any:
    """A field that holds JSON text, parsed; errors name the record and the field."""
    try:
        out = parse_json(value, "")
    except DataError as e:  # "<empty path>:<line>: <problem>" - keep the problem
        raise field_error(where, field, str(e).split(": ", 1)[-1], hint) from None
    if has_u_escape(value) and surrogate_error(out, "", 1) is not None:
        raise field_error(where, field, "holds a lone surrogate escape (\\ud800-\\udfff without its pair)", hint)
    return out


def _writable(value: Any, where: str, field: str, hint: str) -> Any:
    """``value`` when JSON can write it: a parquet or datasets struct may hold dates, decimals or bytes."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise field_error(where, field, f"holds a value JSON cannot write ({e})", hint) from None
    return value


def tool_calls(value: Any, where: str, field: str, *, from_json: bool) -> list[dict]:
    """Tool calls as ``[{"type": "function", "function": {"name", "arguments": dict}}]`` (+ ``id`` if given).

    ``from_json``: ``value`` is a sharegpt function_call turn's value, a JSON object or list of objects."""
    if from_json and isinstance(value, str):
        value = _json(value, where, field, TOOL_HINT)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise field_error(where, field, "must be a tool call or a non-empty list of them, got "
                          f"{type(value).__name__ if value != [] else 'an empty list'}", TOOL_HINT)
    out = []
    for i, call in enumerate(value):
        f = f"{field}[{i}]" if len(value) > 1 or not from_json else field
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        if not isinstance(fn, dict):
            raise field_error(where, f, f"must be an object, got {type(fn).__name__}", TOOL_HINT)
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise field_error(where, f"{f}.name", "missing" if name is None else "must be a non-empty string",
                              TOOL_HINT)
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            args = _json(args, where, f"{f}.arguments", TOOL_HINT) if args.strip() else {}
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise field_error(where, f"{f}.arguments", f"must be an object, got {type(args).__name__}", TOOL_HINT)
        _writable(args, where, f"{f}.arguments", TOOL_HINT)
        canon: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
            canon = {"id": call["id"], **canon}
        out.append(canon)
    return out


TOOLS_HINT = ("tools is a list of function schemas {name, description, parameters} (LLaMA-Factory, also as a "
              "JSON string) or OpenAI {type: function, function: {...}}")


def tools_list(value: Any, where: str, field: str = "tools") -> list[dict]:
    """Tool schemas in OpenAI's form ``[{"type": "function", "function": {name, description, parameters}}]``.

    Accepts LLaMA-Factory's plain function list, as a list or a JSON string, and OpenAI's form; absent or
    empty (``None``, ``""``, ``"[]"``) gives ``[]``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        value = _json(value, where, field, TOOLS_HINT)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise field_error(where, field, f"must be a list of tool schemas, got {type(value).__name__}", TOOLS_HINT)
    out = []
    for i, t in enumerate(value):
        f = f"{field}[{i}]"
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict):
            raise field_error(where, f, f"must be an object, got {type(fn).__name__}", TOOLS_HINT)
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise field_error(where, f"{f}.name", "missing" if fn.get("name") is None else
                              "must be a non-empty string", TOOLS_HINT)
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise field_error(where, f"{f}.parameters", f"must be an object (a JSON schema), got "
                              f"{type(fn['parameters']).__name__}", TOOLS_HINT)
        out.append({"type": "function", "function": _writable(dict(fn), where, f, TOOLS_HINT)})
    return out


def check_calls_known(messages: list[dict], tools: list[dict], where: str, field: str) -> None:
    """With tool schemas given, every call must name one of them (a typo would train a call to nothing)."""
    if not tools:
        return
    names = {t["function"]["name"] for t in tools}
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            if c["function"]["name"] not in names:
                raise field_error(where, f"{field}[{i}]", f"calls {c['function']['name']!r}, which is not in tools "
                                  f"({', '.join(sorted(names))})", "add its schema to tools or fix the name")


def conversation(record: dict, where: str, hint: str, *, need_assistant: bool) -> tuple[list[dict], str]:
    """The conversation of a record and the field it came from: ``messages`` (OpenAI), ``conversations``
    (ShareGPT) or, for alpaca-layout records, ``instruction`` (+ ``input``, earlier ``history`` pairs and
    ``output``). The ``system`` column is not applied here: see :func:`with_system`."""
    key = next((k for k in ("messages", "conversations") if record.get(k) is not None), None)
    if key is not None:
        msgs = messages_list(record[key], where, key, hint, need_assistant=need_assistant)
    elif record.get("instruction") is not None:
        key = "instruction"
        msgs = _alpaca_turns(record, where, hint)
        if need_assistant:
            msgs.append({"role": "assistant", "content": required_str(record, "output", where, hint)})
    else:
        raise field_error(where, "messages", "missing", hint + _keys(record))
    return msgs, key


def with_system(msgs: list[dict], record: dict, where: str, hint: str) -> list[dict]:
    """``msgs`` with the record's ``system`` column as the first turn, unless they start with a system turn.
    (Callers add it after their own checks, so that the turn numbers in errors are the source's.)"""
    system = optional_str(record, "system", where, hint)
    if system.strip() and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _alpaca_turns(record: dict, where: str, hint: str) -> list[dict]:
    """history pairs + user(instruction, newline, input), as LLaMA-Factory's alpaca converter builds them."""
    history = record.get("history")
    msgs: list[dict] = []
    if history:
        if not isinstance(history, list):
            raise field_error(where, "history", f"must be a list of [question, answer] pairs, got "
                              f"{type(history).__name__}", hint)
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise field_error(where, f"history[{i}]", "must be a [question, answer] pair of strings", hint)
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = required_str(record, "instruction", where, hint)
    extra = optional_str(record, "input", where, hint)
    msgs.append({"role": "user", "content": user + (f"\n{extra}" if extra else "")})
    return msgs


def check_prompt_end(prompt: list[dict], where: str, field: str, hint: str) -> None:
    """A prompt is what the reply answers: it must end with a user turn or a tool result."""
    if prompt[-1]["role"] not in ("user", "tool"):
        raise field_error(where, f"{field}[{len(prompt) - 1}]", f"the prompt ends with the {prompt[-1]['role']} turn; "
                          "it must end with the user turn (or tool result) that the reply answers", hint)


def detect_format(record: dict) -> str | None:
    """The format a raw record most likely is (used to suggest ``data.format`` when a record does not fit)."""
    keys = set(record)
    chat = bool(keys & {"messages", "conversations"})
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "label" in keys and isinstance(record["label"], bool) and (chat or keys & {"completion", "output"}):
        return "kto"
    if chat:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if {"anchor", "positive"} <= keys:
        return "pairs"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def join_texts(*parts: Any) -> str:
    """Concatenate the non-empty text parts (strings or message lists) with newlines."""
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            if p:
                out.append(p)
        elif isinstance(p, list):
            for m in p:
                if isinstance(m, dict) and m.get("content"):
                    out.append(m["content"])
                if isinstance(m, dict) and m.get("tool_calls"):  # the calls are trained tokens too
                    out.append(json.dumps([c["function"] for c in m["tool_calls"]], ensure_ascii=False))
    return "\n".join(out)


__all__ = [
    "FORMATS",
    "ROLES",
    "Format",
    "check_calls_known",
    "check_prompt_end",
    "conversation",
    "detect_format",
    "field_error",
    "join_texts",
    "messages_list",
    "optional_str",
    "parse_turn",
    "rename_columns",
    "required_str",
    "tool_calls",
    "tools_list",
    "with_system",
]
