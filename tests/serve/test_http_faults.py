"""Bad input gets 4xx in OpenAI's error shape; overload gets 429; disconnects free slots; shutdown is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from lmwright.serve.http import ServeConfig

from .conftest import free_port, running_server

CHAT = "/v1/chat/completions"


def _msg(content="Hi"):
    return [{"role": "user", "content": content}]


def _is_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("payload,status,code", [
    ("{not json", 400, "invalid_json"),
    ({"model": "nope", "messages": _msg()}, 404, "model_not_found"),
    ({"model": "tiny", "messages": _msg(), "max_tokens": -5}, 400, None),
    ({"model": "tiny", "messages": _msg(), "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ({"model": "tiny", "messages": _msg("word " * 400), "max_tokens": 5}, 400, "context_length_exceeded"),
    ({"model": "tiny", "messages": _msg(), "bogus_field": 1}, 400, "unknown_field"),
    ({"model": "tiny", "messages": []}, 400, None),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": "tiny", "messages": _msg(), "temperature": -1}, 400, None),
    ({"model": "tiny", "messages": _msg(), "n": 0}, 400, None),
    ([1, 2, 3], 400, "invalid_json"),
])
def test_malformed_chat_requests(server, payload, status, code):
    url, _ = server
    body = payload if isinstance(payload, str) else json.dumps(payload)
    r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=10)
    _is_error(r, status, code)


def test_ignored_openai_fields_are_accepted(server):
    url, _ = server
    r = httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 2, "frequency_penalty": 0.5,
                                     "user": "u1", "presence_penalty": 0}, timeout=10)
    assert r.status_code == 200, r.text


def test_embeddings_errors(server):
    url, _ = server
    _is_error(httpx.post(url + "/v1/embeddings", json={"model": "tiny2", "input": "x"}), 404, "model_not_found")
    _is_error(httpx.post(url + "/v1/embeddings", json={"model": "embedder", "input": []}), 400)
    _is_error(httpx.post(url + CHAT, json={"model": "embedder", "messages": _msg()}), 400, "model_not_generative")


def test_metrics_and_health(server):
    url, _ = server
    httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 3, "stream": True}, timeout=10)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    assert 'lmwright_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "lmwright_time_to_first_token_seconds_bucket" in text
    assert 'lmwright_queue_depth{model="tiny"} 0' in text
    completion = [ln for ln in text.splitlines() if ln.startswith('lmwright_tokens_total{kind="completion"}')]
    assert int(completion[0].split()[-1]) > 0


def test_api_key_and_size_limit(lm):
    cfg = ServeConfig(api_key="s3cret", max_request_bytes=2000)
    with running_server({"tiny": lm}, cfg) as (url, _):
        _is_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
        assert httpx.get(url + "/health").status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        big = {"model": "tiny", "messages": _msg("x" * 5000)}
        _is_error(httpx.post(url + CHAT, json=big, headers=auth), 413, "request_too_large")


def test_non_loopback_needs_key(lm, monkeypatch):
    from lmwright.config import ConfigError
    from lmwright.serve.http import resolve_api_key

    monkeypatch.delenv("LMWRIGHT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="api-key"):
        resolve_api_key(ServeConfig(host="0.0.0.0"))
    monkeypatch.setenv("LMWRIGHT_API_KEY", "k")
    assert resolve_api_key(ServeConfig(host="0.0.0.0")) == "k"


def _stream_lines(client, url, payload):
    return client.stream("POST", url + CHAT, json=payload, timeout=30)


class SlowLM:
    """The tiny model at 20 ms a step, so a 'long' request stays in flight however fast the machine is."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **kw):
        time.sleep(0.02)
        return self.model(**kw)


def test_disconnect_frees_slot_and_queue_overflow_429(lm):
    from lmwright.serve.engine import LocalEngine

    eng = LocalEngine(SlowLM(lm.model), lm.tokenizer, max_seqs=1, queue_size=1)
    with running_server({"tiny": eng}) as (url, app):
        long = {"model": "tiny", "messages": _msg(), "max_tokens": 200, "stream": True,
                "temperature": 1.0, "stop": [], "ignore_eos": True}  # no sampled EOS ends it early
        with httpx.Client() as c1, httpx.Client() as c2:
            with _stream_lines(c1, url, long) as r1:
                it = r1.iter_lines()
                assert next(it).startswith("data:")
                with _stream_lines(c2, url, long) as r2:  # waits in the queue
                    assert r2.status_code == 200
                    deadline = time.time() + 5
                    while eng.stats()["queue_depth"] < 1 and time.time() < deadline:
                        time.sleep(0.01)
                    r3 = httpx.post(url + CHAT, json={**long, "stream": False}, timeout=10)
                    _is_error(r3, 429, "rate_limit_exceeded")
                # r2 closed before its turn; r1 closed mid-stream: both must leave the engine
        deadline = time.time() + 10
        while (eng.stats()["active_sequences"] or eng.stats()["queue_depth"]) and time.time() < deadline:
            time.sleep(0.05)
        assert eng.stats()["active_sequences"] == 0 and eng.stats()["queue_depth"] == 0
        # both ended by the disconnect: the running one (which had ~4 s of decoding left) and the queued one
        assert eng.stats()["cancelled"] == 2
        ok = httpx.post(url + CHAT, json={"model": "tiny", "messages": _msg(), "max_tokens": 3}, timeout=10)
        assert ok.status_code == 200


class ScriptedLM:
    """A stand-in causal LM that says a known script: the token after position p is ``script[p - start]``
    (then ``end``). Streaming of multi-byte characters is thus checked on real Chinese text."""

    def __new__(cls, script: list[int], start: int, end: int, vocab: int):
        import torch

        class _M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.config = SimpleNamespace(max_position_embeddings=256)

            def forward(self, input_ids, position_ids, past_key_values=None, **kw):
                b, t = input_ids.shape
                logits = torch.zeros(b, t, vocab)
                for i in range(b):
                    for j in range(t):
                        k = int(position_ids[i, j]) - start
                        logits[i, j, script[k] if 0 <= k < len(script) else end] = 10.0
                past_key_values.update(torch.zeros(b, 1, t, 1), torch.zeros(b, 1, t, 1), 0)
                return SimpleNamespace(logits=logits, past_key_values=past_key_values)

        return _M().eval()


def test_chinese_streams_whole_characters(tokenizer):
    from lmwright.data.chat import render_prompt_ids
    from lmwright.serve.engine import LocalEngine

    text = "小猫在花园里玩耍。"
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = _msg("讲个故事")
    prompt = render_prompt_ids(tokenizer, messages)
    assert len(script) > len(text)  # some characters span several byte-level tokens
    model = ScriptedLM(script, len(prompt) - 1, tokenizer.convert_tokens_to_ids("<|im_end|>"), len(tokenizer))
    eng = LocalEngine(model, tokenizer, max_seqs=2)
    with running_server({"story": eng}) as (url, _):
        deltas = []
        with httpx.stream("POST", url + CHAT, json={"model": "story", "messages": messages, "stream": True,
                                                    "temperature": 0}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])
                    if ch["choices"]:
                        deltas.append((ch["choices"][0]["delta"].get("content"), ch["choices"][0]["finish_reason"]))
    pieces = [d for d, _ in deltas if d]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3  # streamed piece by piece, not in one go
    assert deltas[-1][1] == "stop"


def _check_finished(lines):
    assert lines and lines[-1] == "data: [DONE]"
    finishes = [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in lines[:-1] if json.loads(ln[6:])["choices"]]
    assert finishes[-1] in ("stop", "length")


def test_graceful_shutdown_under_load_in_process(lm):
    """Shutdown requested with streams in flight: every stream still ends with a finish_reason and [DONE]."""
    import uvicorn

    from lmwright.serve.http import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app({"tiny": lm}, ServeConfig(max_seqs=4)), host="127.0.0.1",
                                           port=port, log_level="warning", timeout_graceful_shutdown=20))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    results: list = [None] * 3
    started = threading.Barrier(4)

    def client(k):
        lines = []
        with httpx.stream("POST", url + CHAT, json={"model": "tiny", "messages": _msg(f"story {k}"),
                                                    "max_tokens": 80, "stream": True, "stop": []}, timeout=30) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 0:
                    started.wait()
                if line:
                    lines.append(line)
        results[k] = lines

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    started.wait(timeout=30)
    server.should_exit = True  # what uvicorn's SIGTERM/SIGINT handler does
    for th in threads:
        th.join(timeout=30)
    t.join(timeout=30)
    assert not t.is_alive()
    for lines in results:
        _check_finished(lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_graceful_shutdown_under_load(lm_dir):
    """SIGTERM to `lmwright serve` with streams in flight: every stream finishes, the process exits 0."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmwright.cli", "serve", "--model", str(lm_dir), "--name", "tiny",
                             "--port", str(port), "--max-seqs", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        results: list = [None] * 3
        started = threading.Barrier(4)

        def client(k):
            lines = []
            with httpx.stream("POST", url + CHAT, json={"model": "tiny", "messages": _msg(f"story {k}"),
                                                        "max_tokens": 60, "stream": True, "stop": []},
                              timeout=60) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i == 0:
                        started.wait()
                    if line:
                        lines.append(line)
            results[k] = lines

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=30)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        rc = proc.wait(timeout=60)
        assert rc == 0
        for lines in results:
            _check_finished(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
