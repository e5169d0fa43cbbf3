"""The built-in engine's prefix cache: prompts that start like a finished one reuse its KV columns, and
answers do not change."""

from __future__ import annotations

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.engine.sampling import SamplingParams
from lmwright.serve.engine import LocalEngine
from lmwright.serve.lean import LeanLlama, PrefixCache, Segment, common_prefix_len

from .test_engine import _hf_greedy

SYSTEM = "You are a careful assistant who answers in short plain sentences. Question: "
QUESTIONS = ["Once upon a time", "The cat sat on the mat", "小猫在花园里", "A bird flew over the hill and"]


def _greedy(eng, ids, n=12):
    params = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[])
    return [e.token_id for e in eng.generate_sync(ids, params) if e.token_id is not None]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len((5,), [6]) == 0
    assert common_prefix_len([], [1]) == 0


def test_shared_system_prompt_reused_and_answers_unchanged(lm):
    """Prompts sharing a long beginning: from the second on, the shared tokens are copied, not computed;
    every answer equals HF generate() on the whole prompt, and equals the engine's with the cache off."""
    ids = [lm.prompt_ids(SYSTEM + q) for q in QUESTIONS]
    shared = common_prefix_len(ids[0], ids[1])
    assert shared >= 8
    on = LocalEngine(lm.model, lm.tokenizer, max_seqs=4)
    off = LocalEngine(lm.model, lm.tokenizer, max_seqs=4, prefix_cache_mb=0)
    try:
        got_on = [_greedy(on, i) for i in ids]
        got_off = [_greedy(off, i) for i in ids]
        st_on, st_off = on.stats(), off.stats()
    finally:
        on.shutdown(drain_timeout_s=1)
        off.shutdown(drain_timeout_s=1)
    assert got_on == got_off
    assert got_on == [_hf_greedy(lm.model, i, 12) for i in ids]
    # each later prompt reused at least the shared beginning
    assert st_on["prefix_hit_tokens"] >= (len(ids) - 1) * min(common_prefix_len(ids[0], i) for i in ids[1:])
    assert st_on["prefix_cache_used_mb"] > 0
    assert st_off["prefix_hit_tokens"] == 0 and st_off["prefix_cache_used_mb"] == 0


def test_identical_prompt_runs_only_its_last_token(lm):
    ids = lm.prompt_ids(SYSTEM + QUESTIONS[1])
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=2)
    try:
        first = _greedy(eng, ids)
        second = _greedy(eng, ids)
        hits = eng.stats()["prefix_hit_tokens"]
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert first == second == _hf_greedy(lm.model, ids, 12)
    assert hits == len(ids) - 1


def test_chat_coming_back_with_a_new_turn(lm):
    """A conversation sent again with one more turn reuses the whole earlier prompt, with chunked prefill too."""
    turn1 = [{"role": "user", "content": "Tell me about cats."}]
    turn2 = turn1 + [{"role": "assistant", "content": "Cats are small."}, {"role": "user", "content": "And dogs?"}]
    a, b = lm.chat_ids(turn1), lm.chat_ids(turn2)
    reuse = common_prefix_len(a, b)
    assert reuse >= len(a) - 2
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=2, prefill_chunk=3)
    try:
        _greedy(eng, a, 4)
        got = _greedy(eng, b)
        hits = eng.stats()["prefix_hit_tokens"]
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert hits == reuse
    assert got == _hf_greedy(lm.model, b, 12)


def test_prefill_after_copied_prefix_equals_full_prefill(lm):
    """At the model level: the last-token logits of a prompt prefilled after copying a cached prefix equal
    those of the whole prompt prefilled at once."""
    lean = LeanLlama(lm.model, max_seqs=2, max_context=256)
    a, b = (lm.prompt_ids(SYSTEM + q) for q in QUESTIONS[:2])
    n = common_prefix_len(a, b)
    with torch.inference_mode():
        buf_a = lean.new_buffer(len(a))
        lean.prefill([Segment(buf_a, 0, a)])
        full = lean.prefill([Segment(lean.new_buffer(len(b)), 0, b)])[0]
        buf_b = lean.new_buffer(len(b))
        lean.copy_prefix(buf_a, buf_b, n)
        reused = lean.prefill([Segment(buf_b, n, b[n:])])[0]
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


def _buf(n, width=4):
    return [(torch.zeros(1, 1, n, width), torch.zeros(1, 1, n, width))]  # 32 * n bytes


def test_prefix_cache_bookkeeping():
    cache = PrefixCache(max_bytes=32 * 10)
    cache.add([1, 2, 3, 4], _buf(4))
    assert cache.match([1, 2, 3, 4, 5])[1] == 4
    assert cache.match([1, 2, 3, 4])[1] == 3  # the last token is always run
    assert cache.match([9, 1]) == (None, 0)
    cache.add([1, 2], _buf(2))  # a prefix of a kept prompt adds nothing
    assert list(cache.entries) == [(1, 2, 3, 4)] and cache.bytes == 32 * 4
    cache.add([1, 2, 3, 4, 5, 6], _buf(6))  # extends the kept one: replaces it
    assert list(cache.entries) == [(1, 2, 3, 4, 5, 6)] and cache.bytes == 32 * 6
    cache.add([7, 8, 9], _buf(3))
    assert cache.bytes == 32 * 9
    cache.match([1, 2, 3, 0])  # touch the first: the other is now the least recently used
    cache.add([5, 5], _buf(2))  # 11 > 10: the least recently used goes
    assert list(cache.entries) == [(1, 2, 3, 4, 5, 6), (5, 5)] and cache.bytes == 32 * 8
    cache.add(list(range(20)), _buf(20))  # larger than the whole cache: not kept
    assert (0, 1) not in {k[:2] for k in cache.entries} and cache.bytes <= cache.max_bytes


def test_prefix_cache_bounds_its_entries():
    cache = PrefixCache(max_bytes=10**9, max_entries=3)
    for k in range(5):
        cache.add([100 + k, 1], _buf(2))
    assert list(cache.entries) == [(102, 1), (103, 1), (104, 1)] and cache.bytes == 3 * 64


def test_prefix_cache_config_checked(lm):
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        LocalEngine(lm.model, lm.tokenizer, prefix_cache_mb=-1)
    from lmwright.serve.http import ServeConfig

    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        ServeConfig(model="x", prefix_cache_mb=-5).check()


def test_prefix_cache_lookup_equals_comparing_every_entry():
    """The sorted-keys lookup finds as long a shared prefix as comparing the prompt with every entry did, and adding
    keeps the rule that no key is a prefix of another (random prompts over a 3-word vocabulary: many shared
    prefixes, prompts that extend or are covered by cached ones)."""
    import random

    rng = random.Random(0)
    cache = PrefixCache(max_bytes=10**9, max_entries=40)
    for _ in range(2000):
        ids = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        best = max((common_prefix_len(k, ids) for k in cache.entries), default=0)
        buf, n = cache.match(ids)
        assert n == min(best, len(ids) - 1)
        if n:
            assert common_prefix_len(next(k for k, b in cache.entries.items() if b is buf), ids) >= n
        cache.add(ids, _buf(len(ids)))
        keys = list(cache.entries)
        assert sorted(keys) == cache._sorted and len(keys) <= 40
        assert not any(a != b and b[:len(a)] == a for a in keys for b in keys)
        assert cache.bytes == sum(32 * len(k) for k in keys)
