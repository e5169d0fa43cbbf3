"""``text``: plain text records ``{"text": str}`` (pretraining, tokenizer training)."""

from __future__ import annotations

from lmwright.data.formats import FORMATS, required_str

HINT = "text records need a 'text' string"


class TextFormat:
    name = "text"

    def canonicalize(self, record: dict, where: str) -> dict:
        return {"text": required_str(record, "text", where, HINT)}

    def text_of(self, record: dict) -> str:
        return record["text"]


FORMATS.register("text", TextFormat())
