"""Request schemas of the OpenAI-compatible API and their validation, apart from the handlers.

Unknown fields are refused (``extra="forbid"``) except the common OpenAI fields listed in
``IGNORED_FIELDS``, which are accepted and ignored on purpose so stock clients keep working. Every
refusal is an ``HTTPError`` (400) naming the field. Imported by the app only (pydantic at module level).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lmwright.config import ConfigError
from lmwright.engine.sampling import MAX_STOP_CHARS, REPETITION_PENALTY_RANGE, SEED_RANGE, SamplingParams
from lmwright.serve.errors import HTTPError

IGNORED_FIELDS = ("frequency_penalty", "presence_penalty", "logit_bias", "user", "response_format",
                  "parallel_tool_calls", "functions", "function_call", "service_tier", "store",
                  "metadata", "modalities", "reasoning_effort", "prediction", "audio", "web_search_options",
                  "best_of", "suffix", "prompt_cache_key", "safety_identifier", "verbosity")
MAX_JSON_DEPTH = 32  # a request body nested deeper is refused (deep nesting costs recursion, not bytes)
MAX_STOP = 4  # as OpenAI


# ---------------------------------------------------------------------------------------- schemas
class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Base):
    type: Literal["text"]
    text: str


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant turn that called tools (arguments as a JSON string)
    tool_call_id: str | None = None  # a tool turn: the call it answers


class StreamOptions(_Base):
    include_usage: bool = False
    include_obfuscation: bool | None = None


# built with create_model, request fields first: the field order decides which error a bad body reports
_SAMPLING_FIELDS = dict(
    model=(str, ...),
    temperature=(float | None, Field(None, ge=0, le=2)),
    top_p=(float | None, Field(None, gt=0, le=1)),
    n=(int, Field(1, ge=1, le=16)),
    stream=(bool, False),
    stream_options=(StreamOptions | None, None),
    stop=(str | list[str] | None, None),
    seed=(int | None, Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])),
    top_k=(int | None, Field(None, ge=0)),  # extension, as in vLLM
    repetition_penalty=(float | None, Field(None, ge=REPETITION_PENALTY_RANGE[0],
                                            le=REPETITION_PENALTY_RANGE[1])),  # extension, as in vLLM
    ignore_eos=(bool, False),  # extension, as in vLLM: end only at max_tokens or a stop string
    **{f: (Any, None) for f in IGNORED_FIELDS},
)

ChatRequest = create_model(
    "ChatRequest", __base__=_Base, messages=(list[Message], Field(..., min_length=1)),
    max_tokens=(int | None, Field(None, ge=1)), max_completion_tokens=(int | None, Field(None, ge=1)),
    logprobs=(bool, False), top_logprobs=(int | None, Field(None, ge=0, le=20)),
    tools=(list[dict] | None, None), tool_choice=(str | dict | None, None), **_SAMPLING_FIELDS)
CompletionRequest = create_model(
    "CompletionRequest", __base__=_Base, prompt=(str | list[str], ...),
    max_tokens=(int | None, Field(16, ge=1)), logprobs=(int | None, Field(None, ge=0, le=5)),
    echo=(bool, False), **_SAMPLING_FIELDS)


class EmbeddingRequest(_Base):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: Any = None


# ---------------------------------------------------------------------------------------- the body
def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops counting past ``limit``."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string (key or value) with an unpaired surrogate (``"\\ud800"``):
    valid JSON, but not Unicode text; the tokenizer and the UTF-8 response encoder both fail on it."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def validation_error(errors: list[dict]) -> HTTPError:
    """The 400 for a body that does not fit its schema, naming the first offending field."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return HTTPError(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind == "extra_forbidden":
        return HTTPError(400, f"unknown field '{'.'.join(loc)}'", param=".".join(loc), code="unknown_field")
    return HTTPError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}",
                     param=".".join(loc) or None, code="invalid_value")


def parse_body(body: bytes, schema: type[BaseModel]) -> BaseModel:
    """A request body checked as JSON (depth, an object, Unicode text) and validated against ``schema``."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise HTTPError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        data = None
    if data is None or json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise HTTPError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
    if has_lone_surrogate(data):
        raise HTTPError(400, "the request body has a string with an unpaired UTF-16 surrogate escape "
                             "(e.g. \\ud800): not Unicode text", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


# ---------------------------------------------------------------------------------------- fields
def chat_messages(req) -> list[dict]:
    """The conversation as chat-template messages: text parts joined, ``developer`` read as ``system``;
    assistant ``tool_calls`` and ``tool`` results in the same form training renders them
    (:func:`lmwright.data.formats.tool_calls`), so a served conversation has the trained tokens."""
    from lmwright.data.errors import DataError
    from lmwright.data.formats import tool_calls

    messages = []
    for i, m in enumerate(req.messages):
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise HTTPError(400, f"messages[{i}].tool_calls: only assistant messages call tools",
                                param=f"messages[{i}].tool_calls")
            try:
                msg["tool_calls"] = tool_calls(m.tool_calls, "request", f"messages[{i}].tool_calls", from_json=False)
            except DataError as e:
                raise HTTPError(400, str(e), param=f"messages[{i}].tool_calls") from None
        if m.role == "tool":
            msg.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v})
        messages.append(msg)
    return messages


def request_tools(req) -> list[dict] | None:
    """The tools the chat template is given (normalised as in training), None without tools or with
    ``tool_choice: "none"``. Forcing a call (``required`` or a named function) is not supported: 400."""
    from lmwright.data.errors import DataError
    from lmwright.data.formats import tools_list

    if not req.tools or req.tool_choice == "none":
        return None
    if req.tool_choice not in (None, "auto"):
        raise HTTPError(400, f"tool_choice={json.dumps(req.tool_choice)} is not supported: use \"auto\" (the model "
                             "decides) or \"none\"", param="tool_choice", code="unsupported_tool_choice")
    try:
        return tools_list(req.tools, "request", "tools")
    except DataError as e:
        raise HTTPError(400, str(e), param="tools") from None


def completion_prompt(req) -> str:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if len(prompts) != 1:
        raise HTTPError(400, "send one prompt per request (use n for several choices)", param="prompt")
    return prompts[0]


def embedding_inputs(req, max_inputs: int) -> list[str]:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise HTTPError(400, "input must be a non-empty string or list of non-empty strings", param="input")
    if len(texts) > max_inputs:
        raise HTTPError(400, f"input: at most {max_inputs} inputs per request, got {len(texts)}",
                        param="input", code="too_many_inputs")
    return texts


def stop_strings(req) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise HTTPError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop",
                        code="invalid_value")
    if any(len(x) > MAX_STOP_CHARS for x in stop):
        raise HTTPError(400, f"stop: each stop string must be at most {MAX_STOP_CHARS} characters",
                        param="stop", code="invalid_value")
    return stop


def max_new_tokens(req, prompt_len: int, ctx: int, default_max: int) -> int:
    """The completion budget asked for (or ``default_max``, capped by the context); 400 past the context."""
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is None:
        asked = max(1, min(default_max, ctx - prompt_len))
    if prompt_len + asked > ctx:
        raise HTTPError(400, f"this model's context is {ctx} tokens; the prompt has {prompt_len} and "
                             f"max_tokens asks for {asked}. Shorten the prompt or lower max_tokens.",
                        param="max_tokens" if prompt_len < ctx else "messages", code="context_length_exceeded")
    return asked


def sampling_params(req, prompt_len: int, ctx: int, *, default_max: int, logprobs: bool, top_logprobs: int,
                    timeout_s: float, guard) -> SamplingParams:
    """The engine's ``SamplingParams`` for a chat or completion request, every limit checked (400)."""
    asked = max_new_tokens(req, prompt_len, ctx, default_max)
    stop = stop_strings(req)
    try:
        p = SamplingParams(max_tokens=asked, temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                           repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed,
                           stop=guard.stop_strings(stop), logprobs=logprobs, top_logprobs=top_logprobs, n=req.n,
                           timeout_s=timeout_s, stop_token_ids=[] if req.ignore_eos else None)
        p.check()
    except ConfigError as e:
        raise HTTPError(400, str(e)) from None
    return p
