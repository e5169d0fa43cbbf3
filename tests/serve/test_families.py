"""The built-in engine on every decoder family (tests/families.py): a local folder loaded with
``lmwright.serve.api.load`` gives, batched, token for token what HF ``model.generate()`` gives for each
prompt alone (Llama, with Llama-3 rope scaling, Qwen2 and Qwen3 on the lean path; the others on the generic path,
Mistral and Gemma-2/3 with sliding-window attention over prompts longer than the window)."""

from __future__ import annotations

import pytest

from lmwright.engine.sampling import SamplingParams
from lmwright.serve.engine import GenerationRequest, LocalEngine
from tests.families import FAMILY_NAMES, save_family_folder

from .test_engine import PROMPTS, _hf_greedy


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_greedy_equals_hf_generate(tmp_path, tokenizer, family):
    from lmwright.serve.api import load

    lm = load(save_family_folder(family, tokenizer, tmp_path / family, scramble_std=0.3))
    ids = [lm.prompt_ids(p) for p in PROMPTS]
    assert max(len(i) for i in ids) > 8  # longer than the sliding windows of tests/families.py
    n = 12
    ref = [_hf_greedy(lm.model, i, n) for i in ids]
    assert max(len(set(r)) for r in ref) > 3, "the reference repeats one token: it would hide decoding bugs"
    eng = LocalEngine(lm.model, lm.tokenizer, max_seqs=4)
    # the lean path: Llama-architecture decoders without a sliding window shorter than the context (Mistral here has
    # an 8-token window)
    assert (eng._lean is not None) == (family in ("llama", "qwen2", "qwen3"))
    params = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[])
    try:
        first = [eng.submit(GenerationRequest(i, params)) for i in ids[:3]]
        it = iter(first[0])
        head = next(it).token_id  # the first wave is decoding when the rest join
        late = [eng.submit(GenerationRequest(i, params)) for i in ids[3:]]
        got = [[e.token_id for e in s if e.token_id is not None] for s in [it, *first[1:], *late]]
        got[0] = [head] + got[0]
    finally:
        eng.shutdown(drain_timeout_s=1)
    for k in range(len(ids)):
        assert got[k] == ref[k], f"{family}: prompt {k} differs from model.generate()"
