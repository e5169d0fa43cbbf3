"""The OpenAI-compatible HTTP layer (FastAPI), the same for every engine.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Bad input is answered with 4xx in OpenAI's error shape, never a 500 or a hang: unknown fields are
refused (``extra="forbid"``) except the common OpenAI fields listed in ``IGNORED_FIELDS``, which are
accepted and ignored on purpose so stock clients keep working.
"""


import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt

log = logging.getLogger("lmwright.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    model: str = opt("", "run, checkpoint or model folder to serve")
    name: str = opt("", "model id shown by /v1/models (default: the run folder's name)")
    host: str = opt("127.0.0.1", "interface to bind; anything but loopback requires an API key")
    port: int = opt(8000, "TCP port")
    api_key: str | None = opt(None, "required bearer token (or env LMWRIGHT_API_KEY, or api_key_file)")
    api_key_file: str | None = opt(None, "file whose first line is the API key")
    engine: Literal["builtin", "vllm"] = opt("builtin", "serving engine: builtin (CPU/GPU, embedded) or vllm (GPU)")
    max_seqs: int = opt(8, "maximum sequences decoded together (running batch)")
    prefill_chunk: int = opt(512, "builtin engine: most prompt tokens prefilled per scheduler step (longer "
                                  "prompts are prefilled in chunks between decode steps)")
    compile: bool = opt(False, "builtin engine, Llama models: torch.compile the decode step (compiled and "
                               "warmed up at start: seconds to a minute, cached afterwards)")
    queue_size: int = opt(32, "requests allowed to wait for a slot; beyond it -> 429")
    timeout_s: float = opt(300.0, "per-request time limit in seconds")
    max_request_bytes: int = opt(1_000_000, "largest request body accepted (413 beyond)")
    read_timeout_s: float = opt(30.0, "seconds a client may take to send a request's head (headers), and again "
                                      "its body; 408 beyond: a stalled or dribbled request holds no connection "
                                      "forever")
    default_max_tokens: int = opt(256, "max_tokens when a chat request gives none (capped by the context)")
    drain_timeout_s: float = opt(30.0, "on shutdown, how long in-flight requests may take to finish")
    guardrails: str | None = opt(None, "YAML file of guardrail rules (see lmwright.serve.guardrails)")
    allowed_hosts: list[str] = opt([], "servers without an API key: Host names accepted besides loopback and the "
                                       "bound host (DNS-rebinding guard); '*' accepts any")
    allowed_origins: list[str] = opt([], "servers without an API key: browser Origins (e.g. https://app.example) "
                                         "accepted besides loopback ones; '*' accepts any")
    max_embedding_inputs: int = opt(256, "most inputs in one /v1/embeddings request (400 beyond)")
    embedding_concurrency: int = opt(2, "/v1/embeddings requests computed at once; up to queue_size more wait, "
                                        "beyond -> 429")

    def check(self) -> None:
        if self.max_seqs < 1 or self.queue_size < 0:
            raise ConfigError("max_seqs must be >= 1 and queue_size >= 0")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if not self.read_timeout_s > 0:
            raise ConfigError(f"read_timeout_s must be > 0 seconds, got {self.read_timeout_s}")
        if self.max_embedding_inputs < 1 or self.embedding_concurrency < 1:
            raise ConfigError("max_embedding_inputs and embedding_concurrency must be >= 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The API key from the config, the environment or a file; refuse to expose an open server."""
    key = cfg.api_key or os.environ.get("LMWRIGHT_API_KEY")
    if not key and cfg.api_key_file:
        p = Path(cfg.api_key_file)
        if not p.is_file():
            raise ConfigError(f"api_key_file not found: {p}")
        key = p.read_text(encoding="utf-8").strip().splitlines()[0].strip() if p.read_text().strip() else ""
    if not key and cfg.host not in LOOPBACK:
        raise ConfigError(f"binding {cfg.host} exposes the server beyond this machine: set --api-key, "
                          "LMWRIGHT_API_KEY or api_key_file (or bind 127.0.0.1)")
    return key or None


# ---------------------------------------------------------------------------------------- metrics
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters and histograms written in Prometheus text exposition format by hand (no dependency)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = {"prompt": 0, "completion": 0}
        self.hist: dict[str, dict[str, Any]] = {}

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def observe(self, name: str, endpoint: str, value: float) -> None:
        h = self.hist.setdefault(f"{name}|{endpoint}", {"counts": [0] * len(BUCKETS), "sum": 0.0, "n": 0})
        for i, b in enumerate(BUCKETS):
            if value <= b:
                h["counts"][i] += 1
        h["sum"] += value
        h["n"] += 1

    def render(self, engines: dict[str, Any], guard_counters: dict[str, int]) -> str:
        out = ["# HELP lmwright_requests_total HTTP requests by endpoint and status code",
               "# TYPE lmwright_requests_total counter"]
        for (ep, st), n in sorted(self.requests.items()):
            out.append(f'lmwright_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
        out += ["# HELP lmwright_tokens_total tokens read (prompt) and written (completion)",
                "# TYPE lmwright_tokens_total counter"]
        for kind, n in self.tokens.items():
            out.append(f'lmwright_tokens_total{{kind="{kind}"}} {n}')
        for name, help_ in (("lmwright_request_latency_seconds", "request latency, first byte in to last byte out"),
                            ("lmwright_time_to_first_token_seconds", "time from request to the first token")):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            for key, h in sorted(self.hist.items()):
                hname, ep = key.split("|")
                if hname != name:
                    continue
                for b, c in zip(BUCKETS, h["counts"]):
                    out.append(f'{name}_bucket{{endpoint="{ep}",le="{b}"}} {c}')
                out.append(f'{name}_bucket{{endpoint="{ep}",le="+Inf"}} {h["n"]}')
                out.append(f'{name}_sum{{endpoint="{ep}"}} {h["sum"]:.6f}')
                out.append(f'{name}_count{{endpoint="{ep}"}} {h["n"]}')
        out += ["# HELP lmwright_queue_depth requests waiting for a slot", "# TYPE lmwright_queue_depth gauge"]
        for name, eng in engines.items():
            out.append(f'lmwright_queue_depth{{model="{name}"}} {eng.stats().get("queue_depth", 0)}')
        out += ["# HELP lmwright_active_sequences sequences in the running batch",
                "# TYPE lmwright_active_sequences gauge"]
        for name, eng in engines.items():
            out.append(f'lmwright_active_sequences{{model="{name}"}} {eng.stats().get("active_sequences", 0)}')
        out += ["# HELP lmwright_guardrail_firings_total guardrail rules that fired",
                "# TYPE lmwright_guardrail_firings_total counter"]
        for rule, n in sorted(guard_counters.items()):
            out.append(f'lmwright_guardrail_firings_total{{rule="{rule}"}} {n}')
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- the app
IGNORED_FIELDS = ("frequency_penalty", "presence_penalty", "logit_bias", "user", "response_format", "tools",
                  "tool_choice", "parallel_tool_calls", "functions", "function_call", "service_tier", "store",
                  "metadata", "modalities", "reasoning_effort", "prediction", "audio", "web_search_options",
                  "best_of", "suffix", "prompt_cache_key", "safety_identifier", "verbosity")


KNOWN_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    """The client closed the connection before its request body was complete: nobody to answer."""


MAX_JSON_DEPTH = 32  # a request body nested deeper is refused (deep nesting costs recursion, not bytes)
MAX_STOP = 4  # as OpenAI


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


def _hostname(host: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, cfg: ServeConfig) -> bool:
    """Whether a keyless server answers a request with this Host header (DNS rebinding guard)."""
    if "*" in cfg.allowed_hosts:
        return True
    name = _hostname(host).rstrip(".")
    allowed = set(LOOPBACK) | {h.lower() for h in cfg.allowed_hosts}
    if cfg.host not in ("0.0.0.0", "::", ""):
        allowed.add(cfg.host.lower())
    return name in allowed


def origin_allowed(origin: str, cfg: ServeConfig) -> bool:
    """Whether a keyless server answers a browser request from this Origin (cross-site request guard)."""
    from urllib.parse import urlsplit

    if "*" in cfg.allowed_origins or origin.rstrip("/") in {o.rstrip("/") for o in cfg.allowed_origins}:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _models_map(engine_or_models: Any, cfg: ServeConfig) -> dict[str, Any]:
    if isinstance(engine_or_models, dict):
        return dict(engine_or_models)
    name = cfg.name or getattr(engine_or_models, "name", None) or "model"
    return {name: engine_or_models}


def create_app(engine_or_models: Any, cfg: ServeConfig | None = None, guardrails=None):
    """A FastAPI app serving one or several models.

    ``engine_or_models``: a ``LoadedModel`` (from ``lmwright.serve.api.load``), an ``Engine``, or a
    dict of model id -> either. Generative ``LoadedModel`` get a built-in engine with the config's
    limits; encoders answer ``/v1/embeddings``.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lmwright.serve.engine import ContextOverflow, EngineClosed, GenerationRequest, QueueFull
    from lmwright.serve.generation import MAX_STOP_CHARS, REPETITION_PENALTY_RANGE, SEED_RANGE, SamplingParams
    from lmwright.serve.guardrails import Guardrails, load_guardrails

    cfg = cfg or ServeConfig()
    cfg.check()
    api_key = resolve_api_key(cfg)
    models = _models_map(engine_or_models, cfg)
    if guardrails is None:
        guardrails = load_guardrails(cfg.guardrails) if cfg.guardrails else next(
            (m.guardrails for m in models.values() if isinstance(getattr(m, "guardrails", None), Guardrails)),
            Guardrails())
    guard: Guardrails = guardrails
    engines: dict[str, Any] = {}
    encoders: dict[str, Any] = {}
    for name, m in models.items():
        if hasattr(m, "submit"):
            engines[name] = m
        elif getattr(m, "task", None) == "causal-lm":
            from lmwright.serve.engine import LocalEngine

            # one engine per app (not LoadedModel.engine()): the app's limits apply, its shutdown stops it
            engines[name] = LocalEngine(m.model, m.tokenizer, max_seqs=cfg.max_seqs, queue_size=cfg.queue_size,
                                        timeout_s=cfg.timeout_s, name=name, prefill_chunk=cfg.prefill_chunk,
                                        compile=cfg.compile)
        else:
            encoders[name] = m
    metrics = Metrics()
    created = int(time.time())
    embed_slots = asyncio.Semaphore(cfg.embedding_concurrency)
    embed_state = {"waiting": 0}  # embedding requests admitted (running or waiting for a slot)

    # ---------------------------------------------------------------- request schemas
    class _Base(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class ContentPart(_Base):
        type: Literal["text"]
        text: str

    class Message(_Base):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[ContentPart] | None = None
        name: str | None = None

    class StreamOptions(_Base):
        include_usage: bool = False
        include_obfuscation: bool | None = None

    sampling_fields = dict(
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
    from pydantic import create_model

    ChatRequest = create_model(  # noqa: N806 - a class
        "ChatRequest", __base__=_Base, messages=(list[Message], Field(..., min_length=1)),
        max_tokens=(int | None, Field(None, ge=1)), max_completion_tokens=(int | None, Field(None, ge=1)),
        logprobs=(bool, False), top_logprobs=(int | None, Field(None, ge=0, le=20)), **sampling_fields)
    CompletionRequest = create_model(  # noqa: N806
        "CompletionRequest", __base__=_Base, prompt=(str | list[str], ...),
        max_tokens=(int | None, Field(16, ge=1)), logprobs=(int | None, Field(None, ge=0, le=5)),
        echo=(bool, False), **sampling_fields)

    class EmbeddingRequest(_Base):
        model: str
        input: str | list[str]
        encoding_format: Literal["float", "base64"] | None = None
        dimensions: int | None = None
        user: Any = None

    # ---------------------------------------------------------------- app + errors
    async def lifespan(app):
        yield
        loop = asyncio.get_running_loop()
        for eng in engines.values():  # in-flight streams finish (bounded by drain_timeout_s)
            await loop.run_in_executor(None, eng.shutdown, cfg.drain_timeout_s)

    app = FastAPI(title="lmwright", lifespan=lifespan)
    app.state.engines, app.state.guardrails, app.state.metrics = engines, guard, metrics

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return err(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        kind = first.get("type", "")
        if kind == "json_invalid":
            return err(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        if kind == "extra_forbidden":
            return err(400, f"unknown field '{'.'.join(loc)}'", param=".".join(loc), code="unknown_field")
        return err(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param=".".join(loc) or None,
                   code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request, e):
        return err(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(_TooLarge)
    async def _too_large(request, e):
        return err(413, f"request body larger than {cfg.max_request_bytes} bytes", code="request_too_large",
                   headers={"connection": "close"})

    @app.exception_handler(_ClientGone)
    async def _client_gone(request, e):  # nginx's 499: counted in /metrics, sent to no one
        return err(499, "the client closed the connection before sending the whole request body",
                   code="client_closed_request", headers={"connection": "close"})

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        log.exception("unexpected error")
        return err(500, f"internal error: {type(e).__name__}", "server_error")

    def label(path: str) -> str:
        return path if path in KNOWN_PATHS else "other"  # a bounded label set

    def refuse(path: str, status: int, message: str, code: str):
        metrics.request(label(path), status)
        return err(status, message, "invalid_request_error", None, code)

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        path = request.url.path
        if not api_key:  # a keyless server is for this machine: no DNS rebinding, no cross-site requests
            host = request.headers.get("host", "")
            if not host_allowed(host, cfg):
                return refuse(path, 403, f"Host '{host}' is not allowed on a server without an API key; add it "
                                         "to allowed_hosts (--allowed-host) or set an API key", "host_not_allowed")
            origin = request.headers.get("origin")
            if origin is not None and not origin_allowed(origin, cfg):
                return refuse(path, 403, f"Origin '{origin}' is not allowed on a server without an API key; add it "
                                         "to allowed_origins (--allowed-origin) or set an API key",
                              "origin_not_allowed")
        if api_key and path != "/health":
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                metrics.request(path if path in KNOWN_PATHS else "other", 401)
                return err(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")
        if request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return refuse(path, 415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                         f"(got '{ctype or 'none'}')", "unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_request_bytes:
            metrics.request(path if path in KNOWN_PATHS else "other", 413)
            return err(413, f"request body larger than {cfg.max_request_bytes} bytes", code="request_too_large",
                       headers={"connection": "close"})  # the body is never read: no next request on this socket
        try:
            response = await call_next(request)
        except _TooLarge:
            response = err(413, f"request body larger than {cfg.max_request_bytes} bytes", code="request_too_large",
                           headers={"connection": "close"})
        metrics.request(path if path in KNOWN_PATHS else "other", response.status_code)  # bounded label set
        return response

    # ---------------------------------------------------------------- helpers
    def engine_for(model: str):
        if model in engines:
            return engines[model]
        if model in encoders:
            raise HTTPError(400, f"model '{model}' is an encoder; use /v1/embeddings", param="model",
                            code="model_not_generative")
        raise HTTPError(404, f"model '{model}' does not exist; available: {', '.join(models)}", param="model",
                        code="model_not_found")

    def build_params(req, prompt_len: int, ctx: int, default_max: int | None, logprobs: bool, top: int):
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is None:
            asked = max(1, min(default_max or cfg.default_max_tokens, ctx - prompt_len))
        if prompt_len + asked > ctx:
            raise HTTPError(400, f"this model's context is {ctx} tokens; the prompt has {prompt_len} and "
                                 f"max_tokens asks for {asked}. Shorten the prompt or lower max_tokens.",
                            param="max_tokens" if prompt_len < ctx else "messages", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise HTTPError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop",
                            code="invalid_value")
        if any(len(x) > MAX_STOP_CHARS for x in stop):
            raise HTTPError(400, f"stop: each stop string must be at most {MAX_STOP_CHARS} characters",
                            param="stop", code="invalid_value")
        try:
            p = SamplingParams(max_tokens=asked, temperature=1.0 if req.temperature is None else req.temperature,
                               top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                               repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed,
                               stop=guard.stop_strings(stop), logprobs=logprobs, top_logprobs=top, n=req.n,
                               timeout_s=cfg.timeout_s, stop_token_ids=[] if req.ignore_eos else None)
            p.check()
        except ConfigError as e:
            raise HTTPError(400, str(e)) from None
        return p

    def submit(engine, ids, params):
        try:
            return engine.submit(GenerationRequest(ids, params))
        except QueueFull as e:
            raise HTTPError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        except EngineClosed as e:
            raise HTTPError(503, str(e), "server_error", code="shutting_down") from None
        except ContextOverflow as e:
            raise HTTPError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ConfigError as e:
            raise HTTPError(400, str(e)) from None

    def token_text(engine, tid: int) -> str:
        return engine.tokenizer.decode([tid], skip_special_tokens=False)

    def chat_logprob(engine, lp) -> dict:
        t = token_text(engine, lp.token_id)
        tops = [{"token": token_text(engine, i), "logprob": v, "bytes": list(token_text(engine, i).encode())}
                for i, v in (lp.top_logprobs or [])]
        return {"token": t, "logprob": lp.logprob, "bytes": list(t.encode()), "top_logprobs": tops}

    async def watch_disconnect(request: Request, engine, rid: str):
        """Cancel a non-streaming request whose client went away (its slot is freed at once)."""
        while True:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                engine.cancel(rid)
                return

    async def collect(request: Request, engine, ids, params):
        """Run a request to the end: per choice (text, finish_reason, completion tokens, logprobs)."""
        stream = submit(engine, ids, params)
        watcher = asyncio.create_task(watch_disconnect(request, engine, stream.request_id))
        n = params.n
        texts, finish, ntok, lps = [""] * n, ["stop"] * n, [0] * n, [[] for _ in range(n)]
        try:
            async for ev in stream:
                texts[ev.index] += ev.text
                ntok[ev.index] = ev.completion_tokens
                if ev.logprob is not None:
                    lps[ev.index].append(ev.logprob)
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason
        finally:
            watcher.cancel()
            engine.cancel(stream.request_id)
        for f in finish:
            if f == "timeout":  # 504, not 408: the openai client retries 408 (and 5xx unless told not to)
                raise HTTPError(504, f"the request took longer than {params.timeout_s}s", "timeout_error",
                                code="timeout", headers={"x-should-retry": "false"})
            if f == "error":
                raise HTTPError(500, "generation failed", "server_error")
        return texts, finish, ntok, lps, stream

    async def guarded_choices(request, engine, ids, params):
        texts, finish, ntok, lps, stream = await collect(request, engine, ids, params)
        if guard.active_output:
            for i in range(len(texts)):
                v = guard.check_output(texts[i])
                tries = 0
                while not v.valid and tries < guard.cfg.output.json_retries:
                    tries += 1
                    guard._fire("output_json_retry")
                    one = SamplingParams(**{**params.__dict__, "n": 1,
                                            "seed": None if params.seed is None else params.seed + 1000 * tries + i})
                    t2, f2, n2, _, _ = await collect(request, engine, ids, one)
                    texts[i], finish[i], ntok[i] = t2[0], f2[0], ntok[i] + n2[0]
                    v = guard.check_output(texts[i])
                texts[i] = v.text
                if v.refused:
                    finish[i] = "content_filter"
        return texts, finish, ntok, lps, stream

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record(endpoint: str, t0: float, stream, prompt: int, completion: int) -> None:
        metrics.tokens["prompt"] += prompt
        metrics.tokens["completion"] += completion
        metrics.observe("lmwright_request_latency_seconds", endpoint, time.perf_counter() - t0)
        if stream is not None and stream.first_token_at is not None:
            metrics.observe("lmwright_time_to_first_token_seconds", endpoint, stream.first_token_at - stream.created)

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(request: Request, engine, stream, params, endpoint: str, t0: float, prompt_len: int,
                            make_chunk, include_usage: bool, rid: str, first_chunks: list[dict]):
        """SSE: chunks as tokens arrive; the client going away cancels the request (frees its slot)."""
        n = params.n
        guards = [guard.stream_filter() for _ in range(n)]
        ntok = [0] * n
        try:
            for c in first_chunks:
                yield sse(c)
            async for ev in stream:
                ntok[ev.index] = ev.completion_tokens
                if ev.finish_reason in ("timeout", "error"):
                    msg = "the request timed out" if ev.finish_reason == "timeout" else "generation failed"
                    yield sse(error_body(msg, "timeout_error" if ev.finish_reason == "timeout" else "server_error"))
                    continue
                text = guards[ev.index].push(ev.text)
                finish = ev.finish_reason
                if finish:
                    text += guards[ev.index].finish()
                    if finish == "cancelled":
                        finish = "stop"
                    if guards[ev.index].refused:
                        finish = "content_filter"
                if text or finish or ev.logprob is not None:
                    yield sse(make_chunk(ev.index, text, finish, ev.logprob))
            if include_usage:
                yield sse({"id": rid, "object": first_chunks[0]["object"] if first_chunks else "chat.completion.chunk",
                           "created": int(time.time()), "model": params_model(first_chunks), "choices": [],
                           "usage": usage(prompt_len, sum(ntok))})
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(stream.request_id)
            record(endpoint, t0, stream, prompt_len, sum(ntok))

    def params_model(chunks):
        return chunks[0]["model"] if chunks else ""

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(engines, guard.counters),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "lmwright"}
                                           for n in models]}

    async def read_body(request: Request) -> bytes:
        """The request body, at most max_request_bytes (413), within read_timeout_s (408)."""
        from starlette.requests import ClientDisconnect

        body = bytearray()
        try:
            async with asyncio.timeout(cfg.read_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > cfg.max_request_bytes:
                        raise _TooLarge()
        except TimeoutError:
            # the connection closes after the answer: the rest of a late body must not read as a new request
            raise HTTPError(408, f"the request body did not arrive within {cfg.read_timeout_s} s "
                                 f"({len(body)} bytes received)", code="request_timeout",
                            headers={"connection": "close"}) from None
        except ClientDisconnect:
            raise _ClientGone() from None
        return bytes(body)

    async def parse(request: Request, schema):
        body = await read_body(request)
        try:
            data = json.loads(body)
        except ValueError as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            data = None
        if data is None or json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            raise HTTPError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels",
                            code="invalid_json")
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
        if has_lone_surrogate(data):
            raise HTTPError(400, "the request body has a string with an unpaired UTF-16 surrogate escape "
                                 "(e.g. \\ud800): not Unicode text", code="invalid_json")
        from pydantic import ValidationError

        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        req = await parse(request, ChatRequest)
        engine = engine_for(req.model)
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        loop = asyncio.get_running_loop()
        # guardrail regexes, the chat template and the tokenizer take time on a huge prompt: off the event loop
        messages, verdict = await loop.run_in_executor(None, guard.check_messages, messages)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if verdict.refused:
            return refusal_response(req, rid, "chat")
        from lmwright.data.chat import render_prompt_ids

        try:
            ids = await loop.run_in_executor(None, render_prompt_ids, engine.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise HTTPError(400, f"cannot render the conversation with the chat template: {e}",
                            param="messages") from None
        params = build_params(req, len(ids), engine.max_context, None, bool(req.logprobs or req.top_logprobs),
                              req.top_logprobs or 0)

        def chunk(i, text, finish, lp):
            delta = {"content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                    "system_fingerprint": None,
                    "choices": [{"index": i, "delta": delta,
                                 "logprobs": {"content": [chat_logprob(engine, lp)]} if lp is not None else None,
                                 "finish_reason": finish}]}

        if req.stream:
            stream = submit(engine, ids, params)
            firsts = [{"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                       "system_fingerprint": None,
                       "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]} for i in range(params.n)]
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(request, engine, stream, params, "chat", t0, len(ids), chunk,
                                                   include, rid, firsts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, finish, ntok, lps, stream = await guarded_choices(request, engine, ids, params)
        record("chat", t0, stream, len(ids), sum(ntok))
        choices = []
        for i in range(params.n):
            lp = {"content": [chat_logprob(engine, x) for x in lps[i]]} if params.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                            "logprobs": lp, "finish_reason": finish[i]})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None, "choices": choices, "usage": usage(len(ids), sum(ntok))}

    def refusal_response(req, rid: str, kind: str):
        text = guard.refusal
        if kind == "chat":
            if req.stream:
                def gen():
                    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": req.model, "system_fingerprint": None}
                    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                                    "logprobs": None, "finish_reason": None}]})
                    yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": "content_filter"}]})
                    yield "data: [DONE]\n\n"
                return StreamingResponse(gen(), media_type="text/event-stream")
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                 "logprobs": None, "finish_reason": "content_filter"} for i in range(req.n)],
                    "usage": usage(0, 0)}
        if req.stream:
            def gen2():
                yield sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                           "choices": [{"index": 0, "text": text, "logprobs": None,
                                        "finish_reason": "content_filter"}]})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen2(), media_type="text/event-stream")
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": "content_filter"}
                            for i in range(req.n)], "usage": usage(0, 0)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        req = await parse(request, CompletionRequest)
        engine = engine_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if len(prompts) != 1:
            raise HTTPError(400, "send one prompt per request (use n for several choices)", param="prompt")
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(None, guard.check_input, prompts[0])  # off the event loop, as chat
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if verdict.refused:
            return refusal_response(req, rid, "completion")
        ids = await loop.run_in_executor(None, lambda: list(engine.tokenizer(verdict.text)["input_ids"]))
        nlp = req.logprobs
        params = build_params(req, len(ids), engine.max_context, req.max_tokens, nlp is not None, nlp or 0)
        prefix = verdict.text if req.echo else ""

        def lp_obj(lps):
            return {"tokens": [token_text(engine, x.token_id) for x in lps],
                    "token_logprobs": [x.logprob for x in lps],
                    "top_logprobs": [{token_text(engine, i): v for i, v in (x.top_logprobs or [])} for x in lps],
                    "text_offset": []}

        def chunk(i, text, finish, lp):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                    "choices": [{"index": i, "text": text, "logprobs": lp_obj([lp]) if lp is not None else None,
                                 "finish_reason": finish}]}

        if req.stream:
            stream = submit(engine, ids, params)
            firsts = [chunk(i, prefix, None, None) for i in range(params.n)] if prefix else []
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(request, engine, stream, params, "completions", t0, len(ids),
                                                   chunk, include, rid, firsts), media_type="text/event-stream")
        texts, finish, ntok, lps, stream = await guarded_choices(request, engine, ids, params)
        record("completions", t0, stream, len(ids), sum(ntok))
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": i, "text": prefix + texts[i], "finish_reason": finish[i],
                             "logprobs": lp_obj(lps[i]) if nlp is not None else None} for i in range(params.n)],
                "usage": usage(len(ids), sum(ntok))}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        t0 = time.perf_counter()
        req = await parse(request, EmbeddingRequest)
        if req.model not in models:
            raise HTTPError(404, f"model '{req.model}' does not exist; available: {', '.join(models)}",
                            param="model", code="model_not_found")
        m = models[req.model]
        if not hasattr(m, "embed"):
            raise HTTPError(400, f"model '{req.model}' cannot embed", param="model")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise HTTPError(400, "input must be a non-empty string or list of non-empty strings", param="input")
        if len(texts) > cfg.max_embedding_inputs:
            raise HTTPError(400, f"input: at most {cfg.max_embedding_inputs} inputs per request, got {len(texts)}",
                            param="input", code="too_many_inputs")
        if embed_state["waiting"] >= cfg.queue_size + cfg.embedding_concurrency:
            raise HTTPError(429, "too many embedding requests in flight; retry later", "rate_limit_error",
                            code="rate_limit_exceeded")
        loop = asyncio.get_running_loop()
        embed_state["waiting"] += 1
        try:
            async with embed_slots:  # at most embedding_concurrency run at once; the rest wait here
                vecs = await loop.run_in_executor(None, m.embed, texts)
                ntok = await loop.run_in_executor(None, m.count_tokens, texts)
        finally:
            embed_state["waiting"] -= 1
        metrics.tokens["prompt"] += ntok
        metrics.observe("lmwright_request_latency_seconds", "embeddings", time.perf_counter() - t0)
        if req.encoding_format == "base64":  # what the openai client asks for by default: float32 LE bytes
            import base64
            import struct

            vecs = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vecs]
        return {"object": "list", "model": req.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": ntok, "total_tokens": ntok}}

    return app


def h11_with_read_deadline(seconds: float):
    """uvicorn's h11 protocol, plus a deadline on the request head: uvicorn times out idle keep-alive
    connections but not a head that stops half way (or a connection that sends nothing), so a client
    sending headers a byte a minute held its socket forever. A head not complete ``seconds`` after its
    first byte (or after the connection opened) gets a 408 and the connection closes. The body's deadline
    is the app's (``read_body``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(error_body(f"the request head did not arrive within {seconds} s", "invalid_request_error",
                                 code="request_timeout")).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n" % len(body)) + body

    class H11WithReadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # waiting for a request head
                self._head_bytes += len(data)
                if self._head_timer is None:
                    self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete (or refused)
                self._disarm()
                self._head_bytes = 0

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self._head_bytes:  # part of a head: tell the client; an empty connection just closes
                log.info("closing %s: its request head did not arrive within %s s", self.client, seconds)
                self.transport.write(reply)
            self.transport.close()

    return H11WithReadDeadline


def uvicorn_options(cfg: ServeConfig) -> dict[str, Any]:
    """The uvicorn settings ``serve`` runs with (for ``uvicorn.run`` or ``uvicorn.Config``)."""
    return dict(host=cfg.host, port=cfg.port, log_level="info", http=h11_with_read_deadline(cfg.read_timeout_s),
                timeout_graceful_shutdown=int(cfg.drain_timeout_s) + 1)


def serve(app, cfg: ServeConfig) -> None:
    """Run the app with uvicorn; SIGINT/SIGTERM stop accepting, finish in-flight streams, then exit."""
    import signal
    import threading

    import uvicorn

    if threading.current_thread() is threading.main_thread():
        # uvicorn drains, then re-raises the signal it caught; after a clean drain that is a normal exit
        def _exit_clean(signum, frame):
            raise SystemExit(0)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_clean)
    uvicorn.run(app, **uvicorn_options(cfg))
