"""The vLLM engine behind the same interface (needs CUDA and vllm; skipped elsewhere)."""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.gpu
def test_vllm_engine_streams_like_builtin(lm_dir, lm):
    pytest.importorskip("vllm")
    from lmwright.serve.engine import GenerationRequest, VllmEngine
    from lmwright.serve.generation import SamplingParams

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
