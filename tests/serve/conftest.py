"""Servable tiny models saved to folders, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest


def scramble(model, std: float = 0.3, seed: int = 0) -> None:
    """Large random weights: a freshly initialised tiny model repeats one token forever, which would
    let batching bugs pass unnoticed; with these weights greedy outputs vary token to token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tokenizer):
    from lmwright.models import ModelConfig, build_model

    out = tmp_path_factory.mktemp("lm")
    model = build_model(ModelConfig(name="llama-tiny", overrides={"max_position_embeddings": 256}),
                        task="causal-lm", tokenizer=tokenizer, seed=0)
    scramble(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embed_dir(tmp_path_factory, tokenizer):
    from lmwright.models import ModelConfig, build_model

    out = tmp_path_factory.mktemp("embedder")
    model = build_model(ModelConfig(name="bert-tiny"), task="embedding", tokenizer=tokenizer, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lm(lm_dir):
    from lmwright.serve.api import load

    return load(lm_dir, name="tiny")


@pytest.fixture(scope="session")
def embedder(embed_dir):
    from lmwright.serve.api import load

    return load(embed_dir, name="embedder")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models, cfg=None, guardrails=None):
    """A uvicorn server in a thread; yields its base URL; stops it (graceful shutdown) on exit."""
    import uvicorn

    from lmwright.serve.http import ServeConfig, create_app

    cfg = cfg or ServeConfig()
    app = create_app(models, cfg, guardrails=guardrails)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        t.join(timeout=15)


@pytest.fixture(scope="module")
def server(lm, embedder):
    """The default server: the tiny LM as 'tiny' and the encoder as 'embedder'."""
    with running_server({"tiny": lm, "embedder": embedder}) as (url, app):
        yield url, app


@contextlib.contextmanager
def running_webui(runs_dir):
    """The gradio web UI over ``runs_dir`` on a free loopback port; yields its URL, closes it after."""
    pytest.importorskip("gradio")
    from lmwright.serve.webui import build_ui

    ui = build_ui(runs_dir)
    port = free_port()
    ui.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ui.close()
