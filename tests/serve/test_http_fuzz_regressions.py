"""Issue 13: the bugs the HTTP fuzz harness (tests/fuzz/test_fuzz_http.py) found, one test each.

Before the fixes: a body that stopped short of its Content-Length held its connection and handler forever;
so did a request head sent a byte at a time; a client leaving mid-body was logged as an unexpected error
(a 500 in the log); a string with an unpaired surrogate escape ("\\ud800") crashed the tokenizer or the
response encoder (500); top_p=5e-324 left no token to sample (500 "generation failed").
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from lmwright.serve.http import ServeConfig

from .conftest import free_port

CHAT = "/v1/chat/completions"


def _head(path: str, port: int, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _read_all(s: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes (or ``limit_s`` passes)."""
    s.settimeout(limit_s)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.fixture(scope="module")
def quick_server(lm):
    """The tiny LM with a 0.5 s read timeout, on the uvicorn settings `lmwright serve` uses."""
    import uvicorn

    from lmwright.serve.http import create_app, uvicorn_options

    cfg = ServeConfig(read_timeout_s=0.5)
    port = free_port()
    opts = {**uvicorn_options(cfg), "port": port, "log_level": "warning", "timeout_graceful_shutdown": 5}
    server = uvicorn.Server(uvicorn.Config(create_app({"tiny": lm}, cfg), **opts))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    t.join(timeout=15)


def test_stalled_body_is_408_and_closes(quick_server):
    port = quick_server
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(_head(CHAT, port, len(body) + 10) + body[:20])  # the rest never comes
        reply = _read_all(s, 10)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request_timeout" in reply and time.monotonic() - t0 < 5  # and the server closed the socket


def test_stalled_or_dribbled_head_is_408(quick_server):
    port = quick_server
    head = _head(CHAT, port, 2)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head[:30])  # half a head, then nothing
        reply = _read_all(s, 10)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
    with socket.create_connection(("127.0.0.1", port)) as s:  # a byte every 0.2 s: still bounded
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(len(head)):
                s.sendall(head[i:i + 1])
                time.sleep(0.2)
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", port)) as s:  # a connection that says nothing is closed
        assert _read_all(s, 10) == b""
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_client_leaving_mid_body_is_no_server_error(server, caplog):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    with caplog.at_level(logging.ERROR, logger="lmwright.serve"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_head(CHAT, port, 500) + b'{"model": "tiny", "mess')
        time.sleep(0.5)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert 'endpoint="/v1/chat/completions",status="499"' in metrics
    assert 'status="5' not in metrics


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'),  # the tokenizer raised
    (CHAT, '{"model": "\\udfff", "messages": [{"role": "user", "content": "Hi"}]}'),  # the 404's encoder raised
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud83d"}], "max_tokens": 2}'),
])
def test_unpaired_surrogate_is_400(server, path, body):
    url, _ = server
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    ok = httpx.post(url + CHAT, content='{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83e\\udd99"}],'
                    ' "max_tokens": 2}', headers={"content-type": "application/json"}, timeout=30)
    assert ok.status_code == 200, ok.text  # a proper surrogate pair is fine


def test_subnormal_top_p_keeps_the_top_token(server):
    import torch

    from lmwright.engine.sampling import SamplingParams, process_logits

    out = process_logits(torch.tensor([1.0, 3.0, 2.0]), SamplingParams(temperature=1.0, top_p=5e-324))
    assert torch.isfinite(out).tolist() == [False, True, False]
    url, _ = server
    r = httpx.post(url + "/v1/completions", content='{"model": "tiny", "prompt": "Once", "max_tokens": 3, '
                   '"top_p": 5e-324}', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_read_timeout_must_be_positive():
    from lmwright.config import ConfigError

    with pytest.raises(ConfigError, match="read_timeout_s"):
        ServeConfig(read_timeout_s=0).check()

