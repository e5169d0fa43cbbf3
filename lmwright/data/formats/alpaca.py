"""``alpaca``: instruction tuning records ``{system, instruction, input, output}``.

``input`` and ``system`` are optional and canonicalised to ``""`` so that every record has the same
keys (a table, not a bag of dicts). LLaMA-Factory's alpaca records may also carry ``history`` (earlier
[question, answer] pairs) and ``tools``: an alpaca record has room for neither, so non-empty ones are
refused with the fix (``data.format=messages`` reads the same record as a conversation).
"""

from __future__ import annotations

from lmwright.data.formats import FORMATS, field_error, join_texts, optional_str, required_str

HINT = "alpaca records need instruction and output; input and system are optional"


class AlpacaFormat:
    name = "alpaca"

    def canonicalize(self, record: dict, where: str) -> dict:
        for key, what in (("history", "earlier turns"), ("tools", "tool schemas")):
            if record.get(key) not in (None, "", "[]", []):
                raise field_error(where, key, f"alpaca records have no room for {what}",
                                  "set data.format=messages: it reads the same record as a conversation")
        return {
            "system": optional_str(record, "system", where, HINT),
            "instruction": required_str(record, "instruction", where, HINT),
            "input": optional_str(record, "input", where, HINT),
            "output": required_str(record, "output", where, HINT),
        }

    def text_of(self, record: dict) -> str:
        return join_texts(record.get("system", ""), record["instruction"], record.get("input", ""), record["output"])


FORMATS.register("alpaca", AlpacaFormat())
