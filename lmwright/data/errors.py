"""The one error type of the data layer.

``DataError`` subclasses ``ValueError`` so callers that only know the standard library still catch
it; the CLI prints its message without a traceback (the message is meant for the user: it names the
file, the line and the field, and says how to fix it).
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file or record is wrong; ``str(e)`` says where (``file:line``) and how to fix it.

    ``reason`` is a short machine-readable tag (``malformed``, ``too_short``, ...) used to count
    rejects when ``on_error=skip``; ``file`` and ``line`` locate the record when known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 reason: str = "malformed"):
        super().__init__(message)
        self.file = file
        self.line = line
        self.reason = reason
