"""OpenAI response bodies and streaming chunks: each shape is built here, once.

Every path that answers ``/v1/chat/completions`` or ``/v1/completions`` (streamed tokens, the first role
chunk, the usage chunk, guardrail refusals, whole responses) goes through these builders, so a field added
or renamed changes every answer at once. Light on purpose: no FastAPI, no pydantic.
"""

from __future__ import annotations

import json
import time
from typing import Any

CHAT_CHUNK = "chat.completion.chunk"
CHAT_COMPLETION = "chat.completion"
TEXT_COMPLETION = "text_completion"
SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------- logprobs
def token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False)


def chat_logprob(tokenizer, lp) -> dict:
    """One token's entry in a chat answer's ``logprobs.content``."""
    t = token_text(tokenizer, lp.token_id)
    tops = [{"token": token_text(tokenizer, i), "logprob": v, "bytes": list(token_text(tokenizer, i).encode())}
            for i, v in (lp.top_logprobs or [])]
    return {"token": t, "logprob": lp.logprob, "bytes": list(t.encode()), "top_logprobs": tops}


def completion_logprobs(tokenizer, lps) -> dict:
    """A ``/v1/completions`` choice's ``logprobs`` object (legacy shape) for these tokens."""
    return {"tokens": [token_text(tokenizer, x.token_id) for x in lps],
            "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{token_text(tokenizer, i): v for i, v in (x.top_logprobs or [])} for x in lps],
            "text_offset": []}


# ---------------------------------------------------------------------------------------- chat
def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None, created: int | None = None) -> dict:
    """A ``chat.completion.chunk`` with one choice: the only place such a chunk is built."""
    return {"id": rid, "object": CHAT_CHUNK, "created": int(time.time()) if created is None else created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: dict | None = None,
                tools: list[dict] | None = None) -> dict:
    """One non-streamed chat choice. With the request's ``tools``, calls in the answer become ``tool_calls``
    (finish_reason ``tool_calls``), see :mod:`lmwright.serve.toolcalls`."""
    message: dict = {"role": "assistant", "content": content, "refusal": None}
    if tools:
        from lmwright.serve.toolcalls import parse_tool_calls

        rest, calls = parse_tool_calls(content, tools)
        if calls:
            message.update(content=rest, tool_calls=calls)
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(rid: str, model: str, choices: list[dict], usage_: dict, fingerprint: bool = True) -> dict:
    """A whole ``chat.completion``. ``fingerprint=False``: without ``system_fingerprint`` (as guardrail
    refusals have always been answered)."""
    out = {"id": rid, "object": CHAT_COMPLETION, "created": int(time.time()), "model": model}
    if fingerprint:
        out["system_fingerprint"] = None
    return {**out, "choices": choices, "usage": usage_}


# ---------------------------------------------------------------------------------------- completions
def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """A ``text_completion``: a whole answer (with ``usage``) or, without it, one streamed chunk."""
    out = {"id": rid, "object": TEXT_COMPLETION, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage_chunk(rid: str, first_chunks: list[dict], usage_: dict) -> dict:
    """The last chunk of a stream asked for with ``stream_options.include_usage``: no choices, the usage.
    Its object and model are the first chunk's; a stream that sent no first chunk (a completion without
    ``echo``) says ``chat.completion.chunk`` and model ``""``, as it always has."""
    return {"id": rid, "object": first_chunks[0]["object"] if first_chunks else CHAT_CHUNK,
            "created": int(time.time()), "model": first_chunks[0]["model"] if first_chunks else "", "choices": [],
            "usage": usage_}


# ---------------------------------------------------------------------------------------- other endpoints
def model_list(names, created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "lmwright"}
                                       for n in names]}


def embedding_list(model: str, vectors: list, ntok: int) -> dict:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": ntok, "total_tokens": ntok}}
