"""Serving engines: the interface, the built-in continuous-batching engine, and a vLLM adapter.

The built-in engine runs one scheduler thread that owns the model. Requests wait in a bounded queue;
at every step boundary finished sequences leave the running batch and waiting ones join it
(continuous batching).

Llama-architecture models (Llama, Mistral, Qwen2, Qwen3: ``lean_supported``) take the lean path
(``lmwright.serve.lean``): a preallocated slot KV cache (one row per running sequence, column = position), the
prompts of newly admitted requests packed into one sequence and run together with the running batch's decode
step (one pass over the weights; at most ``prefill_chunk`` prompt tokens per step, so a long prompt is prefilled
over several steps while decoding goes on), one argmax for every greedy row, optionally a ``torch.compile``'d
decode step. Finished prompts' KV stays in a prefix cache (``prefix_cache_mb``, least recently used out): a new
prompt that starts with the same tokens (a system prompt, earlier turns of a chat) copies those columns and runs
only the rest. Every prompt still
sees exactly what it would see alone, and greedy outputs equal ``model.generate()``'s.

Every other model takes the generic path: a new request is prefilled alone (batch 1, no padding), then
its ``DynamicCache`` is left-padded to the running batch's length and concatenated along the batch axis;
each decode step feeds one token per row with a per-row attention mask (zeros over the left padding) and
per-row position ids. Columns that every row masks are trimmed when rows leave. Models whose cache is not
a plain ``DynamicCache`` of ``DynamicLayer`` (sliding-window or hybrid caches) cannot be concatenated
safely; for those the engine admits a request only into an empty batch (one request at a time, still
streaming).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmwright.config import ConfigError
from lmwright.engine.sampling import (
    SamplingParams,
    SequenceState,
    TokenChoice,
    default_stop_ids,
    make_generator,
    sample_next,
)
from lmwright.registry import Registry

log = logging.getLogger("lmwright.serve")

# A step that computes at least this many prompt tokens runs on ``prefill_threads`` (default: every core), the
# others (decode steps, a few prompt tokens) on ``threads``. Prompt tokens make a step compute-bound and long
# (SmolLM2 in bf16: ~1.5 ms per token per core), so a second core nearly halves it (a 16-prompt burst's mixed
# step: 380-400 -> 180-240 ms on 2 cores, the time to first token of all 16); a decode step is short and
# bandwidth-bound, and on a small machine the HTTP thread and the clients need a core while it runs.
PARALLEL_PROMPT_TOKENS = 64

# Serving engines by name (``lmwright serve --engine NAME``, ServeConfig.engine). A registered engine class has
# ``serve_target(cfg: ServeConfig)``: what `lmwright serve` hands the HTTP layer for ``cfg.model``.
ENGINES = Registry("engine")


class EngineError(RuntimeError):
    """Base of the errors a client can cause or must be told about."""


class QueueFull(EngineError):
    """The waiting queue is at its bound (HTTP 429)."""


class EngineClosed(EngineError):
    """The engine is shutting down and accepts no new work (HTTP 503)."""


class ContextOverflow(ConfigError):
    """The prompt (plus the requested tokens) does not fit the model's context (HTTP 400)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    """One step of one choice: the text it releases, and the finish reason on the last one.

    finish_reason: ``stop`` | ``length`` | ``cancelled`` | ``timeout`` | ``error`` (None while running).
    """

    index: int
    text: str = ""
    token_id: int | None = None
    logprob: TokenChoice | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


_together = threading.local()  # per thread: {event loop: [(queue, event), ...]} while deliver_together() runs


@contextmanager
def deliver_together():
    """Events that this thread puts on async streams inside the block reach each event loop in one call at its end,
    in the order they were put: one wake-up of the server's loop per engine step instead of one per stream (measured
    at 16 HTTP streams of SmolLM2-135M on 2 cores: ~0.2 ms of the engine thread per event, most of it handing the
    GIL to the woken loop thread)."""
    if getattr(_together, "events", None) is not None:  # nested: the outer block delivers
        yield
        return
    _together.events = {}
    try:
        yield
    finally:
        pending, _together.events = _together.events, None
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is gone (client went away during shutdown)
                pass


def _put_all(items: list) -> None:
    for q, event in items:
        q.put_nowait(event)


class RequestStream:
    """The events of one request, iterable with ``async for`` (server) or ``for`` (CLI, Python API).

    The scheduler thread pushes; the consumer pulls. ``None`` ends the stream.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._aq = None, None
        self._q: queue.Queue = queue.Queue()
        self.first_token_at: float | None = None
        self.created = time.perf_counter()

    def put(self, event: TokenEvent | None) -> None:
        if event is not None and self.first_token_at is None and event.token_id is not None:
            self.first_token_at = time.perf_counter()
        if self._loop is not None:
            pending = getattr(_together, "events", None)
            if pending is not None:  # inside deliver_together(): sent with the step's other events
                pending.setdefault(self._loop, []).append((self._aq, event))
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            except RuntimeError:  # the consumer's loop is gone (client went away during shutdown)
                pass
        else:
            self._q.put(event)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._agen()

    async def _agen(self):
        if self._aq is None:
            raise RuntimeError("this stream was created outside an event loop; iterate it with `for`")
        while True:
            ev = await self._aq.get()
            if ev is None:
                return
            yield ev

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._aq is not None:
            raise RuntimeError("this stream was created inside an event loop; iterate it with `async for`")
        while True:
            ev = self._q.get()
            if ev is None:
                return
            yield ev


class Engine(Protocol):
    """What the HTTP layer, the chat CLI and the web UI need from an engine."""

    tokenizer: Any
    max_context: int

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises QueueFull / EngineClosed / ContextOverflow at once."""
        ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self, drain_timeout_s: float = 30.0) -> None: ...


# ---------------------------------------------------------------------------------- built-in engine
@dataclass
class _Request:
    req: GenerationRequest
    stream: RequestStream
    deadline: float | None
    open_choices: int = 0
    cancelled: bool = False
    buf: Any = None  # lean path: this prompt's prefill KV buffer while it is being prefilled
    prefilled: int = 0  # lean path: prompt tokens already through the model


class _Sequence:
    def __init__(self, owner: _Request, index: int, tokenizer, stop_ids: list[int], device):
        p = owner.req.params
        self.owner, self.index = owner, index
        self.params = p
        self.state = SequenceState(tokenizer, p, stop_ids if p.stop_token_ids is None else p.stop_token_ids)
        seed = None if p.seed is None else p.seed + index
        self.generator = make_generator(seed, device)
        self.prompt = list(owner.req.prompt_ids)
        self.next_pos = len(self.prompt)
        self.last_token = -1
        self.done = False
        # greedy rows without penalty or logprobs are picked by one argmax over the whole batch
        self.batch_greedy = p.greedy and p.repetition_penalty == 1.0 and not (p.logprobs or p.top_logprobs)


def _is_prompt_learning(model) -> bool:
    from lmwright.methods.peft_methods import is_prompt_learning

    return is_prompt_learning(model)


@ENGINES.register("builtin")
class LocalEngine:
    """transformers model + KV cache + a scheduler thread doing continuous batching.

    max_seqs bounds the running batch (sequences, so a request with n=4 takes 4); queue_size bounds
    the requests waiting to join; both overflowing -> QueueFull.

    Llama, Mistral, Qwen2 and Qwen3 models (``lean_supported``) run the fast path of ``lmwright.serve.lean``: a
    preallocated slot KV cache, the newly admitted prompts packed and run with the running batch's decode
    step (at most ``prefill_chunk`` prompt tokens per step: longer prompts are prefilled a chunk per step
    while decoding goes on), one argmax for all greedy rows; ``compile=True`` compiles the decode step
    (and warms it up here, before any request). ``lean=False`` forces the generic path
    (``model.forward`` + ``DynamicCache``), which every other model uses.

    ``threads`` is the scheduler's torch thread count for decode steps (default: the constructing thread's);
    a step with ``PARALLEL_PROMPT_TOKENS`` or more prompt tokens runs on ``prefill_threads`` (default: every
    physical core this process may use, never fewer than ``threads``).
    """

    def __init__(self, model, tokenizer, max_seqs: int = 8, queue_size: int = 32,
                 timeout_s: float | None = None, max_context: int | None = None, name: str = "model",
                 prefill_chunk: int = 512, lean: bool | None = None, compile: bool = False,
                 prefix_cache_mb: float = 256.0, threads: int | None = None, prefill_threads: int | None = None):
        if _is_prompt_learning(model):
            raise ConfigError("prompt-learning adapters (prefix, ptuning, prompt) inject their own KV cache and "
                              "cannot be batched by the built-in engine; serve a LoRA/adapter model or a full "
                              "fine-tune instead")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if not prefix_cache_mb >= 0:
            raise ConfigError(f"prefix_cache_mb must be >= 0 (0 turns the prefix cache off), got {prefix_cache_mb}")
        for key, val in (("threads", threads), ("prefill_threads", prefill_threads)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ConfigError(f"{key} must be a whole number >= 1 (or unset), got {val!r}")
        import torch

        from lmwright.serve.lean import LeanLlama, PrefixCache, lean_supported
        from lmwright.utils.hardware import usable_cores

        # torch threads of the scheduler: ``threads`` for decode steps (default: the constructing thread's count),
        # ``prefill_threads`` for steps with PARALLEL_PROMPT_TOKENS or more prompt tokens (default: every core)
        self.threads = threads or torch.get_num_threads()
        self.prefill_threads = max(self.threads, prefill_threads or usable_cores())

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_seqs, self.queue_size, self.timeout_s = max_seqs, queue_size, timeout_s
        self.prefill_chunk = prefill_chunk
        cfg = getattr(model, "config", None)
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", None) or 2048)
        self.stop_ids = default_stop_ids(tokenizer)
        self.device = next(model.parameters()).device
        if lean and not lean_supported(model):
            raise ConfigError(f"the lean serving path supports Llama, Mistral, Qwen2 and Qwen3 models with SDPA "
                              f"attention and no sliding window shorter than the context; "
                              f"{type(model).__name__} is served with lean=False")
        self._lean = LeanLlama(model, max_seqs, self.max_context) if lean is not False and lean_supported(model) \
            else None
        # lean path: finished prompts' KV, reused by later prompts that start with the same tokens
        self._prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if self._lean is not None and prefix_cache_mb else None
        if compile and self._lean is None:
            raise ConfigError("compile=True needs the lean path (a Llama, Mistral, Qwen2 or Qwen3 model with SDPA "
                              "attention)")
        if compile:  # before the scheduler starts: no request pays the compile time
            from lmwright.models.packed_linear import unpack_linears

            if unpack_linears(model):  # inductor can lower neither oneDNN's packed linear nor lmwright's kernel
                log.info("engine %s: compile=True holds the linear weights in their plain layout (packed or tiled "
                         "ones cannot be compiled)", name)
            t0 = time.perf_counter()
            with torch.inference_mode():
                self._lean.compile()
            log.info("engine %s: decode step compiled and warmed up in %.1f s", name, time.perf_counter() - t0)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()  # lean path: admitted, prompt not fully prefilled yet
        self._group: list = []  # lean path: this step's prompt chunks, (request, Segment)
        self._requests: dict[str, _Request] = {}
        self._active: list[_Sequence] = []
        self._cache = None
        self._mask = None  # (B, T) long, 0 over left padding
        self._mergeable = True
        self._closing = False
        self._stopped = False
        self._counters = {"requests": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                          "prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "mixed_steps": 0, "prefills": 0,
                          "prefix_hit_tokens": 0, "rejected_queue_full": 0}
        # seconds the scheduler spent per phase (the profile behind the serving benchmark)
        self._timings = {"prefill_s": 0.0, "decode_s": 0.0, "sample_emit_s": 0.0}
        log.info("engine %s: %s path, max_seqs=%d, prefill_chunk=%d, prefix cache %s, torch threads %d (%d for "
                 "steps with >= %d prompt tokens)", name, "lean llama" if self._lean else "generic transformers",
                 max_seqs, prefill_chunk, f"{prefix_cache_mb:g} MB" if self._prefix else "off", self.threads,
                 self.prefill_threads, PARALLEL_PROMPT_TOKENS)
        self._thread = threading.Thread(target=self._loop, name=f"lmwright-engine-{name}", daemon=True)
        self._thread.start()

    @staticmethod
    def serve_target(cfg: Any) -> Any:
        """The loaded model (``lmwright.load``): ``create_app`` builds this engine over it with the server's
        limits, and answers /v1/embeddings with it for encoders."""
        from lmwright.serve.api import load

        return load(cfg.model, guardrails=cfg.guardrails, name=cfg.name or None, weights=cfg.weights,
                    max_seqs=cfg.max_seqs)

    # ------------------------------------------------------------------ client side (any thread)
    def submit(self, request: GenerationRequest) -> RequestStream:
        p = request.params
        p.check()
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ContextOverflow("the prompt is empty")
        if n_prompt >= self.max_context:
            raise ContextOverflow(f"the prompt has {n_prompt} tokens; this model's context is {self.max_context}")
        if p.n > self.max_seqs:
            raise ConfigError(f"n={p.n} exceeds this server's max concurrent sequences ({self.max_seqs})")
        stream = RequestStream(request.request_id)
        timeout = p.timeout_s if p.timeout_s is not None else self.timeout_s
        r = _Request(request, stream, time.monotonic() + timeout if timeout else None)
        with self._cv:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                self._counters["rejected_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.queue_size} waiting); retry later")
            self._waiting.append(r)
            self._requests[request.request_id] = r
            self._counters["requests"] += 1
            self._cv.notify()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._cv:
            r = self._requests.get(request_id)
            if r is not None:
                r.cancelled = True
                self._cv.notify()

    def stats(self) -> dict[str, float]:
        with self._cv:
            return dict(self._counters, **self._timings, queue_depth=len(self._waiting),
                        prefix_cache_used_mb=self._prefix.bytes / 2**20 if self._prefix else 0.0,
                        active_sequences=len(self._active), max_seqs=self.max_seqs, queue_size=self.queue_size)

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._active)

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting work, let running and queued requests finish, then stop the thread.

        Whatever is still running after ``drain_timeout_s`` ends with finish_reason ``cancelled``, so
        every stream is closed cleanly rather than cut.
        """
        with self._cv:
            self._closing = True
            self._cv.notify()
        end = time.monotonic() + drain_timeout_s
        while time.monotonic() < end:
            with self._cv:
                if not self._busy():
                    break
            time.sleep(0.02)
        with self._cv:
            for r in list(self._requests.values()):
                r.cancelled = True
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams) -> list[TokenEvent]:
        """Convenience for tests and scripts: run one request to the end from a plain thread."""
        return list(self.submit(GenerationRequest(list(prompt_ids), params)))

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # this thread's own count (a thread starts with the process-wide one)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopped and not self._busy():
                        self._cv.wait(timeout=0.5)
                    if self._stopped and not self._busy():
                        return
                # each phase's tokens reach the server's event loop in one call at its end: the first tokens of
                # prompts prefilled while nothing was decoding go out before the next decode step runs (they
                # waited for it, one step of TTFT: ~17-60 ms on SmolLM2 at 1-16 streams)
                for phase in (self._admit_phase, self._step_phase):
                    with deliver_together():
                        try:
                            phase()
                        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the server
                            log.exception("engine step failed")
                            self._fail_all(f"{type(e).__name__}: {e}")

    @contextmanager
    def _prompt_threads(self, prompt_tokens: int):
        """Run the enclosed step on ``prefill_threads`` if it computes PARALLEL_PROMPT_TOKENS prompt tokens or more."""
        if prompt_tokens < PARALLEL_PROMPT_TOKENS or self.prefill_threads == self.threads:
            yield
            return
        import torch

        torch.set_num_threads(self.prefill_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    def _admit_phase(self) -> None:
        self._expire_and_cancel()
        self._admit()

    def _step_phase(self) -> None:
        if self._active:
            self._step()

    def _emit(self, seq: _Sequence, text: str, token: TokenChoice | None) -> None:
        r = seq.owner
        ev = TokenEvent(seq.index, text, token.token_id if token else None,
                        token if (token and (seq.params.logprobs or seq.params.top_logprobs)) else None,
                        seq.state.finish_reason, len(seq.prompt), len(seq.state.token_ids))
        r.stream.put(ev)
        if seq.state.finish_reason:
            self._close_seq(seq)

    def _close_seq(self, seq: _Sequence, reason: str | None = None, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        r = seq.owner
        if reason:  # ended from outside (cancel, timeout, error): tell the client why
            seq.state.finish_reason = reason
            r.stream.put(TokenEvent(seq.index, "", None, None, reason, len(seq.prompt),
                                    len(seq.state.token_ids), error))
        with self._cv:
            self._counters["completion_tokens"] += len(seq.state.token_ids)
            key = {"cancelled": "cancelled", "timeout": "timeouts", "error": "errors"}.get(reason or "", "finished")
            self._counters[key] += 1
            r.open_choices -= 1
            if r.open_choices <= 0:
                self._requests.pop(r.req.request_id, None)
                r.stream.put(None)

    def _fail_request_waiting(self, r: _Request, reason: str, error: str | None = None) -> None:
        r.buf = None
        for i in range(r.req.params.n):
            r.stream.put(TokenEvent(i, "", None, None, reason, len(r.req.prompt_ids), 0, error))
        with self._cv:
            self._counters[{"cancelled": "cancelled", "timeout": "timeouts"}.get(reason, "errors")] += 1
            self._requests.pop(r.req.request_id, None)
        r.stream.put(None)

    def _expire_and_cancel(self) -> None:
        now = time.monotonic()
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled or (r.deadline and now > r.deadline)]
            for r in gone:
                self._waiting.remove(r)
        gone_pre = [r for r in self._prefilling if r.cancelled or (r.deadline and now > r.deadline)]
        for r in gone_pre:
            self._prefilling.remove(r)
        for r in gone + gone_pre:
            self._fail_request_waiting(r, "cancelled" if r.cancelled else "timeout")
        for seq in self._active:
            r = seq.owner
            if r.cancelled:
                self._close_seq(seq, "cancelled")
            elif r.deadline and now > r.deadline:
                self._close_seq(seq, "timeout")
        self._compact()

    def _admit(self) -> None:
        if self._lean is not None:
            self._admit_lean()
            return
        while True:
            with self._cv:
                if not self._waiting or self._stopped:
                    return
                r = self._waiting[0]
                room = self.max_seqs - len(self._active)
                if self._active and (r.req.params.n > room or not self._mergeable):
                    return
                self._waiting.popleft()
                self._counters["prompt_tokens"] += len(r.req.prompt_ids)
            self._prefill(r)

    def _take(self, seq: _Sequence, logits, token: int | None = None) -> None:
        """Sample one token for ``seq`` (or take ``token``, picked for the batch), stream the released text.

        A failure here (e.g. non-finite logits, which cannot be sampled) ends this sequence alone with
        ``error``; the rest of the batch goes on."""
        try:
            choice = TokenChoice(token) if token is not None else \
                sample_next(logits, seq.params, seq.generator, seq.prompt + seq.state.token_ids)
        except Exception as e:  # noqa: BLE001 - isolate the failing sequence
            log.exception("sampling failed for request %s", seq.owner.req.request_id)
            self._close_seq(seq, "error", f"{type(e).__name__}: {e}")
            return
        text = seq.state.add(choice.token_id)
        seq.last_token = choice.token_id
        if not seq.state.finish_reason and seq.next_pos + 1 >= self.max_context:  # prompt + output fill it
            seq.state.finish_reason = "length"
            text += seq.state._finish_text()
        self._emit(seq, text, choice)

    def _take_all(self, seqs: list[_Sequence], logits) -> None:
        """One token for each row of ``logits`` (B, V): one argmax for the greedy rows, then each row."""
        import torch

        t0 = time.perf_counter()
        greedy = torch.argmax(logits, dim=-1).tolist() if any(s.batch_greedy for s in seqs) else None
        for i, seq in enumerate(seqs):
            self._take(seq, logits[i], greedy[i] if seq.batch_greedy else None)
        self._timings["sample_emit_s"] += time.perf_counter() - t0

    def _step(self) -> None:
        if self._lean is not None:
            self._step_lean()
            return
        import torch

        t0 = time.perf_counter()
        b = len(self._active)
        ids = torch.tensor([[s.last_token] for s in self._active], device=self.device)  # (B, 1)
        pos = torch.tensor([[s.next_pos] for s in self._active], device=self.device)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=pos,
                         past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        logits = out.logits[:, -1]  # (B, V)
        self._timings["decode_s"] += time.perf_counter() - t0
        with self._cv:
            self._counters["steps"] += 1
        for seq in self._active:
            seq.next_pos += 1
        self._take_all(self._active, logits)
        self._compact()

    def _fail_all(self, message: str) -> None:
        for r in list(self._prefilling):
            self._fail_request_waiting(r, "error", message)
        self._prefilling.clear()
        self._group = []
        for seq in list(self._active):
            self._close_seq(seq, "error", message)
        self._active, self._cache, self._mask = [], None, None
        with self._cv:  # a request caught between the queue and the batch must still end its stream
            waiting = {id(r) for r in self._waiting}
            orphans = [r for r in self._requests.values() if id(r) not in waiting]
        for r in orphans:
            self._fail_request_waiting(r, "error", message)

    def _new_sequences(self, r: _Request) -> list[_Sequence] | None:
        """The n sequences of a prefilled request; if that fails (e.g. a seed torch refuses), the request
        ends alone with ``error`` and None is returned."""
        try:
            return [_Sequence(r, i, self.tokenizer, self.stop_ids, self.device) for i in range(r.req.params.n)]
        except Exception as e:  # noqa: BLE001 - isolate the failing request
            log.exception("cannot start request %s", r.req.request_id)
            self._fail_request_waiting(r, "error", f"{type(e).__name__}: {e}")
            return None

    # ------------------------------------------------------------------ lean path (Llama, Mistral, Qwen2, Qwen3)
    def _admit_lean(self) -> None:
        """Move waiting requests that fit into the prefill queue and pick this step's prompt chunks.

        With a running batch the chunks ride along with its decode step (one pass over the weights for
        both, ``_step_lean``); with none they are prefilled here, and the requests that arrived meanwhile (a
        burst: the first one found the engine idle) are picked at once to ride along with the first decode
        step, instead of waiting one more step.
        """
        self._pick_chunks()
        if self._group and not self._active:
            group, self._group = self._group, []
            with self._prompt_threads(sum(len(s.ids) for _, s in group)):
                self._run_prefill(group)
            if self._active:
                self._pick_chunks()

    def _pick_chunks(self) -> None:
        with self._cv:
            reserved = len(self._active) + sum(r.req.params.n for r in self._prefilling)
            while self._waiting and not self._stopped:
                r = self._waiting[0]
                if r.req.params.n > self.max_seqs - reserved:
                    break
                self._waiting.popleft()
                reserved += r.req.params.n
                self._counters["prompt_tokens"] += len(r.req.prompt_ids)
                self._prefilling.append(r)
        from lmwright.serve.lean import Segment

        budget, self._group = self.prefill_chunk, []
        for r in self._prefilling:
            if budget <= 0:
                break
            if r.buf is None:
                r.buf = self._lean.new_buffer(len(r.req.prompt_ids))
                self._reuse_prefix(r)
            n = min(budget, len(r.req.prompt_ids) - r.prefilled)
            self._group.append((r, Segment(r.buf, r.prefilled, r.req.prompt_ids[r.prefilled:r.prefilled + n])))
            budget -= n

    def _reuse_prefix(self, r: _Request) -> None:
        """Start ``r``'s prefill after the longest prefix a finished prompt already computed."""
        if self._prefix is None:
            return
        src, n = self._prefix.match(r.req.prompt_ids)
        if n:
            self._lean.copy_prefix(src, r.buf, n)
            r.prefilled = n
            with self._cv:
                self._counters["prefix_hit_tokens"] += n

    def _run_prefill(self, group: list, logits=None) -> None:
        """Finish the prompt chunks of ``group`` (``logits``: theirs from a mixed step, else prefilled here,
        packed; if that fails, one by one, so only a bad prompt fails)."""
        t0 = time.perf_counter()
        if logits is None:
            try:
                logits = self._lean.prefill([s for _, s in group])
            except Exception as e:  # noqa: BLE001
                if len(group) == 1:
                    log.exception("prefill failed")
                    self._prefilling.remove(group[0][0])
                    self._fail_request_waiting(group[0][0], "error", f"{type(e).__name__}: {e}")
                    return
        for k, (r, seg) in enumerate(group):
            if logits is not None:
                self._prefilled(r, seg, logits[k])
                continue
            try:
                self._prefilled(r, seg, self._lean.prefill([seg])[0])
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                if r in self._prefilling:
                    self._prefilling.remove(r)
                    self._fail_request_waiting(r, "error", f"{type(e).__name__}: {e}")
        self._timings["prefill_s"] += time.perf_counter() - t0

    def _prefilled(self, r: _Request, seg, logits) -> None:
        r.prefilled = seg.start + len(seg.ids)
        if r.prefilled < len(r.req.prompt_ids):
            return  # more chunks to go
        self._prefilling.remove(r)
        with self._cv:
            self._counters["prefills"] += 1
        n = r.req.params.n
        seqs = self._new_sequences(r)
        if seqs is None:
            return
        r.open_choices = n
        for seq in seqs:
            self._lean.load_row(len(self._active), r.buf, r.prefilled)
            self._active.append(seq)
        if self._prefix is not None:
            self._prefix.add(r.req.prompt_ids, r.buf)
        r.buf = None
        t0 = time.perf_counter()
        for seq in seqs:
            self._take(seq, logits)
        self._timings["sample_emit_s"] += time.perf_counter() - t0
        self._compact()

    def _step_lean(self) -> None:
        import torch

        group, self._group = self._group, []
        t0 = time.perf_counter()
        seqs = self._active
        pos = [s.next_pos for s in seqs]
        ncols = max(pos) + 1
        self._lean.grow(ncols)
        tokens = torch.tensor([s.last_token for s in seqs], device=self.device)
        positions = torch.tensor(pos, device=self.device)
        pre_logits = None
        if group:
            try:
                with self._prompt_threads(sum(len(s.ids) for _, s in group)):
                    logits, pre_logits = self._lean.step(tokens, positions, ncols, [s for _, s in group])
            except Exception:  # noqa: BLE001 - decode alone; the prompts are prefilled apart (isolating a bad one)
                log.exception("decode + prefill step failed; running them apart")
                logits = self._lean.decode(tokens, positions, ncols)
        else:
            logits = self._lean.decode(tokens, positions, ncols)
        self._timings["decode_s"] += time.perf_counter() - t0
        with self._cv:
            self._counters["steps"] += 1
            self._counters["mixed_steps"] += bool(group)
        for seq in seqs:
            seq.next_pos += 1
        self._take_all(seqs, logits)
        self._compact()
        if group:
            self._run_prefill(group, pre_logits)

    # ------------------------------------------------------------------ generic path (any causal LM)
    def _prefill(self, r: _Request) -> None:
        import torch
        from transformers import DynamicCache

        t0 = time.perf_counter()
        ids = torch.tensor([r.req.prompt_ids], device=self.device)  # (1, P)
        pos = torch.arange(ids.shape[1], device=self.device)[None]
        try:
            with self._prompt_threads(ids.shape[1]):
                out = self.model(input_ids=ids, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
        except Exception as e:  # noqa: BLE001 - this request fails alone; the running batch is untouched
            log.exception("prefill failed")
            self._fail_request_waiting(r, "error", f"{type(e).__name__}: {e}")
            return
        with self._cv:
            self._counters["prefills"] += 1
        cache = out.past_key_values
        logits = out.logits[0, -1]
        n = r.req.params.n
        seqs = self._new_sequences(r)
        if seqs is None:
            return
        r.open_choices = n
        if n > 1:
            cache.batch_repeat_interleave(n)
        self._merge(cache, torch.ones(n, ids.shape[1], dtype=torch.long, device=self.device))
        self._active.extend(seqs)
        self._timings["prefill_s"] += time.perf_counter() - t0
        for seq in seqs:
            self._take(seq, logits)
        self._compact()

    def _merge(self, cache, mask) -> None:
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", [])
        if not all(type(layer) is DynamicLayer for layer in layers):
            self._mergeable = False
        if self._cache is None or not self._active:
            self._cache, self._mask = cache, mask
            return
        l1, l2 = self._mask.shape[1], mask.shape[1]
        t = max(l1, l2)
        data = []
        for a, b in zip(self._cache.layers, cache.layers):
            k = torch.cat([F.pad(a.keys, (0, 0, t - l1, 0)), F.pad(b.keys, (0, 0, t - l2, 0))])
            v = torch.cat([F.pad(a.values, (0, 0, t - l1, 0)), F.pad(b.values, (0, 0, t - l2, 0))])
            data.append((k, v))
        self._cache = DynamicCache(ddp_cache_data=data)
        self._mask = torch.cat([F.pad(self._mask, (t - l1, 0)), F.pad(mask, (t - l2, 0))])

    def _compact(self) -> None:
        """Drop finished rows from the batch and the cache (generic path: trim columns no row attends to)."""
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        if self._lean is not None:  # fill each hole with the last live row (a copy of its used columns)
            rows = list(self._active)
            live = len(rows)
            for hole in range(len(rows) - 1, -1, -1):
                if not rows[hole].done:
                    continue
                live -= 1
                if hole != live:
                    self._lean.move_row(live, hole, rows[live].next_pos)
                    rows[hole] = rows[live]
                rows.pop()
            self._active = rows
            return
        import torch

        if not keep:
            self._active, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        self._active = [self._active[i] for i in keep]
        used = (self._mask.sum(0) > 0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self._mask = self._mask[:, first:]


# ---------------------------------------------------------------------------------- vLLM engine
@ENGINES.register("vllm")
class VllmEngine:
    """The same interface on vLLM's ``AsyncLLMEngine`` (GPUs, tensor parallel, paged attention).

    vLLM is imported here only; it must be installed on a CUDA machine (``pip install lmwright[serve-gpu]``).
    vLLM yields cumulative outputs per step; this class turns them into the same ``TokenEvent`` deltas
    (text deltas from vLLM's own incremental detokeniser).
    """

    def __init__(self, model_path: str, tokenizer, max_seqs: int = 256, queue_size: int = 1024,
                 timeout_s: float | None = None, **engine_kwargs: Any):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError:
            raise ConfigError("engine 'vllm' needs vllm on a CUDA machine: pip install 'lmwright[serve-gpu]'") from None
        args = AsyncEngineArgs(model=str(model_path), max_num_seqs=max_seqs, **engine_kwargs)
        self._engine = AsyncLLMEngine.from_engine_args(args)
        self.tokenizer = tokenizer
        model_config = getattr(self._engine, "model_config", None)  # AsyncLLM (V1) resolves max_model_len
        self.max_context = int(getattr(model_config, "max_model_len", None) or args.max_model_len or 2048)
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._inflight: set[str] = set()
        self._counters = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._closing = False

    @classmethod
    def serve_target(cls, cfg: Any) -> VllmEngine:
        """vLLM over the resolved model folder, with the server's batch, queue and time limits."""
        from lmwright.models.load import load_tokenizer, resolve_model_path

        path = resolve_model_path(cfg.model)
        return cls(str(path), load_tokenizer(path), max_seqs=cfg.max_seqs, queue_size=cfg.queue_size,
                   timeout_s=cfg.timeout_s)

    def _sampling(self, p: SamplingParams):
        from vllm import SamplingParams as VSP

        return VSP(n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
                   repetition_penalty=p.repetition_penalty, seed=p.seed, stop=list(p.stop) or None,
                   stop_token_ids=p.stop_token_ids or default_stop_ids(self.tokenizer), max_tokens=p.max_tokens,
                   logprobs=(p.top_logprobs or 1) if (p.logprobs or p.top_logprobs) else None)

    def submit(self, request: GenerationRequest) -> RequestStream:
        request.params.check()
        if self._closing:
            raise EngineClosed("the server is shutting down")
        if len(self._inflight) >= self.queue_size:
            raise QueueFull(f"{len(self._inflight)} requests in flight; retry later")
        if len(request.prompt_ids) >= self.max_context:
            raise ContextOverflow(f"the prompt has {len(request.prompt_ids)} tokens; context is {self.max_context}")
        stream = RequestStream(request.request_id)
        self._inflight.add(request.request_id)
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += len(request.prompt_ids)  # once per request, as the built-in engine
        asyncio.get_running_loop().create_task(self._pump(request, stream))
        return stream

    async def _pump(self, request: GenerationRequest, stream: RequestStream) -> None:
        sent: dict[int, tuple[str, int]] = {}  # choice index -> (text, token count) sent so far (cumulative)
        try:
            gen = self._engine.generate({"prompt_token_ids": list(request.prompt_ids)},
                                        self._sampling(request.params), request.request_id)
            async for out in gen:
                for c in out.outputs:
                    prev_text, prev_n = sent.get(c.index, ("", 0))
                    lp = None
                    if c.logprobs and len(c.token_ids) > prev_n:
                        tid = c.token_ids[-1]
                        lp = TokenChoice(tid, c.logprobs[-1][tid].logprob)
                    stream.put(TokenEvent(c.index, c.text[len(prev_text):],
                                          c.token_ids[-1] if c.token_ids else None, lp, c.finish_reason,
                                          len(request.prompt_ids), len(c.token_ids)))
                    sent[c.index] = (c.text, len(c.token_ids))
        except Exception as e:  # noqa: BLE001
            stream.put(TokenEvent(0, "", None, None, "error", len(request.prompt_ids), 0, str(e)))
        finally:
            # every token produced, finished or not (cancelled, failed), as the built-in engine counts them
            self._counters["completion_tokens"] += sum(n for _, n in sent.values())
            self._inflight.discard(request.request_id)
            stream.put(None)

    def cancel(self, request_id: str) -> None:
        asyncio.get_running_loop().create_task(self._engine.abort(request_id))

    def stats(self) -> dict[str, float]:
        return dict(self._counters, queue_depth=0, active_sequences=len(self._inflight))

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._closing = True
        shutdown = getattr(self._engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

