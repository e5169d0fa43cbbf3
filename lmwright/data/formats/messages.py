"""``messages``: OpenAI-style conversations ``{"messages": [{role, content}, ...]}``, multi-turn.

Roles are system, user, assistant and tool; at least one assistant turn must have content, since
that is what a chat model is trained on. ShareGPT ``conversations: [{from, value}]`` records are
accepted and converted.
"""

from __future__ import annotations

from lmwright.data.formats import FORMATS, field_error, join_texts, messages_list

HINT = "messages records need 'messages': a list of {role, content} with at least one assistant turn"


class MessagesFormat:
    name = "messages"

    def canonicalize(self, record: dict, where: str) -> dict:
        key = "messages" if "messages" in record or "conversations" not in record else "conversations"
        value = record.get(key)
        if value is None:
            keys = ", ".join(map(str, list(record)[:8])) or "none"
            raise field_error(where, "messages", "missing", f"{HINT}; the record has: {keys}")
        return {"messages": messages_list(value, where, key, HINT, need_assistant=True)}

    def text_of(self, record: dict) -> str:
        return join_texts(record["messages"])


FORMATS.register("messages", MessagesFormat())
