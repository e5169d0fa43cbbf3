"""``messages``: conversations ``{"messages": [...], "tools": [...]}``, multi-turn, with tool use.

Read from OpenAI ``messages`` (``role``: system, user, assistant, tool; assistant turns may carry
``tool_calls``), ShareGPT / LLaMA-Factory ``conversations`` (``from``: system, human, gpt,
function_call, observation) or an alpaca-layout record (instruction, input, output, optional history
pairs). A ``system`` column becomes the first turn unless the conversation has one; ``tools`` (a list
or a JSON string, LLaMA-Factory's plain functions or OpenAI's form) becomes OpenAI tool schemas.

Canonical record: ``messages``, each ``{role, content}`` (content always a string) plus ``tool_calls``
(``[{"type": "function", "function": {"name", "arguments": {...}}}]``) on assistant turns that call
tools and ``tool_call_id`` / ``name`` on tool results when the source has them; ``tools``, a list,
empty when there are none. A sharegpt function_call turn becomes an assistant turn with empty content
and its call; an observation turn a ``tool`` turn. At least one assistant turn must have content or
a tool call, since that is what a chat model is trained on.
"""

from __future__ import annotations

from lmwright.data.formats import (
    FORMATS,
    check_calls_known,
    conversation,
    join_texts,
    tools_list,
    with_system,
)

HINT = ("messages records need 'messages' (OpenAI role/content) or 'conversations' (sharegpt from/value) with "
        "at least one assistant turn; 'tools' and 'system' are optional")


class Conversation(list):
    """A conversation (a list of messages) that carries its tool schemas as ``tools`` (None when it has
    none), so that code passing conversations around hands them to ``render_training_ids(..., tools=)``
    unchanged. A slice is a plain list (it leaves the tools behind)."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = list(tools) if tools else None


class MessagesFormat:
    name = "messages"

    def canonicalize(self, record: dict, where: str) -> dict:
        msgs, key = conversation(record, where, HINT, need_assistant=True)
        tools = tools_list(record.get("tools"), where)
        check_calls_known(msgs, tools, where, key)
        return {"messages": with_system(msgs, record, where, HINT), "tools": tools}

    def text_of(self, record: dict) -> str:
        return join_texts(record["messages"])


FORMATS.register("messages", MessagesFormat())
