"""Issue 13: the web UI's Train tab and watch box stay inside the runs folder, run one job at a time
with a stop button that reaps it, and ModelCache keeps at most `capacity` models (LRU)."""

from __future__ import annotations

import sys

import pytest

from lmwright.config import ConfigError


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    (d / "mine").mkdir()
    (d / "mine" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (tmp_path / "elsewhere.yaml").write_text("train:\n  max_steps: 1\n")
    (d / "escape.yaml").write_text("train:\n  run_name: ../../outside\n")
    (d / "ok.yaml").write_text("train:\n  max_steps: 1\n")
    return d


@pytest.mark.parametrize("config, overrides, match", [
    ("{tmp}/elsewhere.yaml", "", "config file"),
    ("/etc/passwd", "", "config file"),
    ("../elsewhere.yaml", "", "config file"),
    ("", "-c {tmp}/elsewhere.yaml", "flags are not accepted"),
    ("", "--nproc=64", "flags are not accepted"),
    ("", "train.output_dir=/anywhere", "output_dir cannot be set"),
    ("", "train={{output_dir:/anywhere}}", "output_dir cannot be set"),
    ("", "train.run_name=../..", "not a run name"),
    ("", "train.run_name=/etc", "not a run name"),
    ("escape.yaml", "", "not a run name"),
    ("", "data.path=[/etc/passwd]", "inside the runs folder"),
    ("", "data.path=[{tmp}/secret/metrics.jsonl]", "inside the runs folder"),
    ("", "data.path={tmp}/secret/dataset_info.json:alpaca", "inside the runs folder"),
    ("", "model.name=~/models/x", "inside the runs folder"),
    ("", "tokenizer=../secret", "inside the runs folder"),
])
def test_train_command_is_confined_to_the_runs_folder(runs, config, overrides, match):
    from lmwright.serve.webui import train_command

    tmp = str(runs.parent)
    with pytest.raises(ConfigError, match=match):
        train_command(runs, "sft", config.format(tmp=tmp), overrides.format(tmp=tmp))


def test_train_command_accepts_runs_folder_and_shipped_configs(runs):
    from lmwright.serve.webui import SHIPPED_CONFIGS, train_command

    cmd = train_command(runs, "sft", "ok.yaml", "train.max_steps=2 train.run_name=my-run")
    ok = train_command(runs, "sft", "", f"model.name=llama-tiny data.path=[{runs / 'mine' / 'metrics.jsonl'}]")
    assert f"data.path=[{runs / 'mine' / 'metrics.jsonl'}]" in ok
    assert cmd[cmd.index("-c") + 1] == str((runs / "ok.yaml").resolve())
    assert cmd[-1] == f"train.output_dir={runs.resolve()}"  # last: the run lands in the runs folder
    shipped = sorted((SHIPPED_CONFIGS / "sft").glob("*.yaml"))[0]
    cmd = train_command(runs, "sft", f"configs/sft/{shipped.name}", "")
    assert cmd[cmd.index("-c") + 1] == str(shipped.resolve())


def test_one_job_at_a_time_and_stop_reaps_it(runs, monkeypatch):
    import lmwright.serve.webui as webui

    monkeypatch.setattr(webui, "train_command",
                        lambda *a: [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(120)"])
    slot = webui.JobSlot(runs)
    assert slot.status() == "idle"
    assert slot.start("sft", "", "").startswith("started")
    first = slot.job
    assert "already running" in slot.start("sft", "", "")
    assert slot.job is first
    assert slot.stop().startswith("finished")
    assert first.proc.returncode is not None  # reaped, not a zombie
    assert first._fh.closed
    assert slot.start("sft", "", "").startswith("started")  # a new job after the stop
    slot.stop()


def test_job_slot_reports_refusals(runs):
    from lmwright.serve.webui import JobSlot

    slot = JobSlot(runs)
    assert slot.start("sft", "/etc/passwd", "").startswith("not started: config file")
    assert slot.job is None


def test_watch_reads_only_inside_the_runs_folder(runs):
    from lmwright.serve.webui import watch_points

    assert [p["loss"] for p in watch_points(runs, "mine")] == [2.0]
    assert [p["loss"] for p in watch_points(runs, str(runs / "mine"))] == [2.0]
    assert watch_points(runs, str(runs.parent / "secret")) == []
    assert watch_points(runs, "../secret") == []


def test_model_cache_is_lru_bounded_and_confined(runs, monkeypatch):
    import lmwright.serve.api as api
    from lmwright.serve.webui import ModelCache

    loads = []

    def fake_load(path, guardrails=None, name=None):
        loads.append(name)
        return object()

    monkeypatch.setattr(api, "load", fake_load)
    cache = ModelCache(runs, capacity=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # a hit refreshes a
    cache.get("c")  # evicts b, the least recently used
    assert cache.loaded() == ["a", "c"]
    cache.get("b")
    assert loads == ["a", "b", "c", "b"]
    assert cache.loaded() == ["c", "b"]
    for bad in ("../secret", "/etc", ".hidden"):
        with pytest.raises(ConfigError):
            cache.get(bad)
