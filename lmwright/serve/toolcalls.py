"""Tool calls in a model's answer, as the OpenAI API returns them.

A model fine-tuned on tool-calling data (sharegpt ``function_call`` turns, OpenAI ``tool_calls``) writes its
calls the way its chat template renders assistant ``tool_calls`` in training: Qwen/SmolLM2/Hermes-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, Mistral's ``[TOOL_CALLS][...]``, or a
bare JSON object/list (Llama 3.x ``{"name": ..., "parameters": ...}``). :func:`parse_tool_calls` finds them;
only calls of tools the request offered are taken, anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>", "<tool_calls>")


def _as_calls(value: Any, names: set[str]) -> list[dict] | None:
    """``value`` (parsed JSON) as OpenAI tool calls, or None unless every item is a call of a known tool.
    Calls are read by the training data's normaliser (:func:`lmwright.data.formats.tool_calls`: ``name`` +
    ``arguments``/``parameters``, flat or under ``function``, arguments as an object or a JSON string)."""
    from lmwright.data.errors import DataError
    from lmwright.data.formats import tool_calls

    try:
        calls = tool_calls(value, "answer", "tool_calls", from_json=False)
    except (DataError, AttributeError, TypeError):
        return None
    if any(c["function"]["name"] not in names for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}} for c in calls]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(remaining content or None, OpenAI ``tool_calls``) of an answer to a request that offered ``tools``
    (normalised ``{"type": "function", "function": {...}}`` schemas). No call found: ``(text, [])``."""
    names = {t["function"]["name"] for t in tools}
    blocks = _TAGGED.findall(text)
    if blocks:
        calls = [_as_calls(_json(b), names) for b in blocks]
        if all(calls):
            rest = _TAGGED.sub("", text).strip()
            return rest or None, [c for group in calls for c in group]
        return text, []
    body = text.strip()
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):].strip()
    if body[:1] in ("{", "["):
        calls = _as_calls(_json(body), names)
        if calls:
            return None, calls
    return text, []
