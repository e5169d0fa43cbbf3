"""llama.cpp itself (the ``xllamacpp`` wheel: prebuilt llama.cpp with a Python API) on lmwright's GGUF export of a
tiny model built here: its tokenizer gives the ids lmwright's gives (plain text and the rendered chat prompt, its
own template rendering included) and its greedy tokens equal lmwright's for a few prompts. Skipped without
xllamacpp (``pip install xllamacpp``).

The model is llama-tiny taught for a few seconds to continue a counting sequence: a freshly initialised one
repeats a single token whatever the prompt, which would make "same greedy tokens" say little."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

xllamacpp = pytest.importorskip("xllamacpp", reason="xllamacpp not installed: llama.cpp itself not checked")
pytest.importorskip("gguf")

TEXTS = ("Once upon a time the little robot", "The cat sat on the mat.", "  two  spaces\n\nand 12345 digits")
COUNTING = "one two three four five six seven eight nine ten"
GREEDY_PROMPTS = ("one two three", "five six seven eight", "nine ten one two three four", "Once upon a time")
CHAT = [{"role": "user", "content": "Tell me a story about a robot."}]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """(source folder, f16 GGUF file): llama-tiny with its weights already f16-representable, so the file holds the
    same numbers the fp32 model computes with and only llama.cpp's own activation rounding differs."""
    from lmwright.export import export
    from lmwright.models import ModelConfig, build_model

    root = tmp_path_factory.mktemp("llama-cpp")
    model = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    x = torch.tensor([tokenizer(" ".join([COUNTING] * 12))["input_ids"][:160]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(50):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    export(root / "src", root / "gguf", "gguf", gguf_type="f16", log=None)
    return root / "src", root / "gguf" / "model.gguf"


@pytest.fixture(scope="module")
def server(exported):
    p = xllamacpp.CommonParams()
    p.model.path = str(exported[1])
    p.n_ctx = 256
    p.n_parallel = 1
    p.cpuparams.n_threads = 1
    p.cpuparams_batch.n_threads = 1
    p.warmup = False
    s = xllamacpp.Server(p)
    yield s
    del s


def _post(server, path: str, body: dict) -> dict:
    """llama.cpp's own HTTP endpoints (tokenize, apply-template), served by the in-process server on 127.0.0.1."""
    req = urllib.request.Request(server.listening_address + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _llama_cpp_greedy(server, ids: list[int]) -> list[int]:
    r = server.handle_completions({"prompt": list(ids), "max_tokens": NEW_TOKENS, "temperature": 0.0,
                                   "ignore_eos": True, "cache_prompt": False, "logprobs": 1})
    return [t["id"] for t in r["choices"][0]["logprobs"]["content"]]


def _prompts(tokenizer) -> list[list[int]]:
    from lmwright.data.chat import render_prompt_ids

    return [list(tokenizer(t)["input_ids"]) for t in GREEDY_PROMPTS] + [render_prompt_ids(tokenizer, CHAT)]


def test_llama_cpp_tokenizer_and_template_give_lmwrights_ids(exported, server, tokenizer):
    from lmwright.data.chat import render_prompt_ids

    for t in TEXTS:
        got = _post(server, "/tokenize", {"content": t, "add_special": False, "parse_special": True})["tokens"]
        assert got == tokenizer(t, add_special_tokens=False)["input_ids"], t
    # a chat as llama.cpp's chat endpoint feeds it: the file's template rendered by llama.cpp (which drops a
    # leading BOS string), then tokenized with special tokens (which adds the BOS back from add_bos_token)
    want = render_prompt_ids(tokenizer, CHAT)
    text = _post(server, "/apply-template", {"messages": CHAT})["prompt"]
    got = _post(server, "/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]
    assert got == want
    r = server.handle_chat_completions({"messages": CHAT, "max_tokens": 1, "temperature": 0.0})
    assert r["usage"]["prompt_tokens"] == len(want)


def test_llama_cpp_greedy_tokens_equal_lmwrights(exported, server, tokenizer):
    from lmwright.serve.api import load
    from lmwright.serve.generation import SamplingParams

    lm = load(exported[0])
    said: set[int] = set()
    for ids in _prompts(tokenizer):
        want = lm._run(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[])).token_ids
        assert len(want) == NEW_TOKENS
        assert _llama_cpp_greedy(server, ids) == want, tokenizer.decode(ids)
        said |= set(want)
    assert len(said) >= 6, said  # the prompts lead somewhere different: the agreement means something
    # llama.cpp's own chat path (its template + tokenizer + model) answers what lmwright answers the same chat
    want = lm._run(lm.chat_ids(CHAT), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[]))
    r = server.handle_chat_completions({"messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                                        "ignore_eos": True, "logprobs": True})
    assert [t["id"] for t in r["choices"][0]["logprobs"]["content"]] == want.token_ids
