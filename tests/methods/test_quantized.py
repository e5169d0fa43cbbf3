"""QLoRA (bitsandbytes nf4 base + lora) and QAT (torchao fake-quant training + convert) on CPU."""

from __future__ import annotations

import pytest
import torch

from lmwright.methods import (
    MethodConfig,
    apply_method,
    load_trained,
    merge_trained,
    quantized_base_memory,
    save_trained,
)

pytest.importorskip("bitsandbytes")


def _batch(vocab: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _nf4_base(tokenizer, folder, arch: dict):
    """(nf4 model loaded from a saved float preset, fp16 size of the float model in bytes)."""
    from lmwright.models import ModelConfig, build_model, load_model

    float_model = build_model(ModelConfig(name="llama-tiny", overrides=arch, dtype="float32"), task="causal-lm",
                              tokenizer=tokenizer, seed=0)
    fp16_bytes = sum(p.numel() for p in float_model.parameters()) * 2
    float_model.save_pretrained(folder)
    return load_model(folder, task="causal-lm",
                      model_cfg=ModelConfig(name=str(folder), quantize="nf4", dtype="float32")), fp16_bytes


def test_qlora_base_memory_is_under_a_third_of_fp16(tokenizer, tmp_path):
    # big enough that the unquantized embedding does not dominate: ~18M linear weights, 0.26M embedding
    arch = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 2}
    base, fp16_bytes = _nf4_base(tokenizer, tmp_path / "base", arch)
    model = apply_method(base, MethodConfig(name="lora", r=8), "causal-lm")
    mem = quantized_base_memory(model)
    assert mem <= 0.3 * fp16_bytes, f"nf4 base uses {mem / fp16_bytes:.2f}x the fp16 size"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_trains_saves_and_merges_onto_the_dequantized_base(tokenizer, tmp_path, method):
    from lmwright.methods.peft_methods import is_quantized

    arch = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    base, _ = _nf4_base(tokenizer, tmp_path / "base", arch)
    assert is_quantized(base)
    model = apply_method(base, MethodConfig(name=method, r=8, alpha=16, dropout=0.0), "causal-lm")
    batch = _batch(len(tokenizer))
    before_eval = _logits(model, batch)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    assert any(not torch.equal(v, params[n].detach()) for n, v in lora.items())

    unmerged = _logits(model, batch)
    assert not torch.allclose(unmerged, before_eval)
    save_trained(model, MethodConfig(name=method), tmp_path / "out", tokenizer=tokenizer,
                 base_path=tmp_path / "base", task="causal-lm")
    merged = merge_trained(model, MethodConfig(name=method))  # consumes the model: done last
    assert not is_quantized(merged)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=1e-4, rtol=1e-4)

    # the adapter folder reloads onto the same nf4 base (lmwright.json records the quantization)
    loaded, _ = load_trained(tmp_path / "out")
    assert is_quantized(loaded.get_base_model())
    torch.testing.assert_close(_logits(loaded, batch), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_undoes_the_bnb_cpu_repacked_layout(tokenizer, tmp_path):
    """A 4-bit layer repacked for bitsandbytes' CPU kernel must still dequantize right when merging."""
    from lmwright.methods.peft_methods import dequantize_base

    arch = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    base, _ = _nf4_base(tokenizer, tmp_path / "base", arch)
    q = base.model.layers[0].mlp.up_proj
    if not q.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks")
    x = torch.randn(3, 128)
    with torch.no_grad():
        q.eval()
        packed_out = q(x)  # repacks
    assert q.weight.quant_state.packing_format_for_cpu
    dequantize_base(base)
    lin = base.model.layers[0].mlp.up_proj
    assert isinstance(lin, torch.nn.Linear)
    torch.testing.assert_close(lin(x).detach(), packed_out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_fake_quant_trains_and_converts(tokenizer, tmp_path, bits):
    pytest.importorskip("torchao")
    from lmwright.methods import get_method
    from lmwright.methods.qat import convert, fake_quantized_layers, quantize_for_eval
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny", dtype="float32"), task="causal-lm", tokenizer=tokenizer,
                        seed=0)
    batch = _batch(len(tokenizer))
    float_logits = _logits(model, batch)
    model = apply_method(model, MethodConfig(name="qat", qat_bits=bits, qat_group_size=32), "causal-lm")
    # 7 Linear per block x 2 blocks, minus down_proj (176 inputs: not a multiple of the group); lm_head stays float
    assert fake_quantized_layers(model) == 12
    fake_logits = _logits(model, batch)
    assert not torch.equal(fake_logits, float_logits), "fake quantization is not active"
    rel = (fake_logits - float_logits).abs().mean() / float_logits.abs().mean()
    assert rel < (0.02 if bits == 8 else 0.3)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    model(**batch).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None  # straight-through gradient
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight.detach())

    trained_fake = _logits(model, batch)
    out = save_trained(model, MethodConfig(name="qat", qat_bits=bits), tmp_path / "out", tokenizer=tokenizer)
    assert (out / "model.safetensors").exists() and (out / "qat.json").exists()
    quantized = convert(model)  # in place: fake-quant layers -> real int weights
    assert fake_quantized_layers(quantized) == 0
    w = quantized.model.layers[0].mlp.up_proj.weight
    assert type(w).__name__ != "Parameter" and "Tensor" in type(w).__name__  # a torchao quantized tensor
    q_logits = _logits(quantized, batch)
    # QAT's promise: the converted model computes what training saw
    torch.testing.assert_close(q_logits, trained_fake, atol=2e-3, rtol=2e-3)

    # the saved float folder, quantized for evaluation, gives the same quantized model
    loaded, _ = load_trained(out)
    torch.testing.assert_close(_logits(quantize_for_eval(loaded, folder=out), batch), q_logits,
                               atol=1e-4, rtol=1e-4)
    assert get_method("qat").merges


def test_quantize_embeddings_takes_the_whole_base_under_0_3x_fp16_and_trains_saves_merges(tokenizer, tmp_path):
    """model.quantize_embeddings: the tied embedding/head is one 4-bit tensor; QLoRA on it trains, saves,
    reloads and merges onto a float32 model with the tie restored."""
    import bitsandbytes as bnb

    from lmwright.config import ConfigError
    from lmwright.methods.peft_methods import disable_bnb_cpu_repack
    from lmwright.models import ModelConfig, load_model

    # the vocabulary matrix (512 x 256) is 0.1 of the weights: nf4 linears alone stay above 0.3x fp16
    arch = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    base, fp16_bytes = _nf4_base(tokenizer, tmp_path / "base", arch)

    def load(dtype: str, embeddings: bool):
        cfg = ModelConfig(name=str(tmp_path / "base"), quantize="nf4", dtype=dtype, quantize_embeddings=embeddings)
        cfg.check()
        return load_model(tmp_path / "base", task="causal-lm", model_cfg=cfg)

    linears_only, mem = quantized_base_memory(load("float16", False)), quantized_base_memory(load("float16", True))
    assert linears_only > 0.3 * fp16_bytes >= mem, (linears_only / fp16_bytes, mem / fp16_bytes)
    q = disable_bnb_cpu_repack(load("float32", True))  # eval below must not repack the blocks for bf16
    emb, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert isinstance(emb, bnb.nn.Embedding4bit) and isinstance(head, bnb.nn.Linear4bit)
    assert head.weight is emb.weight  # tied: one 4-bit tensor
    batch = _batch(len(tokenizer))
    rel = (_logits(q, batch) - _logits(base, batch)).abs().mean() / _logits(base, batch).abs().mean()
    assert 0 < rel < 0.2  # a 4-bit vocabulary: close to the linears-only load, not equal

    model = apply_method(q, MethodConfig(name="lora", r=8), "causal-lm")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    unmerged = _logits(model, batch)
    save_trained(model, MethodConfig(name="lora"), tmp_path / "out", tokenizer=tokenizer,
                 base_path=tmp_path / "base", task="causal-lm")
    loaded, _ = load_trained(tmp_path / "out")
    assert isinstance(loaded.get_base_model().get_input_embeddings(), bnb.nn.Embedding4bit)
    torch.testing.assert_close(_logits(loaded, batch), unmerged, atol=1e-5, rtol=1e-5)
    merged = merge_trained(model, MethodConfig(name="lora"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="quantize_embeddings"):
        ModelConfig(name="llama-tiny", quantize="int8", quantize_embeddings=True).check()
