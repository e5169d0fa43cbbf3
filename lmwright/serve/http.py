"""The OpenAI-compatible HTTP layer (FastAPI), the same for every engine.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Bad input is answered with 4xx in OpenAI's error shape, never a 500 or a hang: unknown fields are
refused (``extra="forbid"``) except the common OpenAI fields listed in ``schemas.IGNORED_FIELDS``, which
are accepted and ignored on purpose so stock clients keep working.

This module: the config, the wiring (``create_app``: routes, error handlers, the ``gate`` middleware for
Host/Origin, API key, content type and body size) and uvicorn. Request schemas and validation live in
``schemas``, response and chunk shapes in ``formats``, the endpoints in ``handlers``.
"""


import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmwright.config import ConfigError, opt
from lmwright.serve.errors import BodyTooLarge, ClientGone, HTTPError, error_body

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
    prefix_cache_mb: float = opt(256.0, "builtin engine, Llama models: memory kept for finished prompts' KV, so a "
                                        "prompt starting with the same tokens (system prompt, earlier chat turns) "
                                        "runs only the rest; 0 = off")
    threads: int = opt(0, "builtin engine: torch threads for decode steps (0 = torch's default, one per core; on a "
                          "small machine shared with other work, fewer leave a core to the HTTP thread)")
    prefill_threads: int = opt(0, "builtin engine: torch threads for steps with 64 or more prompt tokens (0 = every "
                                  "core this process may use; never fewer than threads)")
    compile: bool = opt(False, "builtin engine, Llama models: torch.compile the decode step (compiled and "
                               "warmed up at start: seconds to a minute, cached afterwards)")
    weights: Literal["auto", "float32", "bfloat16", "int8"] = opt(
        "auto", "builtin engine, CPU: weight precision. auto = bfloat16 where a short probe (cached) shows bf16 "
                "weights decode >= 1.15x faster than fp32 on this machine (or with AMX), else float32; int8 = "
                "weight-only int8 (opt-in: answers change slightly); on CUDA auto keeps the loaded dtype")
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
        if not self.prefix_cache_mb >= 0:
            raise ConfigError(f"prefix_cache_mb must be >= 0 (0 turns it off), got {self.prefix_cache_mb}")
        if self.threads < 0 or self.prefill_threads < 0:
            raise ConfigError(f"threads and prefill_threads must be >= 0 (0 = the default), got {self.threads} and "
                              f"{self.prefill_threads}")
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
        stats = {name: eng.stats() for name, eng in engines.items()}
        for metric, key, kind, help_ in (
                ("lmwright_queue_depth", "queue_depth", "gauge", "requests waiting for a slot"),
                ("lmwright_active_sequences", "active_sequences", "gauge", "sequences in the running batch"),
                ("lmwright_prefix_cache_hit_tokens_total", "prefix_hit_tokens", "counter",
                 "prompt tokens whose KV was copied from the prefix cache instead of computed")):
            out += [f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}"]
            for name, st in stats.items():
                out.append(f'{metric}{{model="{name}"}} {st.get(key, 0)}')
        out += ["# HELP lmwright_guardrail_firings_total guardrail rules that fired",
                "# TYPE lmwright_guardrail_firings_total counter"]
        for rule, n in sorted(guard_counters.items()):
            out.append(f'lmwright_guardrail_firings_total{{rule="{rule}"}} {n}')
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- the app
KNOWN_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics")


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


def _models_map(engine_or_models: Any, cfg: ServeConfig) -> dict[str, Any]:
    if isinstance(engine_or_models, dict):
        return dict(engine_or_models)
    name = cfg.name or getattr(engine_or_models, "name", None) or "model"
    return {name: engine_or_models}




def _app_state(engine_or_models: Any, cfg: ServeConfig, guardrails):
    """The handlers' shared state: generative models get an engine with the app's limits, the rest embed."""
    from lmwright.serve.guardrails import Guardrails, load_guardrails
    from lmwright.serve.handlers import AppState

    api_key = resolve_api_key(cfg)  # before any engine starts: an open server is refused first
    models = _models_map(engine_or_models, cfg)
    if guardrails is None:
        guardrails = load_guardrails(cfg.guardrails) if cfg.guardrails else next(
            (m.guardrails for m in models.values() if isinstance(getattr(m, "guardrails", None), Guardrails)),
            Guardrails())
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
                                        compile=cfg.compile, prefix_cache_mb=cfg.prefix_cache_mb,
                                        threads=cfg.threads or None, prefill_threads=cfg.prefill_threads or None)
        else:
            encoders[name] = m
    return AppState(cfg=cfg, api_key=api_key, models=models, engines=engines, encoders=encoders,
                    guard=guardrails, metrics=Metrics(), created=int(time.time()),
                    embed_slots=asyncio.Semaphore(cfg.embedding_concurrency))


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _too_large(cfg: ServeConfig):
    # the connection closes: the rest of the body is never read, so no next request on this socket
    return error_response(413, f"request body larger than {cfg.max_request_bytes} bytes", code="request_too_large",
                          headers={"connection": "close"})


def _add_error_handlers(app, cfg: ServeConfig) -> None:
    """Every error leaves in OpenAI's shape; nothing unexpected becomes anything but a 500 with that shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lmwright.serve.schemas import validation_error

    async def http_error(request, e: HTTPError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    async def validation(request, e: RequestValidationError):
        return await http_error(request, validation_error(e.errors()))

    async def starlette(request, e):
        return error_response(e.status_code, str(e.detail),
                              "invalid_request_error" if e.status_code < 500 else "server_error")

    async def too_large(request, e):
        return _too_large(cfg)

    async def client_gone(request, e):  # nginx's 499: counted in /metrics, sent to no one
        return error_response(499, "the client closed the connection before sending the whole request body",
                              code="client_closed_request", headers={"connection": "close"})

    async def unexpected(request, e):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    for exc, handler in ((HTTPError, http_error), (RequestValidationError, validation),
                         (StarletteHTTPException, starlette), (BodyTooLarge, too_large), (ClientGone, client_gone),
                         (Exception, unexpected)):
        app.add_exception_handler(exc, handler)


def _label(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"  # a bounded label set


def _refusal(state, request) -> tuple[int, str, str] | None:
    """Why the gate refuses a request before its body is read (status, message, code), or None."""
    cfg = state.cfg
    if not state.api_key:  # a keyless server is for this machine: no DNS rebinding, no cross-site requests
        host = request.headers.get("host", "")
        if not host_allowed(host, cfg):
            return 403, (f"Host '{host}' is not allowed on a server without an API key; add it to allowed_hosts "
                         "(--allowed-host) or set an API key"), "host_not_allowed"
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, cfg):
            return 403, (f"Origin '{origin}' is not allowed on a server without an API key; add it to "
                         "allowed_origins (--allowed-origin) or set an API key"), "origin_not_allowed"
    if state.api_key and request.url.path != "/health":
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            return 401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key"
    if request.method == "POST":
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return 415, (f"the request body must be JSON sent with 'Content-Type: application/json' "
                         f"(got '{ctype or 'none'}')"), "unsupported_media_type"
    return None


async def gate(state, request, call_next):
    """The middleware: Host/Origin guard, API key, content type, body size; counts every answer."""
    cfg = state.cfg
    refused = _refusal(state, request)
    if refused is not None:
        state.metrics.request(_label(request.url.path), refused[0])
        return error_response(refused[0], refused[1], code=refused[2])
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cfg.max_request_bytes:
        state.metrics.request(_label(request.url.path), 413)
        return _too_large(cfg)
    try:
        response = await call_next(request)
    except BodyTooLarge:
        response = _too_large(cfg)
    state.metrics.request(_label(request.url.path), response.status_code)
    return response


def _add_routes(app, state) -> None:
    from fastapi import Request

    from lmwright.serve import handlers

    @app.get("/health")
    async def health():
        return await handlers.health(state)

    @app.get("/metrics")
    async def metrics_endpoint():
        return await handlers.metrics_text(state)

    @app.get("/v1/models")
    async def list_models():
        return await handlers.list_models(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handlers.chat_completions(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handlers.completions(state, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await handlers.embeddings(state, request)


def create_app(engine_or_models: Any, cfg: ServeConfig | None = None, guardrails=None):
    """A FastAPI app serving one or several models.

    ``engine_or_models``: a ``LoadedModel`` (from ``lmwright.serve.api.load``), an ``Engine``, or a
    dict of model id -> either. Generative ``LoadedModel`` get a built-in engine with the config's
    limits; encoders answer ``/v1/embeddings``. Request schemas: ``serve.schemas``; response shapes:
    ``serve.formats``; the endpoints: ``serve.handlers``.
    """
    from fastapi import FastAPI, Request

    cfg = cfg or ServeConfig()
    cfg.check()
    state = _app_state(engine_or_models, cfg, guardrails)

    async def lifespan(app):
        yield
        loop = asyncio.get_running_loop()
        for eng in state.engines.values():  # in-flight streams finish (bounded by drain_timeout_s)
            await loop.run_in_executor(None, eng.shutdown, cfg.drain_timeout_s)

    app = FastAPI(title="lmwright", lifespan=lifespan)
    app.state.engines, app.state.guardrails, app.state.metrics = state.engines, state.guard, state.metrics
    _add_error_handlers(app, cfg)

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        return await gate(state, request, call_next)

    _add_routes(app, state)
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
