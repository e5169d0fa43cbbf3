"""`lmwright demo`: the whole chain runs and its numbers move the right way."""

from __future__ import annotations

import json

import pytest

from lmwright.cli import main


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--workdir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    demo = json.loads((tmp_path / "d" / "demo.json").read_text())
    pre = demo["results"]["pretrain"]
    assert pre["val_ppl_after"] < pre["val_ppl_before"]
    assert "sft" in demo["results"] and "align" in demo["results"]
    assert (tmp_path / "d" / "report.html").read_text().count("<img") >= 2
    assert "lmwright serve --model" in out and "lmwright webui" in out


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The README's demo: loss falls, and LoRA SFT lifts held-out exact match from ~0 to a high value."""
    assert main(["demo", "--workdir", str(tmp_path / "d")]) == 0
    res = json.loads((tmp_path / "d" / "demo.json").read_text())["results"]
    assert res["pretrain"]["val_ppl_after"] < 0.05 * res["pretrain"]["val_ppl_before"]
    assert res["sft"]["before"]["val_exact_match"] <= 0.1
    assert res["sft"]["after"]["val_exact_match"] >= 0.4
    # DPO on the concise rule: the SFT habit (a chatty closing on addition answers) goes, answers stay (measured
    # on a 2-core avx512_bf16 CPU: greedy concise 0.81 -> 1.0, answer accuracy 0.72 -> 0.67; the polite-opener
    # rule it replaced cost 0.60 -> 0.22)
    align = res["align"]
    assert align["greedy answers concise after"] >= max(align["greedy answers concise before"], 0.9)
    assert align["answer accuracy after"] >= align["answer accuracy before"] - 0.1
