"""``preference``: ``{prompt, chosen, rejected}`` for reward models and DPO-family training.

Each field may be a string or a messages list. When any of the three is a list, the strings are
turned into messages (prompt -> one user turn, chosen/rejected -> one assistant turn) so that a
record is either all text or all conversation: the stage then has one code path per record.
"""

from __future__ import annotations

from typing import Any

from lmwright.data.formats import FORMATS, field_error, join_texts, messages_list, required_str

HINT = "preference records need prompt, chosen and rejected (strings or messages lists), chosen != rejected"


def _part(record: dict, key: str, where: str, need_assistant: bool) -> Any:
    value = record.get(key)
    if isinstance(value, list):
        return messages_list(value, where, key, HINT, need_assistant=need_assistant)
    return required_str(record, key, where, HINT)


class PreferenceFormat:
    name = "preference"

    def canonicalize(self, record: dict, where: str) -> dict:
        prompt = _part(record, "prompt", where, need_assistant=False)
        chosen = _part(record, "chosen", where, need_assistant=True)
        rejected = _part(record, "rejected", where, need_assistant=True)
        if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(chosen, str):
                chosen = [{"role": "assistant", "content": chosen}]
            if isinstance(rejected, str):
                rejected = [{"role": "assistant", "content": rejected}]
        if chosen == rejected:
            raise field_error(where, "rejected", "identical to chosen", HINT)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def text_of(self, record: dict) -> str:
        return join_texts(record["prompt"], record["chosen"], record["rejected"])


FORMATS.register("preference", PreferenceFormat())
