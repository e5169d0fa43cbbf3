"""Serving weight precision (``--weights``): bf16 and int8 engines equal HF ``generate()`` on the same-precision
model at greedy, the int8 module, the ``auto`` probe's choice and cache, and the option's validation."""

from __future__ import annotations

import json

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.engine.sampling import SamplingParams
from lmwright.models import weights as W
from lmwright.models.attention import FP32_NAME
from lmwright.models.int8_linear import Int8Linear, dequantize_weight, quantize_int8, quantize_weight
from lmwright.serve.engine import GenerationRequest, LocalEngine

from .test_engine import PROMPTS, _hf_greedy


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def lm_prec(request, lm_dir):
    from lmwright.serve.api import load

    return load(lm_dir, name="tiny", weights=request.param)


def _run(eng, ids, n):
    params = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[])
    streams = [eng.submit(GenerationRequest(i, params)) for i in ids]
    return [[e.token_id for e in s if e.token_id is not None] for s in streams]


def test_engine_greedy_equals_hf_generate_at_the_same_precision(lm_prec):
    """One stream, then all prompts concurrently (packed prefill, batched decode), token for token what HF
    ``model.generate()`` gives on the same converted model (for int8: our quantized modules in place)."""
    m = lm_prec.model
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    if "int8" in lm_prec.weights_note:
        assert isinstance(m.lm_head, Int8Linear) and isinstance(m.model.layers[0].mlp.down_proj, Int8Linear)
    ids = [lm_prec.prompt_ids(p) for p in PROMPTS]
    ref = [_hf_greedy(m, i, 12) for i in ids]
    int8 = [mod for mod in m.modules() if isinstance(mod, Int8Linear)]
    eng = LocalEngine(m, lm_prec.tokenizer, max_seqs=8)
    limits = []
    try:
        assert eng._lean is not None
        # bf16 activations attend in fp32 on a CPU, in generate() (the model's attention) as in the engine
        assert m.config._attn_implementation == FP32_NAME and eng._lean.attn_dtype == torch.float32
        # the slot cache: bf16 where lmwright's decode-attention kernel runs (bf16 values held exactly, fp32 arithmetic)
        assert eng._lean.k[0].dtype == (torch.bfloat16 if eng._lean.attn_kernel else torch.float32)
        one = [_run(eng, [i], 12)[0] for i in ids[:2]]
        if int8 and int8[0].int8_layout != "tiles":  # torch's int8 kernel decodes 1-2 rows, more go through
            # bf16 over q * scale (rounded to bf16): batched rows take the other path than generate()'s batch of 1,
            # so compare both on one path (lmwright's int8 kernel serves every row count alike)
            limits = [mod.max_int8_rows for mod in int8]
            for mod in int8:
                mod.max_int8_rows = 0
            ref_together = [_hf_greedy(m, i, 12) for i in ids]
        else:
            ref_together = ref
        together = _run(eng, ids, 12)
    finally:
        eng.shutdown(drain_timeout_s=1)
        for mod, n in zip(int8, limits):
            mod.max_int8_rows = n
    assert one == ref[:2]
    for k in range(len(ids)):
        assert together[k] == ref_together[k], f"prompt {k} differs from model.generate() when served concurrently"


# ------------------------------------------------------------------------------------------ int8 module
def test_quantize_error_bound_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g) * torch.linspace(0.01, 3, 32)[:, None]
    w[5] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (32,)
    assert q.abs().max() <= 127 and (q[5] == 0).all()
    err = (w - q.float() * scale.float()[:, None]).abs()
    assert (err <= scale.float()[:, None] * 0.51 + 1e-12).all()  # half a step (+ the bf16 scale's rounding)
    deq = dequantize_weight(q, scale)
    assert deq.dtype == torch.bfloat16
    assert torch.allclose(deq.float(), q.float() * scale.float()[:, None], rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("kernel", ["torch", "lmwright"])
def test_int8_paths_agree_and_dispatch_on_rows(monkeypatch, kernel):
    from lmwright.models import cpu_kernels

    if kernel == "lmwright" and cpu_kernels.q8_kernel() is None:
        pytest.skip(f"lmwright's int8 kernel: {cpu_kernels.q8_unavailable_reason()}")
    if kernel == "torch":
        monkeypatch.setattr(cpu_kernels, "q8_usable", lambda q: False)
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    mod = Int8Linear.from_linear(lin, max_int8_rows=4)
    assert mod.int8_layout == ("tiles" if kernel == "lmwright" else "plain")
    assert (mod.bf16 is None) == (kernel == "lmwright")  # lmwright's kernel serves every call: no bf16 copy
    x = torch.randn(3, 5, 64, generator=g).bfloat16()  # 15 rows: torch's bf16 path
    calls = []
    name, owner = ("q8_matmul", cpu_kernels) if kernel == "lmwright" else ("_weight_int8pack_mm", torch)
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: calls.append(1) or real(*a))
    many = mod(x)
    assert len(calls) == (1 if kernel == "lmwright" else 0)
    few = torch.cat([mod(x[i, j:j + 1]) for i in range(3) for j in range(5)]).view(3, 5, 48)  # 1 row each: int8
    assert len(calls) == (16 if kernel == "lmwright" else 15)
    q = mod.int8_weight()
    assert q.dtype == torch.int8 and torch.equal(q, quantize_weight(lin.weight)[0])  # the plain layout back
    exact = x.float() @ (q.float() * mod.weight_scale.float()[:, None]).T + lin.bias.bfloat16().float()
    for y in (many, few):
        assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16
        assert (y.float() - exact).abs().max() <= 0.02 * exact.abs().max()
    if kernel == "lmwright":  # one path for every row count: a row's result does not depend on its batch
        assert torch.equal(many, few)
    else:
        assert (many.float() - few.float()).abs().max() <= 0.02 * exact.abs().max()
    assert torch.allclose(mod.weight.float(), q.float() * mod.weight_scale.float()[:, None], rtol=2**-8, atol=0)
    assert mod(x[0, :1].float()).dtype == torch.bfloat16  # fp32 input is cast to the bf16 activations


def test_quantize_int8_unties_the_head_and_keeps_the_embedding(tokenizer):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the presets tie the head
    emb = model.model.embed_tokens.weight.detach().clone()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        ref = model(x).logits
    quantize_int8(model)
    assert not model.config.tie_word_embeddings
    assert isinstance(model.lm_head, Int8Linear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(model.model.embed_tokens.weight, emb.bfloat16())  # the lookup table is not quantized
    assert model.lm_head.weight_int8.dtype == torch.int8 and not model.lm_head.weight.requires_grad
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.tie_weights()  # the untied head stays untied
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.inference_mode():
        out = model(x).logits.float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_int8_kernel_missing_is_a_clear_error(monkeypatch, tokenizer):
    from lmwright.models import ModelConfig, build_model, int8_linear

    model = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    int8_linear._check_kernel.cache_clear()
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    try:
        with pytest.raises(ConfigError, match="_weight_int8pack_mm.*bfloat16"):
            quantize_int8(model)
    finally:
        int8_linear._check_kernel.cache_clear()
    assert type(model.lm_head) is torch.nn.Linear  # nothing was changed


# ------------------------------------------------------------------------------------------ auto probe
def _fake_measure(f32: dict, b16: dict, calls: list):
    def measure(model, rows, reps=3):
        calls.append(rows)
        return {"float32": {str(r): f32.get(r, f32[8]) for r in rows}, "bfloat16": {str(r): b16.get(r, b16[8]) for r in rows}}

    return measure


@pytest.mark.parametrize("b16,expect", [({1: 30.0, 8: 50.0}, "bfloat16"),  # 1.5x and 2x
                                        ({1: 40.0, 8: 50.0}, "float32"),  # 1.12x at 1 row: not enough
                                        ({1: 30.0, 8: 120.0}, "float32")])  # slower at 8 rows
def test_auto_chooses_by_the_probe_and_caches_it(monkeypatch, tmp_path, tiny_llama, caplog, b16, expect):
    monkeypatch.setenv("LMWRIGHT_CACHE", str(tmp_path))
    monkeypatch.setenv("LMWRIGHT_PRECISION_PROBE", "on")  # the suite turns probes off
    monkeypatch.setattr("lmwright.utils.hardware.cpu_flags", lambda: {"avx2", "avx512_bf16"})
    calls: list = []
    monkeypatch.setattr(W, "measure", _fake_measure({1: 45.0, 8: 100.0}, b16, calls))
    tiny_llama.float()
    note = W.prepare_weights(tiny_llama, "auto", max_seqs=8)
    assert note.startswith(f"weights: {expect} (probe: fp32 45.0 ms, bf16 {b16[1]:.1f} ms per step at 1 row; "
                           f"fp32 100.0 ms, bf16 {b16[8]:.1f} ms per step at 8 rows")
    assert "measured now, cached" in note
    assert next(tiny_llama.parameters()).dtype == (torch.bfloat16 if expect == "bfloat16" else torch.float32)
    assert calls == [[1, 8]]
    cache = json.loads((tmp_path / "precision.json").read_text())  # beside the training probe's figures
    (key, entry), = cache.items()
    assert key.startswith("serve-weights") and "avx2,avx512_bf16" in key and "rows [1, 8]" in key
    assert f"threads {torch.get_num_threads()}" in key and entry["ms"]["float32"] == {"1": 45.0, "8": 100.0}
    tiny_llama.float()
    again = W.prepare_weights(tiny_llama, "auto", max_seqs=8)  # from the cache: not measured again
    assert calls == [[1, 8]] and "; cached;" in again and again.split(";")[0] == note.split(";")[0]
    W.prepare_weights(tiny_llama.float(), "auto", max_seqs=16)  # another batch is another probe
    assert calls == [[1, 8], [1, 16]]


def test_auto_without_the_probe_is_float32(monkeypatch, tiny_llama):
    monkeypatch.setenv("LMWRIGHT_PRECISION_PROBE", "off")
    monkeypatch.setattr("lmwright.utils.hardware.cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(W, "measure", lambda *a, **k: pytest.fail("the probe is off"))
    note = W.prepare_weights(tiny_llama.float(), "auto")
    assert note.startswith("weights: float32 (LMWRIGHT_PRECISION_PROBE=off")
    assert next(tiny_llama.parameters()).dtype == torch.float32


def test_auto_with_amx_is_bf16_without_a_probe(monkeypatch, tiny_llama):
    monkeypatch.setattr("lmwright.utils.hardware.cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    monkeypatch.setattr(W, "measure", lambda *a, **k: pytest.fail("no probe with AMX"))
    note = W.prepare_weights(tiny_llama.float(), "auto")
    assert note.startswith("weights: bfloat16 (CPU with AMX") and next(tiny_llama.parameters()).dtype == torch.bfloat16


def test_auto_keeps_models_that_are_not_float32(monkeypatch, tiny_llama):
    monkeypatch.setattr(W, "measure", lambda *a, **k: pytest.fail("no probe"))
    tiny_llama.to(torch.bfloat16)
    assert "as loaded" in W.prepare_weights(tiny_llama, "auto")
    assert W.prepare_weights(tiny_llama, None) == ""


def test_real_probe_measures_both_precisions(tiny_llama):
    ms = W.measure(tiny_llama.float(), [1, 2], reps=1)
    assert set(ms) == {"float32", "bfloat16"} and all(v > 0 for d in ms.values() for v in d.values())
    assert next(tiny_llama.parameters()).dtype == torch.float32  # the probe copies, the model is untouched


# ------------------------------------------------------------------------------------------ validation
def test_bad_weights_value_names_the_option(lm_dir, tmp_path):
    from lmwright.config import load_config
    from lmwright.serve.api import load
    from lmwright.serve.http import ServeConfig

    with pytest.raises(ConfigError, match=r"weights must be one of auto, float32, bfloat16, int8, got 'int4'"):
        load(lm_dir, weights="int4")
    with pytest.raises(ConfigError, match="weights"):
        load_config(ServeConfig, [], ["model=x", "weights=fp16"])
    assert load_config(ServeConfig, [], ["model=x", "weights=int8"]).weights == "int8"
    assert ServeConfig().weights == "auto"


def test_cli_weights_flag(capsys):
    from lmwright.cli import main
    from lmwright.cli.serve import _overrides

    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--weights", "int4"])
    assert "--weights: invalid choice: 'int4'" in capsys.readouterr().err

    class Args:
        overrides: list = []
        weights, model = "bfloat16", "m"

    assert "weights=bfloat16" in _overrides(Args())


def test_bf16_slot_cache_only_with_the_kernel(lm_prec, monkeypatch):
    """The lean path's slot cache is bf16 only while lmwright's decode-attention kernel attends on it; compiling the
    decode step (SDPA, fp32 attention) converts it back to fp32."""
    from lmwright.models import cpu_kernels
    from lmwright.serve.lean import LeanLlama

    lean = LeanLlama(lm_prec.model, max_seqs=2, max_context=64)
    kernel = cpu_kernels.attention_kernel() is not None
    assert lean.attn_kernel == kernel and lean.attn_dtype == torch.float32
    assert lean.k[0].dtype == lean.cache_dtype == (torch.bfloat16 if kernel else torch.float32)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # what matters is the switch, not inductor
    lean.compile()
    assert lean.attn_kernel is False and lean.k[0].dtype == lean.v[-1].dtype == torch.float32
    lean.grow(lean.capacity + 1)
    assert lean.k[0].dtype == torch.float32
