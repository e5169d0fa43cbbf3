"""Errors the HTTP layer answers in OpenAI's error shape (``{"error": {message, type, param, code}}``).

Light on purpose (no FastAPI, no pydantic): ``lmwright.serve.http`` imports it at module level.
"""

from __future__ import annotations


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class HTTPError(Exception):
    """Raised anywhere below a handler; the app answers it as ``status`` with ``error_body``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class BodyTooLarge(Exception):
    """The request body grew past ``max_request_bytes`` while it was read (413)."""


class ClientGone(Exception):
    """The client closed the connection before its request body was complete: nobody to answer."""
