"""Every source kind yields records with their file and line; malformed input names both."""

from __future__ import annotations

import json

import pytest

from lmwright.data import DataError, read_records
from lmwright.data.sources import resolve_paths

ROWS = [{"text": "first row", "label": "a"}, {"text": "第二行 中文", "label": "b"}, {"text": "third", "label": "a"}]


def _texts(paths, **kw):
    return [r.data["text"] for r in read_records(paths, **kw)]


def test_txt_lines_skip_blank(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\n\n  \ntwo words\n", encoding="utf-8")
    recs = list(read_records(p))
    assert [(r.data, r.line) for r in recs] == [({"text": "one"}, 1), ({"text": "two words"}, 4)]
    assert recs[1].where == f"{p}:4"


def test_txt_paragraph_and_file_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("a1\na2\n\nb1\n", encoding="utf-8")
    assert _texts(p, txt_mode="paragraph") == ["a1\na2", "b1"]
    assert _texts(p, txt_mode="file") == ["a1\na2\n\nb1\n"]


def test_jsonl_and_bad_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    recs = list(read_records(p))
    assert [r.data for r in recs] == ROWS and [r.line for r in recs] == [1, 2, 3]
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:2: invalid JSON"):
        list(read_records(p))
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:2: expected a JSON object"):
        list(read_records(p))


def test_jsonl_skip_reports(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{bad\n{"text": "ok2"}\n', encoding="utf-8")
    seen = []
    recs = list(read_records(p, on_error="skip", on_reject=seen.append))
    assert [r.data["text"] for r in recs] == ["ok", "ok2"]
    assert len(seen) == 1 and seen[0].line == 2 and seen[0].file == str(p)


def test_json_list_keeps_lines_and_data_key(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    recs = list(read_records(p))
    assert [r.data for r in recs] == ROWS
    assert recs[0].line == 2 and recs[1].line > recs[0].line
    q = tmp_path / "b.json"
    q.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert [r.data for r in read_records(q)] == ROWS
    bad = tmp_path / "c.json"
    bad.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a JSON list of objects"):
        list(read_records(bad))


def test_csv(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('text,label\nfirst row,a\n"multi\nline",b\n第三,c\n', encoding="utf-8")
    recs = list(read_records(p))
    assert [r.data for r in recs] == [{"text": "first row", "label": "a"}, {"text": "multi\nline", "label": "b"},
                                      {"text": "第三", "label": "c"}]
    assert [r.line for r in recs] == [2, 3, 5]
    p.write_text("text,label\nx,a,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:2: the row has more cells"):
        list(read_records(p))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    recs = list(read_records(p))
    assert [r.data for r in recs] == ROWS and [r.line for r in recs] == [1, 2, 3]


def test_folder_recursive_and_glob(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("from a\n", encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "from b"}\n', encoding="utf-8")
    (tmp_path / "sub" / "deep" / "c.txt").write_text("from c\n", encoding="utf-8")
    (tmp_path / "sub" / "notes.md").write_text("ignored\n", encoding="utf-8")
    assert _texts(tmp_path) == ["from a", "from b", "from c"]
    assert _texts(str(tmp_path / "**" / "*.txt")) == ["from a", "from c"]
    with pytest.raises(DataError, match="matches no file"):
        resolve_paths([str(tmp_path / "*.nothing")])
    with pytest.raises(DataError, match="no such file"):
        resolve_paths([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="unsupported file type '.md'"):
        resolve_paths([tmp_path / "sub" / "notes.md"])


def test_datasets_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _texts(tmp_path / "ds") == [r["text"] for r in ROWS]
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(_texts(tmp_path / "dd")) == 3
    assert _texts(tmp_path / "dd", split="validation") == ["first row"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dt"))
    with pytest.raises(DataError, match="has no 'train' split"):
        list(read_records(tmp_path / "dt"))


def test_lazy(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{bad\n', encoding="utf-8")
    it = read_records(p)
    assert next(it).data == {"text": "ok"}  # the bad line is only reached when asked for
    with pytest.raises(DataError):
        next(it)


def test_byte_order_mark_is_dropped(tmp_path):
    for name, body in (("a.jsonl", '{"text": "x"}\n'), ("b.txt", "x\n"), ("c.csv", "text\nx\n"),
                       ("d.json", '[{"text": "x"}]')):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert _texts(p) == ["x"], name
