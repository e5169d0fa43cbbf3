"""The web UI: its handlers over run folders, the app served for real, and a headless browser render."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from .conftest import running_webui


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, lm_dir):
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(lm_dir, root / "tiny-run")
    (root / "tiny-run" / "metrics.jsonl").write_text(
        "\n".join([json.dumps({"step": 1, "loss": 3.0}), json.dumps({"step": 2, "loss": 2.5, "eval_loss": 2.7}),
                   '{"step": 3, "loss": 2.'])  # a line still being written
    )
    (root / "not-a-run").mkdir()
    return root


def test_list_runs_and_metrics(runs_dir):
    from lmwright.serve.webui import list_runs, loss_points, read_metrics

    assert list_runs(runs_dir) == ["tiny-run"]
    rows = read_metrics(runs_dir / "tiny-run")
    assert [r["step"] for r in rows] == [1, 2]
    pts = loss_points(rows)
    assert {(p["step"], p["series"]) for p in pts} == {(1, "train"), (2, "train"), (2, "eval")}


def test_chat_stream_uses_the_same_path_as_the_api(runs_dir, lm):
    from lmwright.serve.webui import ModelCache, chat_stream

    cache = ModelCache(runs_dir)
    outs = list(chat_stream(cache, "tiny-run", [], "hello", 0.0, 1.0, 16, None))
    assert len(outs) > 2  # streamed
    final = outs[-1]
    assert [m["role"] for m in final] == ["user", "assistant"]
    assert final[-1]["content"] == lm.chat("hello", max_tokens=16, temperature=0)
    assert cache.get("tiny-run") is cache.get("tiny-run")  # loaded once


def test_train_job_runs_a_subprocess(tmp_path):
    from lmwright.serve.webui import TrainJob

    with pytest.raises(ValueError):
        TrainJob("bake", "", "", tmp_path / "x.log", runs_dir=tmp_path)
    with pytest.raises(ValueError):  # command-line flags are not accepted from the UI (issue 13)
        TrainJob("sft", "", "--help", tmp_path / "x.log", runs_dir=tmp_path)
    job = TrainJob("sft", "", "train.max_steps=0", tmp_path / "sft.log", runs_dir=tmp_path)
    deadline = time.time() + 60
    while job.status() == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert job.status().startswith("finished")
    assert "train.max_steps" in job.log_tail()


@pytest.fixture(scope="module")
def ui_url(runs_dir):
    with running_webui(runs_dir) as url:
        yield url


def test_ui_is_served(ui_url):
    r = httpx.get(ui_url, timeout=20)
    assert r.status_code == 200 and "lmwright" in r.text
    cfg = httpx.get(ui_url + "/config", timeout=20).json()
    ids = {c.get("props", {}).get("elem_id") for c in cfg["components"]}
    assert {"run_a", "run_b", "chat_a", "chat_b", "msg", "loss_plot", "metrics_table"} <= ids


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian chromium (apt-get install chromium)")
def test_headless_browser_renders_ui(ui_url):
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--dump-dom", ui_url], capture_output=True, text=True, timeout=90).stdout
    for elem in ("chat_a", "chat_b", "msg", "run_a"):
        assert f'id="{elem}"' in dom
    assert "tiny-run" in dom  # the run list reached the page
