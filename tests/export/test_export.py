"""Exporters: hf (plain and merged adapters), onnx (KV cache, classifier), gguf (f32/f16/q8_0), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmwright.export import ExportError, export

PROMPT = "Once upon a time the little robot"


def _ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _nonzero_lora(model) -> None:
    """peft initialises lora_B to zero (adapter == base); make the update real."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    from lmwright.models import ModelConfig, build_model

    d = tmp_path_factory.mktemp("base")
    build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base_model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


# ------------------------------------------------------------------------------------------- hf
def test_hf_causal_lm(base_dir, base_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    res = export(base_dir, tmp_path / "hf", "hf", log=None)
    assert res.parity.ok
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(m, ids), _logits(base_model, ids), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template == tokenizer.chat_template
    gc = GenerationConfig.from_pretrained(tmp_path / "hf")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {im_end, tokenizer.eos_token_id} <= set(gc.eos_token_id) and gc.pad_token_id == tokenizer.pad_token_id


def test_hf_classifier(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmwright.models import ModelConfig, build_model

    id2label = {0: "neg", 1: "neu", 2: "pos"}
    src = build_model(ModelConfig(name="llama-tiny"), task="classification", tokenizer=tokenizer, num_labels=3,
                      id2label=id2label, seed=0).eval()
    src.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out", "hf", log=None)
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(m, ids), _logits(src, ids), atol=1e-4, rtol=0)
    assert m.config.id2label == id2label
    assert json.loads((tmp_path / "out" / "lmwright.json").read_text())["task"] == "classification"


def test_hf_merges_peft_lora(base_dir, base_model, tokenizer, tmp_path):
    """A plain peft LoRA folder pointing at a saved base: export hf == the adapter model, != the base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _nonzero_lora(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    res = export(tmp_path / "adapter", tmp_path / "merged", "hf", log=None)
    assert res.parity.ok and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), atol=1e-4, rtol=0)
    assert (_logits(merged, ids) - _logits(base_model, ids)).abs().max() > 1e-2


def test_lmwright_lora_loads_in_plain_peft(base_dir, tokenizer, tmp_path):
    """An adapter saved by lmwright is a standard peft folder: PeftModel.from_pretrained gives our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmwright.methods import MethodConfig, apply_method, save_trained

    cfg = MethodConfig(name="lora", r=4, dropout=0.0)
    ours = apply_method(AutoModelForCausalLM.from_pretrained(base_dir), cfg, "causal-lm")
    _nonzero_lora(ours)
    ours.eval()
    save_trained(ours, cfg, tmp_path / "run_final", tokenizer=tokenizer, base_path=base_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "run_final").eval()
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(plain, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    res = export(tmp_path / "run_final", tmp_path / "merged", "hf", log=None)  # and it merges
    assert res.parity.ok


def test_non_mergeable_method_refused(base_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmwright.methods import MethodConfig, apply_method, save_trained

    cfg = MethodConfig(name="prompt", num_virtual_tokens=4)
    model = apply_method(AutoModelForCausalLM.from_pretrained(base_dir), cfg, "causal-lm")
    save_trained(model, cfg, tmp_path / "prompt", tokenizer=tokenizer, base_path=base_dir)
    with pytest.raises(ExportError, match="cannot be merged"):
        export(tmp_path / "prompt", tmp_path / "out", "hf", log=None)
    assert not (tmp_path / "out").exists()


def test_qlora_merges_onto_dequantized_base(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lmwright.methods import MethodConfig, apply_method, save_trained
    from lmwright.models import ModelConfig, build_model, load_model

    # bitsandbytes' CPU 4-bit kernel packs output rows in blocks of 32: llama-tiny's 176-wide MLP cannot
    base_dir = tmp_path / "base"
    build_model(ModelConfig(name="llama-tiny", overrides={"intermediate_size": 192}), tokenizer=tokenizer,
                seed=0).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    q = load_model(base_dir, model_cfg=ModelConfig(name=str(base_dir), quantize="nf4", dtype="float32"))
    cfg = MethodConfig(name="lora", r=4, dropout=0.0)
    model = apply_method(q, cfg, "causal-lm")
    _nonzero_lora(model)
    save_trained(model, cfg, tmp_path / "qlora", tokenizer=tokenizer, base_path=base_dir)
    res = export(tmp_path / "qlora", tmp_path / "merged", "hf", log=None)
    assert res.parity.ok
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32 and getattr(merged.config, "quantization_config", None) is None


# ------------------------------------------------------------------------------------------- onnx
def test_onnx_causal_lm_kv_cache(base_dir, base_model, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from lmwright.export.onnx_runtime import OnnxGenerator, generate_onnx

    res = export(base_dir, tmp_path / "onnx", "onnx", log=None)
    assert res.parity.ok
    gen = OnnxGenerator(tmp_path / "onnx")
    prompt = tokenizer(PROMPT)["input_ids"]
    new, step_logits = gen.greedy_with_logits(prompt, 8)  # one token per step through the KV cache
    full = _logits(base_model, torch.tensor([prompt + new]))[0]  # (T, V) in one pass, no cache
    want = full[len(prompt) - 1: len(prompt) - 1 + len(new)].numpy()
    assert abs(step_logits - want).max() < 1e-3
    assert new == [int(t) for t in want.argmax(-1)]
    text = generate_onnx(tmp_path / "onnx", "Hello", max_tokens=5, temperature=0.7, top_p=0.9, seed=0, chat=True)
    assert isinstance(text, str)


def test_onnx_bert_classifier(tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from lmwright.export.onnx_runtime import OnnxModel
    from lmwright.models import ModelConfig, build_model

    src = build_model(ModelConfig(name="bert-tiny"), task="classification", tokenizer=tokenizer, num_labels=2,
                      seed=0).eval()
    src.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    res = export(tmp_path / "bert", tmp_path / "onnx", "onnx", log=None)
    assert res.parity.ok
    m = OnnxModel(tmp_path / "onnx")
    ids = _ids(tokenizer)
    assert abs(m.run(ids[0].tolist()) - _logits(src, ids)[0].numpy()).max() < 1e-3


# ------------------------------------------------------------------------------------------- gguf
def test_gguf_f32_weights_and_metadata(base_dir, base_model, tokenizer, tmp_path):
    pytest.importorskip("gguf")
    from lmwright.export.gguf_export import REQUIRED_KEYS, hf_name, read_gguf, unpermute

    export(base_dir, tmp_path / "g", "gguf", gguf_type="f32", log=None)
    meta, tensors = read_gguf(tmp_path / "g" / "model.gguf")
    cfg = base_model.config
    assert all(meta.get(k) is not None for k in REQUIRED_KEYS)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg.num_hidden_layers and meta["llama.embedding_length"] == cfg.hidden_size
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == cfg.max_position_embeddings
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert "blk.0.attn_q.weight" in tensors and "output.weight" not in tensors  # tied head
    state = base_model.state_dict()
    for g, (arr, _) in tensors.items():
        name = hf_name(g)
        if "q_proj" in name:
            arr = unpermute(arr, 4)
        elif "k_proj" in name:
            arr = unpermute(arr, 4, 2)
        assert torch.equal(torch.from_numpy(arr.copy()), state[name]), name
    # the stored q rows are really permuted (llama.cpp's rotary layout), not the HF layout
    raw_q = tensors["blk.0.attn_q.weight"][0]
    assert not torch.equal(torch.from_numpy(raw_q.copy()), state["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("gtype, rtol", [("f16", 1e-3), ("q8_0", 1e-2)])
def test_gguf_quantized_within_tolerance(base_dir, base_model, tmp_path, gtype, rtol):
    pytest.importorskip("gguf")
    from lmwright.export.gguf_export import hf_name, read_gguf, unpermute

    res = export(base_dir, tmp_path / "g", "gguf", gguf_type=gtype, log=None)
    assert res.parity.ok
    _, tensors = read_gguf(tmp_path / "g" / "model.gguf")
    state = base_model.state_dict()
    types = set()
    for g, (arr, ttype) in tensors.items():
        name = hf_name(g)
        arr = unpermute(arr, 4) if "q_proj" in name else unpermute(arr, 4, 2) if "k_proj" in name else arr
        want = state[name].numpy()
        assert abs(arr - want).max() <= rtol * abs(want).max(), name
        types.add(ttype)
    assert gtype in types and "f32" in types  # matrices quantized, norms kept in f32


# ------------------------------------------------------------------------------------------- bad input
def test_encoder_decoder_to_gguf_refused(tokenizer, tmp_path):
    from lmwright.models import ModelConfig, build_model

    build_model(ModelConfig(name="t5-tiny"), task="seq2seq", tokenizer=tokenizer, seed=0).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    with pytest.raises(ExportError, match="encoder-decoder"):
        export(tmp_path / "t5", tmp_path / "out", "gguf", log=None)
    assert not (tmp_path / "out").exists()


def test_existing_output_refused(base_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        export(base_dir, out, "hf", log=None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(base_dir, out, "hf", overwrite=True, log=None)
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_missing_tokenizer_refused(base_model, tmp_path):
    base_model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(ExportError, match="no tokenizer"):
        export(tmp_path / "no_tok", tmp_path / "out", "hf", log=None)
    assert not (tmp_path / "out").exists()


def test_failed_parity_leaves_nothing(base_dir, tmp_path, monkeypatch):
    from lmwright.export.hf import HFExporter

    real_write = HFExporter.write

    def corrupting_write(self, src, out_dir, opts):
        real_write(self, src, out_dir, opts)
        from safetensors.torch import load_file, save_file

        f = Path(out_dir) / "model.safetensors"
        state = load_file(f)
        state["model.norm.weight"] = state["model.norm.weight"] * 3  # a broken export
        save_file(state, f, metadata={"format": "pt"})

    monkeypatch.setattr(HFExporter, "write", corrupting_write)
    with pytest.raises(ExportError, match="parity check failed"):
        export(base_dir, tmp_path / "out", "hf", log=None)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_cli(base_dir, tmp_path, capsys):
    from lmwright.cli import main

    assert main(["export", "merge", "--model", str(base_dir), "--to", str(tmp_path / "m")]) == 0
    assert "parity [hf]: PASSED" in capsys.readouterr().out
    assert main(["export", "--model", str(base_dir), "--to", str(tmp_path / "m"), "--format", "gguf"]) == 2
    assert "--overwrite" in capsys.readouterr().err
