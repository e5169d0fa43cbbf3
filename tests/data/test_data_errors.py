"""Issue 13: broken data files (bad bytes, binary files, huge csv fields, deep JSON, corrupt parquet)
raise ``DataError`` naming the file and the line (or row), never a raw traceback; with
``on_error=skip`` the bad record is skipped and counted."""

from __future__ import annotations

import json
import os
import re

import pytest

from lmwright.cli import main
from lmwright.data import DataConfig, DataError, load_records, prepare, read_records

BAD = b"caf\xe9 \xff\xfe"  # latin-1 / binary bytes: not UTF-8
DEEP = b"[" * 100_000 + b"]" * 100_000
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256))


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _raises_at(p, line: int, text: str, **kw) -> DataError:
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:{line}: .*{text}") as e:
        list(read_records(p, **kw))
    assert e.value.file == str(p) and e.value.line == line
    return e.value


def _skipped(p, **kw) -> tuple[list[str], list[DataError]]:
    seen: list[DataError] = []
    recs = list(read_records(p, on_error="skip", on_reject=seen.append, **kw))
    return [r.data["text"] for r in recs], seen


# ------------------------------------------------------------------------------------ bad bytes
@pytest.mark.parametrize("name, data, line", [
    ("a.jsonl", b'{"text": "ok"}\n{"text": "' + BAD + b'"}\n{"text": "ok2"}\n', 2),
    ("a.csv", b'text,label\nok,a\n"' + BAD + b'",b\nok2,c\n', 3),
    ("a.txt", b"ok\n\n" + BAD + b"\nok2\n", 3),
    ("a.json", b'[\n{"text": "ok"},\n{"text": "' + BAD + b'"},\n{"text": "ok2"}\n]\n', 3),
])
def test_invalid_utf8_names_line_and_skips(tmp_path, name, data, line):
    p = _write(tmp_path, name, data)
    _raises_at(p, line, "not valid UTF-8")
    texts, seen = _skipped(p)
    assert texts == ["ok", "ok2"] and [(e.line, e.file) for e in seen] == [(line, str(p))]


def test_invalid_utf8_txt_paragraph_and_file_modes(tmp_path):
    p = _write(tmp_path, "a.txt", b"one\ntwo\n\nthree\n" + BAD + b"\n\nfour\n")
    _raises_at(p, 5, "not valid UTF-8", txt_mode="paragraph")
    assert _skipped(p, txt_mode="paragraph")[0] == ["one\ntwo", "four"]
    _raises_at(p, 5, "not valid UTF-8", txt_mode="file")


def test_invalid_utf8_json_data_key_names_line(tmp_path):
    p = _write(tmp_path, "a.json", b'{"data": [\n{"text": "ok"},\n{"text": "' + BAD + b'"}\n]}\n')
    _raises_at(p, 3, "not valid UTF-8")


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "txt"])
def test_binary_file_is_a_data_error(tmp_path, ext):
    p = _write(tmp_path, f"image.{ext}", PNG)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: "):
        list(read_records(p))


# ------------------------------------------------------------------------------------ csv field limit
def test_csv_field_over_the_limit(tmp_path):
    p = _write(tmp_path, "big.csv", b'text,label\nok,a\n"' + b"x" * 140_000 + b'",b\nok2,c\n')
    err = _raises_at(p, 3, "131072")
    assert ".jsonl" in str(err)  # says how to fix it
    texts, seen = _skipped(p)
    assert texts == ["ok", "ok2"] and [e.line for e in seen] == [3]


# ------------------------------------------------------------------------------------ deep JSON
def test_deep_json_line(tmp_path):
    p = _write(tmp_path, "deep.jsonl", b'{"text": "ok"}\n{"text": ' + DEEP + b'}\n{"text": "ok2"}\n')
    _raises_at(p, 2, "nested too deeply")
    texts, seen = _skipped(p)
    assert texts == ["ok", "ok2"] and [e.line for e in seen] == [2]


@pytest.mark.parametrize("data, line", [
    (b'[\n{"text": "ok"},\n{"text": ' + DEEP + b"}\n]", 3),
    (b'{"data": [\n{"text": "ok"},\n{"text": ' + DEEP + b"}]}", 3),
])
def test_deep_json_document(tmp_path, data, line):
    p = _write(tmp_path, "deep.json", data)
    _raises_at(p, line, "nested too deeply")


# ------------------------------------------------------------------------------------ parquet
def _parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(2000)]}), p, compression="snappy",
                   row_group_size=500)
    return p


def test_parquet_corrupt_pages(tmp_path):
    p = _parquet(tmp_path)
    raw = bytearray(p.read_bytes())
    for i in range(100, 300):  # the first data page: the footer still reads
        raw[i] = (raw[i] * 7 + 13) % 256
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: cannot read parquet at row 1: "):
        list(read_records(p))


@pytest.mark.parametrize("cut", [0, 4, 100])
def test_parquet_truncated_or_garbage(tmp_path, cut):
    p = _parquet(tmp_path)
    p.write_bytes(p.read_bytes()[:cut] + b"garbage")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: cannot read parquet"):
        list(read_records(p))


# ------------------------------------------------------------------------------------ prepared folders
def _prepared(tmp_path):
    src = _write(tmp_path, "a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    out = tmp_path / "prep"
    prepare(DataConfig(path=[str(src)], val_fraction=0.0), out)
    return out


def test_prepared_train_file_with_bad_bytes(tmp_path):
    out = _prepared(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    del m["files"]["train.jsonl"]["sha256"]  # an older or hand-edited manifest: no hash to compare
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "train.jsonl").write_bytes(b'{"text": "one"}\n{"text": "' + BAD + b'"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: .*not valid UTF-8"):
        load_records(DataConfig(path=[str(out)]))


@pytest.mark.parametrize("manifest", [b"[1, 2]", PNG, b'{"format": ' + DEEP + b"}"])
def test_prepared_manifest_broken(tmp_path, manifest):
    out = _prepared(tmp_path)
    (out / "manifest.json").write_bytes(manifest)
    with pytest.raises(DataError, match=r"manifest.json"):
        load_records(DataConfig(path=[str(out)]))


# ------------------------------------------------------------------------------------ pipeline and CLI
def test_prepare_skip_counts_bad_lines(tmp_path):
    p = _write(tmp_path, "a.jsonl", b'{"text": "ok"}\n{"text": "' + BAD + b'"}\n{"text": ' + DEEP
               + b'}\n{"text": "ok2"}\n')
    train, _, m = load_records(DataConfig(path=[str(p)], on_error="skip", val_fraction=0.0))
    assert [r["text"] for r in train] == ["ok", "ok2"]
    assert m["counts"]["read"] == 4 and m["rejects"] == {"malformed": 2}


def test_file_name_not_utf8(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 still makes a manifest and a rejects file."""
    name = os.fsdecode(b"caf\xe9.jsonl")
    try:
        p = _write(tmp_path, name, b'{"text": "ok"}\n{bad\n{"text": "ok2"}\n')
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses a non-UTF-8 file name")
    m = prepare(DataConfig(path=[str(tmp_path)], on_error="skip", val_fraction=0.0), tmp_path / "out")
    assert m["counts"]["kept"] == 2 and m["sources"][0]["path"] == str(p)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(p), 2)]
    assert load_records(DataConfig(path=[str(tmp_path / "out")]))[2]["sha256"] == m["sha256"]


@pytest.mark.parametrize("name, data, where", [
    ("a.jsonl", b'{"text": "ok"}\n' + BAD + b"\n", ":2: "),
    ("a.csv", b'text\n"' + b"x" * 140_000 + b'"\n', ":2: "),
    ("a.jsonl", b'{"text": ' + DEEP + b"}\n", ":1: "),
    ("a.parquet", b"PAR1 not parquet PAR1", ": cannot read parquet"),
])
def test_cli_prints_one_line(tmp_path, capsys, name, data, where):
    p = _write(tmp_path, name, data)
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}{where}") and "Traceback" not in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------ config values
# found by tests/fuzz/test_fuzz_data_config.py: each was a traceback (or an error naming nothing)
@pytest.mark.parametrize("override, names", [
    ("data.max_records=abc", "'data.max_records' must be an integer"),  # int | None: raised a str
    ("data.max_records=1e400", "'data.max_records' must be an integer"),
    ("data.split_seed=.nan", "'data.split_seed' must be an integer"),  # int(nan)
    ("data.val_fraction=" + "9" * 400, "data.val_fraction"),  # float(huge int)
    ("data.columns=no", "'data.columns' must be a mapping"),  # a bare dict went unchecked
    ("data.columns={a: [1]}", "data.columns: 'a': [1] must map"),
    ("data.clean.max_chars=-1", "data.clean.max_chars = -1"),  # dropped every record, naming no option
    ("data.val_path=yes", "True: no such file or folder (data.val_path)"),
    ("data.path.x=" + "[" * 3000, "data.path"),  # RecursionError in the YAML parser
    ("data.columns.x=" + "{a: " * 100 + "1" + "}" * 100, "the value nests more than 32 levels deep"),
    ("--out=" + "x" * 300, "cannot use it as the output folder: File name too long"),
])
def test_cli_config_values(tmp_path, capsys, monkeypatch, override, names):
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, "a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "out"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and names in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_empty_val_path_clears_it(tmp_path, capsys, monkeypatch):
    """`data.val_path=` read the current folder (an empty path); now it means no val_path."""
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, "a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "out"), "data.val_path="]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["val_sources"] == []
    with pytest.raises(DataError, match="an empty path"):
        list(read_records(""))


@pytest.mark.parametrize("text, names", [
    (b"stage: pretrain\ndata:\n  path: caf\xe9\n", ":3: not valid UTF-8 (byte 0xe9 at column 12)"),
    (b"stage: pretrain\nseq_len: 1\x07\n", ":2: invalid YAML: special characters are not allowed"),
    (b"data: " + b"[" * 3000 + b"\n", ": invalid YAML: nested too deeply"),
    (b"data:\n  path: &a [*a]\n", ": the config contains itself"),
])
def test_cli_broken_config_file(tmp_path, capsys, text, names):
    cfg = _write(tmp_path, "cfg.yaml", text)
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}{names}") and "Traceback" not in err and err.count("\n") == 1
