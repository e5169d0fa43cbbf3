"""bf16 linear layers held for the product when serving on a CPU (lmwright's kernel's tiles, else oneDNN's packed
layout): the same products as F.linear (bit for bit with oneDNN, to the last bf16 bit with the kernel), the whole
model's logits kept, peft layers left alone, conversions still possible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmwright.models import cpu_kernels
from lmwright.models.packed_linear import PackedLinear, pack_linears, packing_works

pytestmark = pytest.mark.skipif(not packing_works(torch.bfloat16) and cpu_kernels.kernels() is None,
                                reason="this CPU/torch can neither pack bf16 linears nor run lmwright's kernel")


def _model(tokenizer):
    from lmwright.models import ModelConfig, build_model

    return build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).eval()


def _close(y, ref):
    """Within bf16 rounding of a float64 reference (the kernel's fp32 sums run in another order than oneDNN's)."""
    ref = ref.double()
    return y.shape == ref.shape and bool(((y.double() - ref).abs() <= ref.abs() * 2**-7 + 2**-7).all())


@pytest.mark.parametrize("kernel", [True, False])
def test_packed_linear_equals_f_linear(kernel, monkeypatch):
    if kernel and cpu_kernels.kernels() is None:
        pytest.skip(f"lmwright's bf16 kernel: {cpu_kernels.unavailable_reason()}")
    if not kernel:
        if not packing_works(torch.bfloat16):
            pytest.skip("no oneDNN bf16 packing here")
        monkeypatch.setattr(cpu_kernels, "usable", lambda w: False)  # a CPU without lmwright's kernel
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g))
    mod = PackedLinear.from_linear(lin)
    assert mod.layout == ("tiles" if kernel else "onednn")
    assert (mod._packed is not None and mod._packed.is_mkldnn) == (not kernel)
    for shape in ((1, 96), (3, 96), (1, 1, 96), (4, 96), (2, 7, 96), (33, 96)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        y = mod(x)
        assert _close(y, F.linear(x.double(), lin.weight.double(), lin.bias.double()))
        if not kernel:  # oneDNN's packed product: the same sums as F.linear's
            assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert torch.equal(mod.weight, lin.weight)  # a dense copy for inspection
    assert mod(torch.randn(2, 96)).dtype == torch.bfloat16  # fp32 input is cast to the weight's dtype


def test_pack_linears_keeps_the_model_logits(tokenizer):
    model = _model(tokenizer).to(torch.bfloat16)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        ref = model(x).logits
    assert pack_linears(model) == n_linear
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear) and not model.config.tie_word_embeddings
    layout = model.lm_head.layout
    assert layout == ("tiles" if cpu_kernels.kernels() is not None else "onednn")

    def same(out):  # bit for bit with oneDNN; with the kernel each product within its last bf16 bit
        return torch.equal(out, ref) if layout == "onednn" else torch.allclose(out, ref, atol=0.05, rtol=0.02)

    with torch.inference_mode():
        assert same(model(x).logits)
    # converting the model back converts the held layers too (dense, no longer packed)
    model.float()
    assert model.lm_head.layout == "dense" and model.lm_head.weight.dtype == torch.float32
    with torch.inference_mode():
        out = model(x).logits
    assert out.dtype == torch.float32 and torch.allclose(out, ref.float(), atol=0.1, rtol=0.05)
    model.to(torch.bfloat16)  # and held for the product again
    assert model.lm_head.layout == layout
    with torch.inference_mode():
        assert same(model(x).logits)


def test_fp32_models_and_peft_layers_are_not_packed(tokenizer):
    from peft import LoraConfig, get_peft_model

    assert pack_linears(_model(tokenizer)) == 0  # fp32: nothing to do
    model = get_peft_model(_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.to(torch.bfloat16)
    packed = pack_linears(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer) is torch.nn.Linear and type(q.lora_A["default"]) is torch.nn.Linear
    assert isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, PackedLinear)
    assert packed == sum(isinstance(m, PackedLinear) for m in model.modules()) > 0


def test_bf16_serving_packs_and_says_so(lm_dir):
    from lmwright.models import cpu_kernels
    from lmwright.serve.api import load

    m = load(lm_dir, name="tiny", weights="bfloat16")
    down = m.model.model.layers[0].mlp.down_proj
    assert isinstance(down, PackedLinear)
    kernel = cpu_kernels.kernels() is not None  # AVX-512 CPUs: every call through lmwright's bf16 kernel, said so
    n = sum(isinstance(mod, PackedLinear) for mod in m.model.modules())
    held = "held in tiles for lmwright's bf16 kernel" if kernel else "packed for oneDNN"
    assert f"; {n} linear layers {held}" in m.weights_note, m.weights_note
    assert down.layout == ("tiles" if kernel else "onednn")  # any inner size (176 here)


def test_unpack_keeps_products_and_int8_row_limit(tokenizer):
    from lmwright.models.int8_linear import Int8Linear, quantize_int8
    from lmwright.models.packed_linear import unpack_linears

    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model = _model(tokenizer).to(torch.bfloat16)
    pack_linears(model)
    with torch.inference_mode():
        ref = model(x).logits
    layout = model.lm_head.layout
    assert unpack_linears(model) > 0 and model.lm_head.layout == "dense"
    with torch.inference_mode():
        out = model(x).logits  # oneDNN's packed product was F.linear's bit for bit; the kernel within a bf16 bit
        assert torch.equal(out, ref) if layout == "onednn" else torch.allclose(out, ref, atol=0.05, rtol=0.02)
    q = quantize_int8(_model(tokenizer))
    first = next(m for m in q.modules() if isinstance(m, Int8Linear))
    if first.int8_layout == "tiles":  # lmwright's int8 kernel (AVX512-VNNI CPUs) serves every row count
        assert first.bf16_layout is None and first.bf16 is None and first.max_int8_rows is None
        unpack_linears(q)  # torch.compile's plain layouts: torch's int8 kernel and a dense bf16 copy
        assert first.int8_layout == "plain" and first.bf16 is not None
    else:
        assert first.bf16_layout in ("tiles", "onednn") and first.max_int8_rows == 2
    with torch.inference_mode():
        ref = q(x).logits  # 6 rows: the bf16 path (dense after the unpack above, else tiled / packed)
    bf16_layout = first.bf16_layout
    unpack_linears(q)
    assert first.bf16_layout == "dense" and first.max_int8_rows == 2 and first.int8_layout == "plain"
    with torch.inference_mode():
        out = q(x).logits  # 6 rows: the bf16 path, dense now
        assert torch.equal(out, ref) if bf16_layout != "tiles" else torch.allclose(out, ref, atol=0.05, rtol=0.02)
    model.to(torch.bfloat16)  # an unpacked layer stays dense through conversions
    assert model.lm_head.layout == "dense"


@pytest.mark.slow
def test_compiled_engine_serves_packed_weights(lm_dir):
    """compile=True on a model prepared with packed weights (int8: its bf16 copy is packed): the engine holds them
    dense for inductor, and batches of 3+ rows (int8's other path) compile and decode (they failed to lower)."""
    from lmwright.engine.sampling import SamplingParams
    from lmwright.serve.api import load
    from lmwright.serve.engine import GenerationRequest, LocalEngine

    from .test_engine import PROMPTS

    m = load(lm_dir, name="tiny", weights="int8")
    ids = [m.prompt_ids(p) for p in PROMPTS[:4]]
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])

    def run(eng):
        try:
            streams = [eng.submit(GenerationRequest(i, params)) for i in ids]
            return [[e.token_id for e in s if e.token_id is not None] for s in streams]
        finally:
            eng.shutdown(drain_timeout_s=1)

    compiled = run(LocalEngine(m.model, m.tokenizer, max_seqs=4, compile=True))
    assert all(mod.layout == "dense" for mod in m.model.modules() if isinstance(mod, PackedLinear))
    eager = run(LocalEngine(m.model, m.tokenizer, max_seqs=4))
    # inductor fuses bf16 elementwise chains in fp32 (one rounding instead of one per op): the decoded tokens
    # may part from eager's after a while on this scrambled model; the first (prefill, not compiled) agree
    assert [len(t) for t in compiled] == [8] * 4 and [t[0] for t in compiled] == [t[0] for t in eager]
