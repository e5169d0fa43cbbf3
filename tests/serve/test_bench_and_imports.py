"""The load benchmark runs (smoke size), and the serve CLI stays light to import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--smoke", "--out", str(out), "--levels", "1,2"])
    saved = json.loads(out.read_text())
    assert saved["serving"][0]["concurrency"] == 1 and saved["serving"][1]["concurrency"] == 2
    for row in res["serving"]:
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["ttft_p50_s"] <= row["ttft_p95_s"]
        assert row["ratio_vs_generate_b1"] > 0
    assert saved["calibration"]["matmul_flops_fp32"] > 0
    assert saved["baseline_generate_b1"]["tokens_per_s"] > 0


def test_serve_cli_modules_do_not_import_heavy_libraries():
    code = ("import sys; from lmwright.cli import serve, chat, generate, webui; import argparse; "
            "sub = argparse.ArgumentParser().add_subparsers(); [m.register(sub) for m in (serve, chat, generate, webui)]; "
            "print([m for m in ('torch', 'transformers', 'fastapi', 'gradio', 'vllm', 'uvicorn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
