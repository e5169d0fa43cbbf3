"""The built-in engine: batched == alone, streaming, n, cancellation, queue bound, timeouts."""

from __future__ import annotations

import threading
import time

import pytest

from lmwright.engine.sampling import SamplingParams, generate
from lmwright.serve.engine import GenerationRequest, LocalEngine, QueueFull


@pytest.fixture
def engine(lm):
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=8, queue_size=8)
    yield eng
    eng.shutdown(drain_timeout_s=1)


PROMPTS = ["Once upon a time", "The cat sat on the mat and then the dog ran far away into the woods", "Hi",
           "小猫在花园里", "A bird"]


def _tokens(events, index=0):
    return [e.token_id for e in events if e.index == index and e.token_id is not None
            and not (e.finish_reason == "stop" and e.text == "" and e.token_id is None)]


def test_batched_greedy_equals_alone(lm, engine):
    """Different-length prompts joining at different steps give exactly the tokens they give alone."""
    ids = [lm.prompt_ids(p) for p in PROMPTS]
    alone = [generate(lm.model, lm.tokenizer, i, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[]))
             for i in ids]
    out: dict[int, list[int]] = {}

    def run(k):
        time.sleep(0.01 * k)  # staggered arrivals: requests join a batch that is already decoding
        params = SamplingParams(max_tokens=24 + 4 * (k % 2), temperature=0, stop_token_ids=[])
        out[k] = [e.token_id for e in engine.generate_sync(ids[k], params) if e.token_id is not None]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(ids)):
        assert out[k][:24] == alone[k].token_ids, f"prompt {k} differs when batched"
    assert engine.stats()["steps"] < sum(len(v) for v in out.values())  # rows really shared steps
    deadline = time.time() + 5  # streams end just before the scheduler compacts its batch
    while engine.stats()["active_sequences"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active_sequences"] == 0


def test_seeded_sampling_in_batch_equals_alone(lm, engine):
    ids = lm.prompt_ids("The dog")
    p = dict(max_tokens=12, temperature=0.9, top_k=50, seed=11, stop_token_ids=[])
    alone = generate(lm.model, lm.tokenizer, ids, SamplingParams(**p)).token_ids
    other = threading.Thread(target=engine.generate_sync,
                             args=(lm.prompt_ids("Something else entirely"), SamplingParams(max_tokens=20)))
    other.start()
    got = [e.token_id for e in engine.generate_sync(ids, SamplingParams(**p)) if e.token_id is not None]
    other.join()
    assert got == alone


def test_n_choices_use_seed_plus_index(lm, engine):
    ids = lm.prompt_ids("Hello")
    evs = engine.generate_sync(ids, SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, stop_token_ids=[]))
    for i in range(3):
        toks = [e.token_id for e in evs if e.index == i and e.token_id is not None]
        ref = generate(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=6, temperature=1.0, seed=5 + i,
                                                                   stop_token_ids=[])).token_ids
        assert toks == ref
    assert sorted(e.index for e in evs if e.finish_reason) == [0, 1, 2]


def test_streamed_text_equals_decode(lm, engine):
    ids = lm.prompt_ids("小猫")
    evs = engine.generate_sync(ids, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[]))
    toks = [e.token_id for e in evs if e.token_id is not None]
    assert "".join(e.text for e in evs) == lm.tokenizer.decode(toks, skip_special_tokens=True)
    assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == 30


def test_cancel_frees_slot(lm):
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=1, queue_size=4)
    try:
        long = eng.submit(GenerationRequest(lm.prompt_ids("A"), SamplingParams(max_tokens=200, stop_token_ids=[])))
        it = iter(long)
        next(it)
        eng.cancel(long.request_id)
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled"
        evs = eng.generate_sync(lm.prompt_ids("B"), SamplingParams(max_tokens=3, temperature=0, stop_token_ids=[]))
        assert evs[-1].finish_reason == "length"
        assert eng.stats()["cancelled"] == 1
    finally:
        eng.shutdown(drain_timeout_s=1)


def test_queue_bound_and_timeout(lm):
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=1, queue_size=1)
    step = eng._step  # >= 10 ms a decode step: `a` runs >= 2 s, so a stalled test thread (a loaded CI
    eng._step = lambda: (time.sleep(0.01), step())[1]  # machine) still finds it running when b and c come
    try:
        a = eng.submit(GenerationRequest(lm.prompt_ids("A"), SamplingParams(max_tokens=200, stop_token_ids=[])))
        time.sleep(0.1)  # a is running; b waits; c overflows
        b = eng.submit(GenerationRequest(lm.prompt_ids("B"), SamplingParams(max_tokens=5, timeout_s=0.05)))
        with pytest.raises(QueueFull):
            eng.submit(GenerationRequest(lm.prompt_ids("C"), SamplingParams(max_tokens=5)))
        assert list(b)[-1].finish_reason == "timeout"  # expired while waiting for a slot
        eng.cancel(a.request_id)
        assert list(a)[-1].finish_reason == "cancelled"
    finally:
        eng.shutdown(drain_timeout_s=1)


def test_context_limit_ends_with_length(lm):
    from lmwright.serve.engine import ContextOverflow

    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=2, max_context=20)
    try:
        ids = lm.prompt_ids("Once upon a time")
        evs = eng.generate_sync(ids, SamplingParams(max_tokens=100, temperature=0, stop_token_ids=[]))
        assert evs[-1].finish_reason == "length"
        assert len(ids) + evs[-1].completion_tokens == 20
        with pytest.raises(ContextOverflow):
            eng.submit(GenerationRequest(list(range(5, 30)), SamplingParams()))
    finally:
        eng.shutdown(drain_timeout_s=1)


def test_peft_lora_served_unmerged_equals_merged(lm):
    peft = pytest.importorskip("peft")
    import copy

    import torch

    base = copy.deepcopy(lm.model)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.eval()
    ids = lm.prompt_ids("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
    eng = LocalEngine(model, lm.tokenizer, max_seqs=2)
    try:
        unmerged = [e.token_id for e in eng.generate_sync(ids, params) if e.token_id is not None]
    finally:
        eng.shutdown(drain_timeout_s=1)
    merged = model.merge_and_unload()
    ref = generate(merged, lm.tokenizer, ids, params).token_ids
    base_only = generate(lm.model, lm.tokenizer, ids, params).token_ids
    assert unmerged == ref
    assert unmerged != base_only  # the adapter really changed the output


def test_failing_prefill_fails_only_its_request(lm):
    class Boom:
        def __init__(self, model):
            self.model, self.config = model, model.config

        def parameters(self):
            return self.model.parameters()

        def __call__(self, input_ids, **kw):
            if input_ids.shape[1] > 1 and int(input_ids[0, -1]) == 7:
                raise RuntimeError("bad prompt")
            return self.model(input_ids=input_ids, **kw)

    eng = LocalEngine(Boom(lm.model), lm.tokenizer, max_seqs=4)
    try:
        bad = eng.generate_sync([2, 5, 7], SamplingParams(max_tokens=3))
        assert bad[-1].finish_reason == "error" and "bad prompt" in bad[-1].error
        ok = eng.generate_sync(lm.prompt_ids("Hi"), SamplingParams(max_tokens=3, temperature=0, stop_token_ids=[]))
        assert ok[-1].finish_reason == "length"
        assert eng.stats()["errors"] == 1
    finally:
        eng.shutdown(drain_timeout_s=1)


def _hf_greedy(model, ids, n):
    """``model.generate()`` greedy, exactly ``n`` new tokens (the reference the engine must equal).

    No eos: generation neither stops at it nor suppresses it (``min_new_tokens`` would mask its logit, so
    the reference would pick the runner-up where the engine, told ``stop_token_ids=[]``, picks eos)."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("lean,chunk,compiled", [
    (None, 512, False), (None, 5, False), (False, 512, False),
    pytest.param(None, 5, True, marks=pytest.mark.slow)], ids=["lean", "lean-chunked", "generic", "lean-compiled"])
def test_greedy_equals_hf_generate_mixed_lengths_and_joins(lm, lean, chunk, compiled):
    """Prompts of mixed lengths prefilled together (packed), and a second wave joining a batch that is
    already decoding, give token for token what HF ``model.generate()`` gives for each prompt alone; with
    ``prefill_chunk=5`` the longer prompts are prefilled over several scheduler steps; ``compile=True``
    runs the torch.compile'd decode step (batch 1 and the dynamic batch >= 2 graph)."""
    ids = [lm.prompt_ids(p) for p in PROMPTS]
    ref = [_hf_greedy(lm.model, i, 16) for i in ids]
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=8, prefill_chunk=chunk, lean=lean, compile=compiled)
    assert (eng._lean is not None) == (lean is None)
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    try:
        first = [eng.submit(GenerationRequest(i, params)) for i in ids[:3]]  # admitted together
        it = iter(first[0])
        head = next(it).token_id  # the first wave is decoding
        late = [eng.submit(GenerationRequest(i, params)) for i in ids[3:]]
        got = [[e.token_id for e in s if e.token_id is not None] for s in [it, *first[1:], *late]]
        got[0] = [head] + got[0]
        alone = [e.token_id for e in eng.generate_sync(ids[1], params) if e.token_id is not None]  # batch of 1
        if lean is None:  # the second wave was prefilled inside the first wave's decode steps
            assert eng.stats()["mixed_steps"] > 0
    finally:
        eng.shutdown(drain_timeout_s=1)
    for k in range(len(ids)):
        assert got[k] == ref[k], f"prompt {k} differs from model.generate()"
    assert alone == ref[1]


def test_lean_rows_compact_when_sequences_finish(lm):
    """Rows leaving mid-batch (short max_tokens) move the last row into their slot; the others go on unchanged."""
    ids = [lm.prompt_ids(p) for p in PROMPTS]
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=8)
    lengths = [3, 20, 5, 20, 1]
    try:
        streams = [eng.submit(GenerationRequest(i, SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[])))
                   for i, n in zip(ids, lengths)]
        got = [[e.token_id for e in s if e.token_id is not None] for s in streams]
    finally:
        eng.shutdown(drain_timeout_s=1)
    for i, n, g in zip(ids, lengths, got):
        assert g == _hf_greedy(lm.model, i, n)


def test_generic_path_for_non_llama_models(tokenizer):
    """A GPT-2 model has no lean path: it is served through model.forward + DynamicCache, batched == alone."""
    from lmwright.models import ModelConfig, build_model

    from .conftest import scramble

    model = build_model(ModelConfig(name="gpt-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    scramble(model)
    model.eval()
    ids = [list(tokenizer(p)["input_ids"]) for p in PROMPTS[:3]]
    eng = LocalEngine(model, tokenizer, max_seqs=4)
    assert eng._lean is None
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    try:
        streams = [eng.submit(GenerationRequest(i, params)) for i in ids]
        got = [[e.token_id for e in s if e.token_id is not None] for s in streams]
    finally:
        eng.shutdown(drain_timeout_s=1)
    for i, g in zip(ids, got):
        assert g == generate(model, tokenizer, i, params).token_ids


def test_a_step_delivers_its_events_in_one_call_per_event_loop(monkeypatch):
    """Events put inside deliver_together() reach the consumer's event loop in one call at the end of the block (one
    wake-up per engine step, not one per stream), each stream's events in the order they were put, the end marker
    last; outside the block each put is its own call."""
    import asyncio
    from types import SimpleNamespace

    from lmwright.serve.engine import RequestStream, deliver_together

    loop = asyncio.new_event_loop()
    calls = []
    real = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: calls.append(a) or real(*a))

    async def make():
        return [RequestStream("a"), RequestStream("b")]

    streams = loop.run_until_complete(make())

    def engine_thread():
        with deliver_together():
            for i in range(3):
                for s in streams:
                    s.put(SimpleNamespace(token_id=i, tag=f"{s.request_id}{i}"))
            with deliver_together():  # nested: still one delivery, by the outer block
                streams[0].put(None)
        streams[1].put(None)  # outside: delivered on its own

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()

    async def drain(s):
        return [ev.tag async for ev in s]

    async def drain_all():
        return await asyncio.gather(*(drain(s) for s in streams))

    got = loop.run_until_complete(drain_all())
    loop.close()
    assert got == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert len(calls) == 2  # the step's seven events in one call, the late end marker in another


@pytest.mark.parametrize("lean", [True, False])
def test_first_token_is_sent_before_the_next_decode_step(lm, lean):
    """A prompt prefilled while nothing was decoding sends its first token at once, not after the decode step that
    follows in the same scheduler pass (it did: one decode step of time to first token, ~17 ms at 1 stream and
    ~60 ms at 16 on SmolLM2 over HTTP). The decode step is slowed here so that the order shows."""
    import asyncio

    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=2, lean=lean)
    steps_done = []
    real_step = eng._step

    def slow_step():
        time.sleep(0.5)
        real_step()
        steps_done.append(1)

    eng._step = slow_step
    ids = lm.prompt_ids(PROMPTS[0])

    async def first_token():
        stream = eng.submit(GenerationRequest(ids, SamplingParams(max_tokens=3, temperature=0)))
        seen = None
        async for ev in stream:
            if ev.token_id is not None and seen is None:
                seen = len(steps_done)
        return seen

    try:
        assert asyncio.run(first_token()) == 0  # no decode step had finished when the first token arrived
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert len(steps_done) >= 2  # the other two tokens came from decode steps


@pytest.mark.parametrize("lean", [True, False])
def test_prompt_heavy_steps_run_on_prefill_threads(lm, lean):
    """A step computing PARALLEL_PROMPT_TOKENS or more prompt tokens runs on ``prefill_threads``, every other step
    (decode, a short prompt) on ``threads``: a 16-prompt burst's mixed step is compute-bound and a second core
    nearly halves its time to first token, while decode steps leave the other core to the HTTP thread. Before,
    every step ran on the scheduler's one thread count."""
    import torch

    from lmwright.serve.engine import PARALLEL_PROMPT_TOKENS

    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=4, lean=lean, threads=1, prefill_threads=2,
                      prefix_cache_mb=0)
    seen: list[tuple[int, int]] = []  # (tokens in the forward pass, torch threads at that time)
    hook = lm.model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append((args[0].numel(), torch.get_num_threads())))
    try:
        long_ids = (lm.prompt_ids(PROMPTS[1]) * 10)[:PARALLEL_PROMPT_TOKENS + 6]
        short_ids = lm.prompt_ids(PROMPTS[0])
        assert len(short_ids) < PARALLEL_PROMPT_TOKENS
        greedy = SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[])
        long_out = [e.token_id for e in eng.generate_sync(long_ids, greedy) if e.token_id is not None]
        eng.generate_sync(short_ids, greedy)
    finally:
        hook.remove()
        eng.shutdown(drain_timeout_s=1)
    assert (len(long_ids), 2) in seen  # the long prompt's prefill on both threads
    assert (len(short_ids), 1) in seen  # the short one's on the decode count
    assert {t for n, t in seen if n < PARALLEL_PROMPT_TOKENS} == {1}  # decode steps: one thread
    alone = generate(lm.model, lm.tokenizer, long_ids, SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[]))
    assert long_out == alone.token_ids  # the thread count changes no token


def test_engine_thread_counts_are_checked(lm):
    from lmwright.config import ConfigError
    from lmwright.serve.http import ServeConfig

    with pytest.raises(ConfigError, match="threads must be a whole number >= 1"):
        LocalEngine(lm.model, lm.tokenizer, threads=0)
    with pytest.raises(ConfigError, match="prefill_threads must be a whole number >= 1"):
        LocalEngine(lm.model, lm.tokenizer, prefill_threads=-2)
    with pytest.raises(ConfigError, match="threads and prefill_threads must be >= 0"):
        ServeConfig(model="x", prefill_threads=-1).check()
    eng = LocalEngine(lm.model, lm.tokenizer, threads=2, prefill_threads=1)
    try:
        assert (eng.threads, eng.prefill_threads) == (2, 2)  # prefill never gets fewer threads than decode
    finally:
        eng.shutdown(drain_timeout_s=1)
