"""bf16 linear layers packed for oneDNN when serving on a CPU: the same products as F.linear, the whole model's
logits unchanged, peft layers left alone, conversions still possible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmwright.models.packed_linear import PackedLinear, pack_linears, packing_works

pytestmark = pytest.mark.skipif(not packing_works(torch.bfloat16), reason="this CPU/torch cannot pack bf16 linears")


def _model(tokenizer):
    from lmwright.models import ModelConfig, build_model

    return build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).eval()


def test_packed_linear_equals_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g))
    mod = PackedLinear.from_linear(lin)
    assert mod._packed is not None and mod._packed.is_mkldnn
    for shape in ((4, 96), (2, 7, 96), (33, 96)):  # more than FEW_ROWS rows: the packed product
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(mod(x), F.linear(x, lin.weight, lin.bias))
    for shape in ((1, 96), (3, 96), (1, 1, 96)):  # lmwright's kernel where it runs: fp32 sums in another order
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        y = mod(x)
        assert y.shape == ref.shape and ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 2**-7).all()
        if mod._blocked is None:
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
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref)
    # converting the model back converts the packed layers too (dense, no longer packed)
    model.float()
    assert model.lm_head._packed is None and model.lm_head.weight.dtype == torch.float32
    with torch.inference_mode():
        out = model(x).logits
    assert out.dtype == torch.float32 and torch.allclose(out, ref.float(), atol=0.1, rtol=0.05)
    model.to(torch.bfloat16)  # and packed again
    assert model.lm_head._packed is not None
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref)


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
    assert "linear layers packed for oneDNN" in m.weights_note
    assert isinstance(m.model.model.layers[0].mlp.down_proj, PackedLinear)
    kernel = cpu_kernels.kernels() is not None  # AVX-512 CPUs: few rows through lmwright's bf16 kernel, said so
    assert ("lmwright's bf16 kernel" in m.weights_note) == kernel
    assert (m.model.model.layers[0].mlp.gate_proj._blocked is not None) == kernel  # in 64: a multiple of 32
    assert m.model.model.layers[0].mlp.down_proj._blocked is None  # in 176: not, packed product only


def test_unpack_keeps_products_and_int8_row_limit(tokenizer):
    from lmwright.models.int8_linear import Int8Linear, quantize_int8
    from lmwright.models.packed_linear import unpack_linears

    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model = _model(tokenizer).to(torch.bfloat16)
    pack_linears(model)
    with torch.inference_mode():
        ref = model(x).logits
    assert unpack_linears(model) > 0 and model.lm_head._packed is None
    with torch.inference_mode():
        assert torch.equal(model(x).logits, ref)
    q = quantize_int8(_model(tokenizer))
    first = next(m for m in q.modules() if isinstance(m, Int8Linear))
    if first.int8_layout == "tiles":  # lmwright's int8 kernel (AVX512-VNNI CPUs) serves every row count
        assert first._packed is None and first.bf16 is None and first.max_int8_rows is None
        unpack_linears(q)  # torch.compile's plain layouts: torch's int8 kernel and a dense bf16 copy
        assert first.int8_layout == "plain" and first.bf16 is not None
    else:
        assert first._packed is not None and first.max_int8_rows == 2
    with torch.inference_mode():
        ref = q(x).logits  # 6 rows: the packed bf16 path
    unpack_linears(q)
    assert first._packed is None and first.max_int8_rows == 2 and first.int8_layout == "plain"
    with torch.inference_mode():
        assert torch.equal(q(x).logits, ref)  # 6 rows: the bf16 path, dense now
    model.to(torch.bfloat16)  # an unpacked layer stays dense through conversions
    assert model.lm_head._packed is None


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
    assert all(mod._packed is None for mod in m.model.modules() if hasattr(mod, "_packed"))
    eager = run(LocalEngine(m.model, m.tokenizer, max_seqs=4))
    # inductor fuses bf16 elementwise chains in fp32 (one rounding instead of one per op): the decoded tokens
    # may part from eager's after a while on this scrambled model; the first (prefill, not compiled) agree
    assert [len(t) for t in compiled] == [8] * 4 and [t[0] for t in compiled] == [t[0] for t in eager]
