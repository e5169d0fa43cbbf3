"""Exporters on every decoder family (tests/families.py, local folders): hf always, with parity and a plain
``from_pretrained`` reload; onnx and gguf where the exporter supports the family, and otherwise a refusal
that names the reason and the format to use instead, before anything is written (never a crash)."""

from __future__ import annotations

import pytest
import torch

from lmwright.export import ExportError, export
from tests.families import FAMILY_NAMES, folder_factory


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory, tokenizer):
    return folder_factory(tmp_path_factory, tokenizer, scramble_std=0.3)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hf_export_reloads_with_the_same_logits(family_folder, tokenizer, tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = family_folder(family)
    res = export(src, tmp_path / "hf", "hf", log=None)
    assert res.parity.ok
    ids = torch.tensor([tokenizer("Once upon a time the little robot")["input_ids"]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _exported_or_refused(src, out, fmt: str, **opts) -> str:
    """'exported' (parity passed) or the refusal message; a failed parity or any other error fails."""
    try:
        res = export(src, out, fmt, log=None, **opts)
    except ExportError as e:
        msg = str(e)
        assert "parity check failed" not in msg, msg
        assert "--format hf" in msg, f"the refusal must name the format that works: {msg}"
        assert not out.exists(), "a refused export must write nothing"
        return msg
    assert res.parity.ok
    return "exported"


GGUF_SUPPORTED = {"llama"}  # llama.cpp's Llama architecture, as gguf_export writes it


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gguf_exports_or_refuses(family_folder, tmp_path, family):
    pytest.importorskip("gguf")
    got = _exported_or_refused(family_folder(family), tmp_path / "g", "gguf", gguf_type="f32")
    assert (got == "exported") == (family in GGUF_SUPPORTED), got  # Llama with Llama-3 rope scaling included
    if family not in GGUF_SUPPORTED:
        assert family in got.replace("gemma3_text", "gemma3"), got


ONNX_REFUSED = {"gemma2", "gemma3"}  # sliding-window + full attention layers (see onnx_export.check)


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in ONNX_REFUSED else pytest.mark.slow)
                                    for f in FAMILY_NAMES])
def test_onnx_exports_or_refuses(family_folder, tmp_path, family):
    """Exports take ~5-10 s each (dynamo tracing): slow, except the refusals, which are instant."""
    pytest.importorskip("onnxruntime")
    got = _exported_or_refused(family_folder(family), tmp_path / "o", "onnx")
    assert (got == "exported") == (family not in ONNX_REFUSED), got
