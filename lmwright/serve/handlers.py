"""The endpoint handlers of the OpenAI-compatible app: small functions that take the app's state
(``AppState``) and the request explicitly. Request validation is ``schemas``; response and chunk shapes
are ``formats``; the wiring (routes, middleware, error handlers) is ``http.create_app``.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from lmwright.config import ConfigError
from lmwright.engine.sampling import SamplingParams
from lmwright.serve import formats, schemas
from lmwright.serve.engine import ContextOverflow, EngineClosed, GenerationRequest, QueueFull
from lmwright.serve.errors import BodyTooLarge, ClientGone, HTTPError, error_body
from lmwright.serve.formats import SSE_DONE, sse, usage


@dataclass
class AppState:
    """What the handlers share: the config, the models, the guardrails, the metrics, the embedding gate."""

    cfg: Any  # ServeConfig
    api_key: str | None
    models: dict[str, Any]  # id -> anything served (engines and encoders)
    engines: dict[str, Any]  # id -> generation engine
    encoders: dict[str, Any]  # id -> encoder (answers /v1/embeddings only)
    guard: Any  # Guardrails
    metrics: Any  # http.Metrics
    created: int
    embed_slots: asyncio.Semaphore
    embed_waiting: int = 0  # embedding requests admitted (running or waiting for a slot)


# ---------------------------------------------------------------------------------------- reading requests
async def read_body(cfg, request: Request) -> bytes:
    """The request body, at most max_request_bytes (413), within read_timeout_s (408)."""
    body = bytearray()
    try:
        async with asyncio.timeout(cfg.read_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > cfg.max_request_bytes:
                    raise BodyTooLarge()
    except TimeoutError:
        # the connection closes after the answer: the rest of a late body must not read as a new request
        raise HTTPError(408, f"the request body did not arrive within {cfg.read_timeout_s} s "
                             f"({len(body)} bytes received)", code="request_timeout",
                        headers={"connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return bytes(body)


async def parse(state: AppState, request: Request, schema):
    return schemas.parse_body(await read_body(state.cfg, request), schema)


def engine_for(state: AppState, model: str):
    if model in state.engines:
        return state.engines[model]
    if model in state.encoders:
        raise HTTPError(400, f"model '{model}' is an encoder; use /v1/embeddings", param="model",
                        code="model_not_generative")
    raise HTTPError(404, f"model '{model}' does not exist; available: {', '.join(state.models)}", param="model",
                    code="model_not_found")


def sampling_params(state: AppState, req, prompt_len: int, engine, logprobs: bool, top: int) -> SamplingParams:
    return schemas.sampling_params(req, prompt_len, engine.max_context, default_max=state.cfg.default_max_tokens,
                                   logprobs=logprobs, top_logprobs=top, timeout_s=state.cfg.timeout_s,
                                   guard=state.guard)


# ---------------------------------------------------------------------------------------- running requests
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


async def guarded_choices(state: AppState, request: Request, engine, ids, params):
    """``collect``, then the output guardrails on each choice (a choice that is not valid JSON is retried)."""
    guard = state.guard
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


def record(metrics, endpoint: str, t0: float, stream, prompt: int, completion: int) -> None:
    metrics.tokens["prompt"] += prompt
    metrics.tokens["completion"] += completion
    metrics.observe("lmwright_request_latency_seconds", endpoint, time.perf_counter() - t0)
    if stream is not None and stream.first_token_at is not None:
        metrics.observe("lmwright_time_to_first_token_seconds", endpoint, stream.first_token_at - stream.created)


async def stream_events(state: AppState, engine, stream, params, endpoint: str, t0: float, prompt_len: int,
                        make_chunk, include_usage: bool, rid: str, first_chunks: list[dict]):
    """SSE: chunks as tokens arrive; the client going away cancels the request (frees its slot)."""
    n = params.n
    guards = [state.guard.stream_filter() for _ in range(n)]
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
            yield sse(formats.usage_chunk(rid, first_chunks, usage(prompt_len, sum(ntok))))
        yield SSE_DONE
    finally:
        engine.cancel(stream.request_id)
        record(state.metrics, endpoint, t0, stream, prompt_len, sum(ntok))


def event_stream(events, headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------------------------------- guardrail refusals
def chat_refusal(state: AppState, req, rid: str):
    text = state.guard.refusal
    if req.stream:
        def events():
            created = int(time.time())
            yield sse(formats.chat_chunk(rid, req.model, 0, {"role": "assistant", "content": text}, None,
                                         created=created))
            yield sse(formats.chat_chunk(rid, req.model, 0, {}, "content_filter", created=created))
            yield SSE_DONE
        return event_stream(events())
    return formats.chat_completion(rid, req.model, [formats.chat_choice(i, text, "content_filter")
                                                    for i in range(req.n)], usage(0, 0), fingerprint=False)


def completion_refusal(state: AppState, req, rid: str):
    text = state.guard.refusal
    if req.stream:
        def events():
            yield sse(formats.text_completion(rid, req.model, [formats.completion_choice(0, text, "content_filter")]))
            yield SSE_DONE
        return event_stream(events())
    return formats.text_completion(rid, req.model, [formats.completion_choice(i, text, "content_filter")
                                                    for i in range(req.n)], usage(0, 0))


# ---------------------------------------------------------------------------------------- endpoints
async def chat_completions(state: AppState, request: Request):
    t0 = time.perf_counter()
    req = await parse(state, request, schemas.ChatRequest)
    engine = engine_for(state, req.model)
    loop = asyncio.get_running_loop()
    # guardrail regexes, the chat template and the tokenizer take time on a huge prompt: off the event loop
    messages, verdict = await loop.run_in_executor(None, state.guard.check_messages, schemas.chat_messages(req))
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if verdict.refused:
        return chat_refusal(state, req, rid)
    from lmwright.data.chat import render_prompt_ids

    tools = schemas.request_tools(req)
    try:
        ids = await loop.run_in_executor(None, render_prompt_ids, engine.tokenizer, messages, tools)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise HTTPError(400, f"cannot render the conversation with the chat template: {e}",
                        param="messages") from None
    params = sampling_params(state, req, len(ids), engine, bool(req.logprobs or req.top_logprobs),
                             req.top_logprobs or 0)
    tok = engine.tokenizer
    if req.stream:
        def chunk(i, text, finish, lp):
            lps = {"content": [formats.chat_logprob(tok, lp)]} if lp is not None else None
            return formats.chat_chunk(rid, req.model, i, {"content": text} if text else {}, finish, lps)

        firsts = [formats.chat_chunk(rid, req.model, i, {"role": "assistant", "content": ""}, None)
                  for i in range(params.n)]
        include = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(state, engine, submit(engine, ids, params), params, "chat", t0, len(ids), chunk,
                               include, rid, firsts)
        return event_stream(events, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, finish, ntok, lps, stream = await guarded_choices(state, request, engine, ids, params)
    record(state.metrics, "chat", t0, stream, len(ids), sum(ntok))
    choices = [formats.chat_choice(i, texts[i], finish[i],
                                   {"content": [formats.chat_logprob(tok, x) for x in lps[i]]}
                                   if params.logprobs else None, tools=tools) for i in range(params.n)]
    return formats.chat_completion(rid, req.model, choices, usage(len(ids), sum(ntok)))


async def completions(state: AppState, request: Request):
    t0 = time.perf_counter()
    req = await parse(state, request, schemas.CompletionRequest)
    engine = engine_for(state, req.model)
    prompt = schemas.completion_prompt(req)
    loop = asyncio.get_running_loop()
    verdict = await loop.run_in_executor(None, state.guard.check_input, prompt)  # off the event loop, as chat
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if verdict.refused:
        return completion_refusal(state, req, rid)
    ids = await loop.run_in_executor(None, lambda: list(engine.tokenizer(verdict.text)["input_ids"]))
    nlp = req.logprobs
    params = sampling_params(state, req, len(ids), engine, nlp is not None, nlp or 0)
    prefix = verdict.text if req.echo else ""
    tok = engine.tokenizer

    def chunk(i, text, finish, lp):
        lps = formats.completion_logprobs(tok, [lp]) if lp is not None else None
        return formats.text_completion(rid, req.model, [formats.completion_choice(i, text, finish, lps)])

    if req.stream:
        firsts = [chunk(i, prefix, None, None) for i in range(params.n)] if prefix else []
        include = bool(req.stream_options and req.stream_options.include_usage)
        return event_stream(stream_events(state, engine, submit(engine, ids, params), params, "completions", t0,
                                          len(ids), chunk, include, rid, firsts))
    texts, finish, ntok, lps, stream = await guarded_choices(state, request, engine, ids, params)
    record(state.metrics, "completions", t0, stream, len(ids), sum(ntok))
    choices = [formats.completion_choice(i, prefix + texts[i], finish[i],
                                         formats.completion_logprobs(tok, lps[i]) if nlp is not None else None)
               for i in range(params.n)]
    return formats.text_completion(rid, req.model, choices, usage(len(ids), sum(ntok)))


async def embeddings(state: AppState, request: Request):
    t0 = time.perf_counter()
    cfg = state.cfg
    req = await parse(state, request, schemas.EmbeddingRequest)
    if req.model not in state.models:
        raise HTTPError(404, f"model '{req.model}' does not exist; available: {', '.join(state.models)}",
                        param="model", code="model_not_found")
    m = state.models[req.model]
    if not hasattr(m, "embed"):
        raise HTTPError(400, f"model '{req.model}' cannot embed", param="model")
    texts = schemas.embedding_inputs(req, cfg.max_embedding_inputs)
    if state.embed_waiting >= cfg.queue_size + cfg.embedding_concurrency:
        raise HTTPError(429, "too many embedding requests in flight; retry later", "rate_limit_error",
                        code="rate_limit_exceeded")
    loop = asyncio.get_running_loop()
    state.embed_waiting += 1
    try:
        async with state.embed_slots:  # at most embedding_concurrency run at once; the rest wait here
            vecs = await loop.run_in_executor(None, m.embed, texts)
            ntok = await loop.run_in_executor(None, m.count_tokens, texts)
    finally:
        state.embed_waiting -= 1
    state.metrics.tokens["prompt"] += ntok
    state.metrics.observe("lmwright_request_latency_seconds", "embeddings", time.perf_counter() - t0)
    if req.encoding_format == "base64":  # what the openai client asks for by default: float32 LE bytes
        vecs = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vecs]
    return formats.embedding_list(req.model, vecs, ntok)


async def health(state: AppState):
    return {"status": "ok", "models": list(state.models)}


async def metrics_text(state: AppState):
    return PlainTextResponse(state.metrics.render(state.engines, state.guard.counters),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def list_models(state: AppState):
    return formats.model_list(state.models, state.created)
