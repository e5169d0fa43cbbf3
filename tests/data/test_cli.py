"""``lmwright data prepare`` end to end through ``lmwright.cli.main``."""

from __future__ import annotations

import json

from lmwright.cli import main


def _write(tmp_path):
    p = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)]
    lines = [json.dumps(r) for r in rows] + ['{"messages": [{"role": "user", "content": "no answer"}]}', "{bad"]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_prepare_cli_skip(tmp_path, capsys):
    p = _write(tmp_path)
    out = tmp_path / "out"
    rc = main(["data", "prepare", str(p), "--format", "messages", "--on-error", "skip", "--out", str(out),
               "data.val_fraction=0.1", "data.split_seed=3"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"] == 18 and m["counts"]["validation"] == 2
    assert m["rejects"] == {"malformed": 2} and m["split"]["seed"] == 3
    printed = capsys.readouterr().out
    assert "train 18, validation 2" in printed and "malformed 2" in printed and str(out) in printed
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2


def test_prepare_cli_raise_prints_error(tmp_path, capsys):
    p = _write(tmp_path)
    rc = main(["data", "prepare", str(p), "-f", "messages", "-o", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}:21: field 'messages': no assistant turn")
    assert not (tmp_path / "o").exists()


def test_prepare_cli_yaml_config(tmp_path):
    p = tmp_path / "reviews.csv"
    p.write_text("review,stars\ngood film,5\nbad film,1\nok film,3\n", encoding="utf-8")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  path: [{p}]\n  format: classification\n  columns: {{review: text, stars: label}}\n"
                   f"  val_fraction: 0.0\nout: {tmp_path / 'o'}\n", encoding="utf-8")
    assert main(["data", "prepare", "-c", str(cfg)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "train.jsonl").read_text().splitlines()]
    assert rows == [{"text": "good film", "label": "5"}, {"text": "bad film", "label": "1"},
                    {"text": "ok film", "label": "3"}]
    assert main(["data", "prepare", "-c", str(cfg)]) == 2  # exists: refused
    assert main(["data", "prepare", "-c", str(cfg), "--overwrite"]) == 0


def test_unknown_key_is_a_config_error(tmp_path, capsys):
    assert main(["data", "prepare", "data.fromat=text"]) == 2
    assert "Did you mean 'format'" in capsys.readouterr().err
