"""Issue 13, serving: bad values get a 400 naming the field, timeouts a 504 the openai client does not
retry, huge prompts do not block the event loop, embeddings are bounded, keyless servers refuse foreign
Hosts/Origins and non-JSON bodies."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lmwright.serve.http import ServeConfig

from .conftest import running_server
from .test_http_faults import SlowLM, _is_error, _msg

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("extra,field", [
    ({"seed": 2**64}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 5000}, "stop"),
])
def test_out_of_range_sampling_values_are_400(server, extra, field):
    url, _ = server
    r = httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 3, "temperature": 1.0,
                                     **extra}, timeout=30)
    _is_error(r, 400)
    assert field in r.json()["error"]["message"]
    ok = httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 3, "seed": 2**63 - 1,
                                      "stop": ["a", "b", "c", "d"]}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_deeply_nested_json_is_400(server):
    url, _ = server
    for depth in (100, 100_000):
        body = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + \
            "[" * depth + "]" * depth + "}"
        r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
        _is_error(r, 400, "invalid_json")
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_timeout_is_504_not_retried(lm):
    from lmwright.serve.engine import LocalEngine

    eng = LocalEngine(SlowLM(lm.model), lm.tokenizer, max_seqs=2)
    with running_server({"tiny": eng}, ServeConfig(timeout_s=0.2)) as (url, _):
        r = httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 200, "stop": [],
                                         "ignore_eos": True},  # a sampled EOS must not end it before the timeout
                       timeout=30)
        _is_error(r, 504, "timeout")
        assert r.headers.get("x-should-retry") == "false"


@pytest.mark.parametrize("t", [0, -1.0])
def test_nonpositive_timeout_is_refused(lm, t):
    from lmwright.config import ConfigError
    from lmwright.serve.http import create_app

    with pytest.raises(ConfigError, match="timeout_s"):
        create_app({"tiny": lm}, ServeConfig(timeout_s=t))


def test_prompt_rendering_does_not_block_health(server, monkeypatch):
    import lmwright.data.chat as chat

    real = chat.render_prompt_ids

    def slow(tokenizer, messages, *a, **kw):  # a huge prompt: seconds of template + tokenizer work
        time.sleep(3)
        return real(tokenizer, messages, *a, **kw)

    monkeypatch.setattr(chat, "render_prompt_ids", slow)
    url, _ = server
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 2}, timeout=30)))
    t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - t0 < 1.5
    t.join(timeout=30)
    assert out["r"].status_code == 200


class SlowEmbedder:
    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.task = inner.task

    def embed(self, texts):
        time.sleep(self.seconds)
        return self.inner.embed(texts)

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)


def test_embeddings_batch_cap_and_concurrency(embedder):
    cfg = ServeConfig(max_embedding_inputs=4, embedding_concurrency=1, queue_size=0)
    with running_server({"embedder": SlowEmbedder(embedder, 1.5)}, cfg) as (url, _):
        _is_error(httpx.post(url + "/v1/embeddings", json={"model": "embedder", "input": ["x"] * 5}, timeout=30),
                  400, "too_many_inputs")
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
            url + "/v1/embeddings", json={"model": "embedder", "input": ["a", "b"]}, timeout=30)))
        t.start()
        time.sleep(0.5)
        _is_error(httpx.post(url + "/v1/embeddings", json={"model": "embedder", "input": "c"}, timeout=30),
                  429, "rate_limit_exceeded")
        t.join(timeout=30)
        assert out["r"].status_code == 200 and len(out["r"].json()["data"]) == 2


def test_keyless_server_refuses_cross_site_and_rebinding(server):
    url, _ = server
    body = json.dumps({"model": "tiny", "messages": _msg(), "max_tokens": 2})
    # a cross-site form/fetch without preflight: text/plain
    _is_error(httpx.post(url + CHAT, content=body, headers={"content-type": "text/plain"}, timeout=30),
              415, "unsupported_media_type")
    _is_error(httpx.post(url + CHAT, content=body, timeout=30), 415, "unsupported_media_type")
    # a page on another site (or one rebound to 127.0.0.1) calling the API
    _is_error(httpx.post(url + CHAT, json=json.loads(body), headers={"origin": "https://evil.example"}, timeout=30),
              403, "origin_not_allowed")
    _is_error(httpx.post(url + CHAT, json=json.loads(body), headers={"origin": "null"}, timeout=30),
              403, "origin_not_allowed")
    _is_error(httpx.get(url + "/v1/models", headers={"host": "evil.example:8000"}, timeout=30),
              403, "host_not_allowed")
    # this machine's own pages and tools still work
    ok = httpx.post(url + CHAT, json=json.loads(body), headers={"origin": "http://localhost:3000"}, timeout=30)
    assert ok.status_code == 200, ok.text
    r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json; charset=utf-8"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/v1/models", headers={"host": "localhost"}, timeout=30).status_code == 200


def test_allowed_hosts_and_origins_and_keyed_servers(lm):
    cfg = ServeConfig(allowed_hosts=["api.internal"], allowed_origins=["https://app.example"])
    with running_server({"tiny": lm}, cfg) as (url, _):
        assert httpx.get(url + "/v1/models", headers={"host": "api.internal:8000"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"origin": "https://app.example"}).status_code == 200
        _is_error(httpx.get(url + "/v1/models", headers={"origin": "https://other.example"}), 403)
    with running_server({"tiny": lm}, ServeConfig(api_key="k")) as (url, _):  # the key is the guard
        r = httpx.get(url + "/v1/models", headers={"host": "api.example", "origin": "https://app.example",
                                                    "authorization": "Bearer k"})
        assert r.status_code == 200


def test_cli_flags_reach_serve_config():
    import argparse

    from lmwright.cli.serve import _overrides, register
    from lmwright.config import load_config

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    args = ap.parse_args(["serve", "--model", "m", "--allowed-host", "a.example", "--allowed-host", "b.example",
                          "--allowed-origin", "https://app.example"])
    cfg = load_config(ServeConfig, [], _overrides(args))
    assert cfg.allowed_hosts == ["a.example", "b.example"] and cfg.allowed_origins == ["https://app.example"]
