"""The engine's lean path beyond Llama: Mistral, Qwen2 (Qwen2.5) and Qwen3 decoders are Llama's as far as it goes
(Qwen2 adds biases to q/k/v, Qwen3 a norm of each query / key head), so they are served by it, with the answers of
HF ``generate()``; a sliding window shorter than the context keeps a model on the generic path."""

from __future__ import annotations

import threading

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.engine.sampling import SamplingParams
from lmwright.serve.engine import LocalEngine
from lmwright.serve.lean import lean_supported
from tests.families import build_family_model

from .conftest import scramble
from .test_engine import PROMPTS, _hf_greedy


def _tiny(family: str, tokenizer, **extra):
    """tests/families.py's ``family`` model with ``extra`` config changes, scrambled, its biases random too."""
    model = build_family_model(family, tokenizer, attn_implementation="sdpa", **extra)
    scramble(model)
    with torch.no_grad():  # Qwen2's q/k/v biases (zero at init) must matter too
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("family,weights", [("qwen2", "float32"), ("mistral", "float32"), ("qwen2", "bfloat16"),
                                            ("qwen3", "float32"), ("qwen2", "int8")])
def test_qwen2_and_mistral_take_the_lean_path_with_generates_answers(lm, tmp_path, family, weights):
    from lmwright.serve.api import load

    model = _tiny(family, lm.tokenizer, sliding_window=None) if family == "mistral" else _tiny(family, lm.tokenizer)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if family == "qwen3":  # its per-head query / key norms must matter too
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    served = load(tmp_path, name=family, weights=weights)
    assert lean_supported(served.model)
    eng = LocalEngine(served.model, served.tokenizer, max_seqs=4)
    assert eng._lean is not None
    ids = [served.prompt_ids(p) for p in PROMPTS[:4]]
    out: dict[int, list[int]] = {}

    def run(k):  # concurrent streams: prompts packed together, decoded in one batch
        params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
        out[k] = [e.token_id for e in eng.generate_sync(ids[k], params) if e.token_id is not None]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert [out[k] for k in range(len(ids))] == [_hf_greedy(served.model, i, 12) for i in ids]


@pytest.mark.parametrize("family,extra", [
    ("mistral", {}),  # tests/families.py's Mistral: an 8-token window
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
])
def test_a_short_sliding_window_keeps_the_generic_path(lm, family, extra):
    model = _tiny(family, lm.tokenizer, **extra)
    assert not lean_supported(model)
    with pytest.raises(ConfigError, match="sliding window"):
        LocalEngine(model, lm.tokenizer, lean=True)
    eng = LocalEngine(model, lm.tokenizer, max_seqs=2)
    try:
        assert eng._lean is None
        ids = lm.prompt_ids(PROMPTS[1])
        got = [e.token_id for e in eng.generate_sync(ids, SamplingParams(max_tokens=6, temperature=0,
                                                                         stop_token_ids=[])) if e.token_id is not None]
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert got == _hf_greedy(model, ids, 6)
