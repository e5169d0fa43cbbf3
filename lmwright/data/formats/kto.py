"""``kto``: unpaired feedback ``{prompt, completion, label}`` for KTO (``lmwright train dpo loss=kto``).

One reply judged on its own: ``label`` true means desirable, false undesirable. Read from:

- LLaMA-Factory's kto form: ``messages`` (OpenAI role/content) or ``conversations`` (sharegpt
  from/value) whose last turn is the judged assistant reply, plus a boolean ``label`` (its kto_tag);
- TRL's unpaired form: ``prompt`` and ``completion`` (strings or messages lists) plus ``label``;
- an alpaca-layout record: ``instruction`` (+ ``input``, ``history``), ``output`` and ``label``.

A ``system`` column becomes the prompt's first turn. Canonical record: ``prompt`` (messages ending with
the user turn or tool result the reply answers), ``completion`` (messages: the assistant reply) and
``label`` (a bool; ``true``/``false``/``1``/``0`` from csv files are read as such).
"""

from __future__ import annotations

from lmwright.data.formats import (
    FORMATS,
    check_prompt_end,
    conversation,
    field_error,
    join_texts,
    messages_list,
    required_str,
    with_system,
)
from lmwright.data.formats.preference import no_tools, reply

HINT = ("kto records need messages (or sharegpt conversations) ending with the judged assistant reply, or "
        "prompt + completion, and a boolean label (true = desirable)")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def label_of(record: dict, where: str) -> bool:
    value = record.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if value is None:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        raise field_error(where, "label", "missing", f"{HINT}; the record has: {keys} - rename with data.columns "
                          "(e.g. {kto_tag: label})")
    raise field_error(where, "label", f"must be true or false, got {value!r}", HINT)


class KTOFormat:
    name = "kto"

    def canonicalize(self, record: dict, where: str) -> dict:
        no_tools(record, where, "kto")
        label = label_of(record, where)
        if "completion" in record:
            value = record.get("prompt")
            prompt = messages_list(value, where, "prompt", HINT, need_assistant=False) if isinstance(value, list) \
                else [{"role": "user", "content": required_str(record, "prompt", where, HINT)}]
            completion = reply(record, "completion", where, HINT)
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            key = "prompt"
        else:
            msgs, key = conversation(record, where, HINT, need_assistant=True)
            last = len(msgs) - 1
            if msgs[last]["role"] != "assistant":
                raise field_error(where, f"{key}[{last}]", f"the last turn is the {msgs[last]['role']} turn; it must "
                                  "be the assistant reply that the label judges", HINT)
            if not (msgs[last]["content"].strip() or msgs[last].get("tool_calls")):
                raise field_error(where, f"{key}[{last}]", "the judged reply is empty", HINT)
            prompt, completion = msgs[:last], msgs[last:]
            if not prompt:
                raise field_error(where, key, "the conversation has only the reply; it needs the user turn it "
                                  "answers", HINT)
        check_prompt_end(prompt, where, key, HINT)
        return {"prompt": with_system(prompt, record, where, HINT), "completion": completion, "label": label}

    def text_of(self, record: dict) -> str:
        return join_texts(record["prompt"], record["completion"])


FORMATS.register("kto", KTOFormat())
