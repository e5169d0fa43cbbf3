"""Issue 13: a request that fails inside the scheduler ends alone; the rest of the batch goes on."""

from __future__ import annotations

import threading
import time

import pytest

from lmwright.engine.sampling import SamplingParams
from lmwright.serve.engine import GenerationRequest, LocalEngine


class Unchecked(SamplingParams):
    """Params that slip past validation, as a value no check foresaw would."""

    def check(self) -> None:
        pass


def _run(stream, out: dict, key: str) -> threading.Thread:
    def work():
        out[key] = list(stream)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("bad", [{"seed": 2**64}, {"temperature": 1e-40}, {"repetition_penalty": 1e-300}],
                         ids=["seed", "temperature", "repetition_penalty"])
def test_failing_sequence_ends_alone(lm, lean, bad):
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=4, lean=lean)
    try:
        out: dict = {}
        good = eng.submit(GenerationRequest(lm.prompt_ids("a good request"),
                                            SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])))
        tg = _run(good, out, "good")
        bad_params = Unchecked(**{"max_tokens": 12, "temperature": 1.0, "stop_token_ids": [], "seed": 1, **bad})
        culprit = eng.submit(GenerationRequest(lm.prompt_ids("a bad request"), bad_params))
        tb = _run(culprit, out, "bad")
        tg.join(timeout=30)
        tb.join(timeout=30)
        assert not tb.is_alive(), "the culprit's stream never ended"
        assert not tg.is_alive()
        assert out["bad"][-1].finish_reason == "error" and out["bad"][-1].error
        assert out["good"][-1].finish_reason == "length"
        assert out["good"][-1].completion_tokens == 12
        alone = eng.generate_sync(lm.prompt_ids("a good request"),
                                  SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[]))
        assert [e.token_id for e in out["good"]] == [e.token_id for e in alone]
        deadline = time.time() + 5  # the stream ends a moment before the row leaves the batch
        while eng.stats()["active_sequences"] and time.time() < deadline:
            time.sleep(0.01)
        stats = eng.stats()
        assert stats["errors"] == 1 and stats["active_sequences"] == 0
        assert not eng._requests  # nothing leaked
    finally:
        eng.shutdown(drain_timeout_s=1)


def test_fail_all_ends_orphaned_requests(lm):
    """A request already off the queue but not yet in the batch still gets its stream closed."""
    from lmwright.serve.engine import RequestStream, _Request

    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=2)
    try:
        stream = RequestStream("orphan")
        r = _Request(GenerationRequest([1, 2], SamplingParams(), "orphan"), stream, None)
        with eng._cv:
            eng._requests["orphan"] = r
        eng._fail_all("boom")
        events = list(stream)
        assert events[-1].finish_reason == "error" and "orphan" not in eng._requests
    finally:
        eng.shutdown(drain_timeout_s=1)


@pytest.mark.parametrize("kw,field", [({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
                                      ({"temperature": 1e-40}, "temperature"),
                                      ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                                      ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                                      ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": -1.0}, "timeout_s"),
                                      ({"stop": ["x" * 10_000]}, "stop")])
def test_out_of_range_params_are_refused(kw, field):
    from lmwright.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        SamplingParams(**kw).check()
