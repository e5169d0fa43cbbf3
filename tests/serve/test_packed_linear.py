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
    for shape in ((1, 96), (4, 96), (2, 7, 96), (33, 96)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(mod(x), F.linear(x, lin.weight, lin.bias))
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
    from lmwright.serve.api import load

    m = load(lm_dir, name="tiny", weights="bfloat16")
    assert "linear layers packed for oneDNN" in m.weights_note
    assert isinstance(m.model.model.layers[0].mlp.down_proj, PackedLinear)
