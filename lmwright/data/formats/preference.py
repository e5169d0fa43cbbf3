"""``preference``: ``{prompt, chosen, rejected}`` for reward models and DPO-family training.

Read from:

- ``prompt`` / ``chosen`` / ``rejected``, each a string or a messages list (the TRL form);
- a conversation plus two replies, LLaMA-Factory's sharegpt ranking form: ``conversations`` (or
  OpenAI ``messages``) holds the prompt turns, ``chosen`` and ``rejected`` are one turn each
  (``{"from": "gpt", "value": ...}`` or ``{"role": "assistant", "content": ...}``), a list of turns or a
  string;
- LLaMA-Factory's alpaca ranking form: ``instruction`` (+ ``input``, ``history``) and string replies.

A ``system`` column becomes the prompt's first turn. When any of the three is a list, the strings are
turned into messages (prompt -> one user turn, chosen/rejected -> one assistant turn) so that a
record is either all text or all conversation: the stage then has one code path per record. A
conversation prompt must end with the user turn (or tool result) that the replies answer.
"""

from __future__ import annotations

from typing import Any

from lmwright.data.formats import (
    FORMATS,
    check_prompt_end,
    conversation,
    field_error,
    join_texts,
    messages_list,
    optional_str,
    required_str,
    with_system,
)

HINT = ("preference records need prompt (or sharegpt conversations), chosen and rejected (strings, turns or "
        "messages lists), chosen != rejected")


def reply(record: dict, key: str, where: str, hint: str) -> Any:
    """A reply field: a string, one turn (a dict) or a messages list with an assistant turn."""
    value = record.get(key)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return messages_list(value, where, key, hint, need_assistant=True)
    return required_str(record, key, where, hint)


def no_tools(record: dict, where: str, fmt: str) -> None:
    """Tool schemas are kept by ``messages`` records only, for now: refuse rather than drop them silently."""
    tools = record.get("tools")
    if tools not in (None, "", "[]", []):
        raise field_error(where, "tools", f"{fmt} records do not keep tool schemas yet",
                          "remove the tools column, or train on messages records")


def prompt_of(record: dict, where: str, hint: str) -> Any:
    """The prompt: ``prompt`` (a string or messages), else a conversation (sharegpt, OpenAI or alpaca layout)."""
    if "prompt" in record:
        value = record["prompt"]
        prompt = messages_list(value, where, "prompt", hint, need_assistant=False) if isinstance(value, list) \
            else required_str(record, "prompt", where, hint)
        if isinstance(prompt, list):
            check_prompt_end(prompt, where, "prompt", hint)
        elif not optional_str(record, "system", where, hint).strip():
            return prompt
        return with_system(_as_list(prompt, "user"), record, where, hint)
    msgs, key = conversation(record, where, hint, need_assistant=False)
    check_prompt_end(msgs, where, key, hint)
    msgs = with_system(msgs, record, where, hint)
    return msgs[0]["content"] if key == "instruction" and len(msgs) == 1 else msgs  # a plain instruction stays text


def _as_list(value: Any, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


class PreferenceFormat:
    name = "preference"

    def canonicalize(self, record: dict, where: str) -> dict:
        no_tools(record, where, "preference")
        prompt = prompt_of(record, where, HINT)
        chosen = reply(record, "chosen", where, HINT)
        rejected = reply(record, "rejected", where, HINT)
        if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
            prompt = _as_list(prompt, "user")
            chosen = _as_list(chosen, "assistant")
            rejected = _as_list(rejected, "assistant")
        if chosen == rejected:
            raise field_error(where, "rejected", "identical to chosen", HINT)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def text_of(self, record: dict) -> str:
        return join_texts(record["prompt"], record["chosen"], record["rejected"])


FORMATS.register("preference", PreferenceFormat())
