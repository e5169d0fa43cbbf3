"""prepare / load_records: manifest, hashes, deterministic split, error policy, prepared folders."""

from __future__ import annotations

import hashlib
import json

import pytest

from lmwright.config import ConfigError
from lmwright.data import DataConfig, DataError, load_records, prepare
from lmwright.data.prepare import split_records
from lmwright.data.synthetic import chinese_corpus, instruction_task


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def alpaca_file(tmp_path):
    rows = [{"instruction": f"Task number {i}", "input": "", "output": f"answer {i}"} for i in range(40)]
    rows.insert(5, dict(rows[3]))  # an exact duplicate
    return _jsonl(tmp_path / "train.jsonl", rows)


def test_prepare_writes_files_and_manifest(tmp_path, alpaca_file):
    out = tmp_path / "prepared"
    m = prepare(DataConfig(path=[str(alpaca_file)], format="alpaca", val_fraction=0.1), out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "train.jsonl",
                                                     "validation.jsonl"]
    assert m == json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"] == {"read": 41, "kept": 40, "train": 36, "validation": 4, "rejected": 1}
    assert m["rejects"] == {"duplicate": 1}
    assert m["format"] == "alpaca" and m["split"] == {"method": "hash-rank", "seed": 0, "fraction": 0.1}
    for name in ("train.jsonl", "validation.jsonl", "rejects.jsonl"):
        raw = (out / name).read_bytes()
        assert m["files"][name]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert m["files"][name]["records"] == len(raw.splitlines())
    whole = "".join(f"{n} {m['files'][n]['sha256']}\n" for n in ("train.jsonl", "validation.jsonl"))
    assert m["sha256"] == hashlib.sha256(whole.encode()).hexdigest()
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert rej == [{"file": str(alpaca_file), "line": 6, "reason": "duplicate",
                    "message": f"{alpaca_file}:6: same text as {alpaca_file}:4"}]
    assert m["lmwright_version"] and m["created"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no temp folder left


def test_in_memory_equals_prepared(tmp_path, alpaca_file):
    cfg = DataConfig(path=[str(alpaca_file)], format="alpaca", val_fraction=0.1)
    train, val, m = load_records(cfg)
    out = tmp_path / "p"
    m2 = prepare(cfg, out)
    assert m["sha256"] == m2["sha256"] and m["counts"] == m2["counts"]
    train2, val2, m3 = load_records(DataConfig(path=[str(out)], format="alpaca"))
    assert (train2, val2) == (train, val) and m3["sha256"] == m2["sha256"]
    with pytest.raises(DataError, match="prepared as format 'alpaca' but data.format is 'text'"):
        load_records(DataConfig(path=[str(out)]))
    (out / "train.jsonl").write_text((out / "train.jsonl").read_text()[:-5] + "\n")
    with pytest.raises(DataError, match="changed since"):
        load_records(DataConfig(path=[str(out)], format="alpaca"))


def test_refuses_non_empty_out_unless_overwrite(tmp_path, alpaca_file):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = DataConfig(path=[str(alpaca_file)], format="alpaca")
    with pytest.raises(DataError, match="not empty"):
        prepare(cfg, out)
    assert (out / "keep.txt").exists()
    prepare(cfg, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_split_determinism():
    recs = [{"text": f"record {i}"} for i in range(200)]
    key = lambda r: r["text"]
    a = split_records(recs, key, 0.1, seed=0)
    b = split_records(list(reversed(recs)), key, 0.1, seed=0)
    assert len(a[1]) == 20
    assert sorted(r["text"] for r in a[1]) == sorted(r["text"] for r in b[1])  # order-independent
    c = split_records(recs, key, 0.1, seed=1)
    assert {r["text"] for r in a[1]} != {r["text"] for r in c[1]}
    assert split_records(recs[:1], key, 0.1, 0) == (recs[:1], [])
    assert len(split_records(recs[:3], key, 0.05, 0)[1]) == 1  # small sets still get a validation record


def test_on_error_raise_vs_skip(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{broken\n'
                 '{"instruction": "d", "output": "e"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:2: field 'output': missing"):
        load_records(DataConfig(path=[str(p)], format="alpaca"))
    train, val, m = load_records(DataConfig(path=[str(p)], format="alpaca", on_error="skip"))
    assert m["rejects"] == {"malformed": 2} and m["counts"]["read"] == 4
    assert len(train) + len(val) == 2


def test_val_path_wins_duplicates_and_max_records(tmp_path):
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": f"t{i}"} for i in range(10)] + [{"text": "shared"}])
    va = _jsonl(tmp_path / "va.jsonl", [{"text": "shared"}, {"text": "v1"}])
    train, val, m = load_records(DataConfig(path=[str(tr)], val_path=[str(va)]))
    assert [r["text"] for r in val] == ["shared", "v1"]
    assert "shared" not in [r["text"] for r in train] and m["rejects"] == {"duplicate": 1}
    assert m["split"]["method"] == "val_path"
    train, val, _ = load_records(DataConfig(path=[str(tr)], max_records=4, val_fraction=0.25))
    assert len(train) + len(val) == 4


def test_chinese_survives(tmp_path):
    texts = chinese_corpus(20, seed=3)
    p = tmp_path / "zh.txt"
    p.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "p"
    prepare(DataConfig(path=[str(p)], val_fraction=0.0), out)
    got = [json.loads(x)["text"] for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(set(got)) == sorted(set(texts))
    assert "北京是中国的首都" in (out / "train.jsonl").read_text(encoding="utf-8")  # not \\u-escaped


def test_synthetic_alpaca_end_to_end(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", instruction_task(100, seed=0))
    train, val, m = load_records(DataConfig(path=[str(p)], format="alpaca"))
    assert m["counts"]["read"] == 100 and len(train) + len(val) == m["counts"]["kept"]
    assert all(set(r) == {"system", "instruction", "input", "output"} for r in train)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_records(DataConfig())
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_records(DataConfig(path=[str(p)], val_fraction=1.0))
    with pytest.raises(KeyError, match="unknown format"):
        load_records(DataConfig(path=[str(p)], format="nope"))


def test_everything_rejected_is_an_error(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="no training record left"):
        load_records(DataConfig(path=[str(p)], on_error="skip"))
