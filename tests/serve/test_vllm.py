"""The vLLM engine behind the same interface (needs CUDA and vllm; skipped elsewhere)."""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.gpu
def test_vllm_engine_streams_like_builtin(lm_dir, lm):
    pytest.importorskip("vllm")
    from lmwright.engine.sampling import SamplingParams
    from lmwright.serve.engine import GenerationRequest, VllmEngine

    async def run():
        eng = VllmEngine(str(lm_dir), lm.tokenizer, max_seqs=4, gpu_memory_utilization=0.3, enforce_eager=True)
        ids = lm.prompt_ids("Once upon a time")
        stream = eng.submit(GenerationRequest(ids, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])))
        events = [ev async for ev in stream]
        eng.shutdown()
        return events

    events = asyncio.run(run())
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 8
    text = "".join(e.text for e in events)
    assert text == lm.generate("Once upon a time", max_tokens=8, temperature=0, stop_token_ids=[])


# ------------------------------------------------------------------------------- without vllm: a fake
def _fake_vllm(monkeypatch, tokens_per_choice: int = 3):
    """A stand-in ``vllm`` module: AsyncLLMEngine.generate yields cumulative outputs as vLLM does, one token a
    step, ``tokens_per_choice`` tokens per choice."""
    import sys
    import types

    class Choice:
        def __init__(self, index, n):
            self.index, self.token_ids = index, list(range(100, 100 + n))
            self.text = "".join(f"t{t}" for t in self.token_ids)
            self.logprobs = None
            self.finish_reason = "length" if n == tokens_per_choice else None

    class Engine:
        model_config = types.SimpleNamespace(max_model_len=128)

        @classmethod
        def from_engine_args(cls, args):
            return cls()

        async def generate(self, prompt, sampling, request_id):
            for n in range(1, tokens_per_choice + 1):
                yield types.SimpleNamespace(outputs=[Choice(i, n) for i in range(sampling.n)])

        async def abort(self, request_id):
            pass

    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = lambda model, max_num_seqs, **kw: types.SimpleNamespace(model=model, max_model_len=None)
    vllm.AsyncLLMEngine = Engine
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", vllm)


def test_vllm_engine_counts_tokens(monkeypatch, tokenizer):
    """stats() counts prompt tokens once per request and every completion token of every choice, as the
    built-in engine does (/metrics reads them); it used to report 0 for both."""
    from lmwright.engine.sampling import SamplingParams
    from lmwright.serve.engine import GenerationRequest, VllmEngine

    _fake_vllm(monkeypatch, tokens_per_choice=3)

    async def run():
        eng = VllmEngine("fake-model", tokenizer)
        streams = [eng.submit(GenerationRequest([1, 2, 3, 4, 5], SamplingParams(max_tokens=3, n=2))),
                   eng.submit(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=3)))]
        events = [[ev async for ev in s] for s in streams]
        return eng.stats(), events

    stats, events = asyncio.run(run())
    assert [e.finish_reason for e in events[0] if e.finish_reason] == ["length", "length"]
    assert stats["requests"] == 2 and stats["active_sequences"] == 0
    assert stats["prompt_tokens"] == 5 + 3
    assert stats["completion_tokens"] == 2 * 3 + 3


def test_serve_cli_picks_the_engine_through_the_registry(monkeypatch, lm_dir):
    """`lmwright serve --engine NAME` builds its engine through ENGINES (a plugin engine needs no CLI code)."""
    from lmwright.cli import main
    from lmwright.serve import http
    from lmwright.serve.engine import ENGINES

    built, served = [], []

    class Fake:
        name = "fake"

        @classmethod
        def serve_target(cls, cfg):
            built.append(cfg.model)
            return cls()

    monkeypatch.setitem(ENGINES._items, "vllm", Fake)
    monkeypatch.setattr(http, "create_app", lambda models, cfg: models)
    monkeypatch.setattr(http, "serve", lambda app, cfg: served.append(app))
    assert main(["serve", "--model", str(lm_dir), "--engine", "vllm"]) == 0
    assert built == [str(lm_dir)] and isinstance(served[0]["fake"], Fake)
