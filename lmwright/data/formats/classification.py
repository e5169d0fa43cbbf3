"""``classification``: ``{text, label}``; the label is a class name (str) or a class id (int).

Integral floats (``1.0``, as parquet/pandas often store ids) become ints; booleans are refused,
because ``True`` as a class is almost always a column mix-up.
"""

from __future__ import annotations

from lmwright.data.formats import FORMATS, field_error, required_str

HINT = "classification records need text and label (a class name or an integer id)"


class ClassificationFormat:
    name = "classification"

    def canonicalize(self, record: dict, where: str) -> dict:
        text = required_str(record, "text", where, HINT)
        label = record.get("label")
        if label is None:
            raise field_error(where, "label", "missing", HINT)
        if isinstance(label, bool):
            raise field_error(where, "label", "must be a string or an integer, got bool", HINT)
        if isinstance(label, float):
            if not label.is_integer():
                raise field_error(where, "label", f"{label!r} is not an integer class id", HINT)
            label = int(label)
        elif isinstance(label, str):
            label = label.strip()
            if not label:
                raise field_error(where, "label", "empty", HINT)
        elif not isinstance(label, int):
            raise field_error(where, "label", f"must be a string or an integer, got {type(label).__name__}", HINT)
        return {"text": text, "label": label}

    def text_of(self, record: dict) -> str:
        return record["text"]


FORMATS.register("classification", ClassificationFormat())
