"""Issue 13, hardening: a seeded fuzz of data files and config values through the CLI, in process.

Generated malformed inputs go through ``lmwright data prepare``, ``lmwright validate`` and ``lmwright train``
(``lmwright.cli.main``):

- data files (.jsonl .json .csv .txt .parquet) of every record format, with wrong field types and
  values, missing fields, deep nesting, lone surrogate escapes, huge fields, invalid UTF-8 and binary
  bytes, truncation, flipped bytes, ragged csv rows, corrupt parquet pages; ``on_error`` raise and skip;
- config values: ``key=value`` overrides with junk of every YAML type (NaN, 1e400, lists, mappings,
  tags, unterminated quotes, deep nesting), unknown keys, malformed overrides and broken YAML files
  (invalid syntax, binary, deep nesting, wrong top-level type, unusual keys).

Checked: no traceback (any exception out of ``main`` other than argparse's exit), exit code 0 or 2, and
every error names where it is: ``file:line`` (or the file, for whole-file faults) for data, the dotted key
or the config file for config values. ``train`` never reaches model work: building a model or a run
folder raises ``ReachedModel``, counted as an outcome (valid configs and data get that far).

``LMWRIGHT_FUZZ_SEED`` changes the seed (default 13); ``LMWRIGHT_FUZZ_REPORT=<path>`` writes the counts as
JSON (collected into bench/README.md).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmwright.cli import main

SEED = int(os.environ.get("LMWRIGHT_FUZZ_SEED", "13"))
N_FILES = 360  # data files, each through `data prepare`; every third through `train` too
N_OVERRIDES = 200  # `data prepare` with junk key=value overrides
N_YAML = 120  # broken stage config files, through `validate` or `train`
WORDS = ["the", "cat", "sat", "on", "mat", "données", "über", "中文", "λόγος", "emoji😀", "tab\tin", "a,b", 'quote"d']
FORMATS = {"text": "pretrain", "alpaca": "sft", "messages": "sft", "classification": "classify",
           "preference": "dpo", "kto": "dpo", "pairs": None}
EXTS = {"text": ["jsonl", "json", "csv", "txt", "parquet"], "alpaca": ["jsonl", "json", "csv", "parquet"],
        "messages": ["jsonl", "json", "parquet"], "classification": ["jsonl", "json", "csv", "parquet"],
        "preference": ["jsonl", "json", "csv"], "kto": ["jsonl", "json"], "pairs": ["jsonl", "csv"]}
STATS: Counter = Counter()


class ReachedModel(BaseException):
    """Raised where training would build a model or a run folder: the config and data checks passed."""


@dataclass
class Case:
    argv: list[str]
    names: list[str]  # an error must name one of these (a file path or a dotted key)
    kind: str  # data / override / yaml
    skip: bool = False  # data.on_error=skip


# ------------------------------------------------------------------------------------------ running
def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """(exit code, or "traceback" / "model"; stderr) of ``lmwright <argv>`` in this process."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc: int | str = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code if isinstance(e.code, int) else 2
        except ReachedModel:
            rc = "model"
        except Exception:  # noqa: BLE001 - exactly what the fuzz looks for
            rc = "traceback"
            err.write(traceback.format_exc())
    return rc, err.getvalue()


# errors about a whole file, or about records that no longer know their line, name the file only
_WHOLE_FILE = ("cannot read parquet:", "cannot read parquet at row", "expected a JSON list of objects",
               "no training record left", "cannot read the datasets folder", "cannot read:", "already exists",
               "is not a known class")  # classify: a label of the split-off validation records


def problem(case: Case, rc: int | str, err: str) -> str | None:
    """What is wrong with an outcome (None when it is fine)."""
    if rc == "traceback" or "Traceback" in err:
        return "traceback"
    if rc in (0, "model"):
        return None
    if rc != 2:
        return f"exit code {rc}"
    if "usage:" in err:  # argparse's own error: it names the option
        return None
    msg = err.strip().splitlines()[-1] if err.strip() else ""
    if not msg.startswith("error: "):
        return "no error line"
    if not any(n in msg for n in case.names):
        return "error names neither the file nor the key"
    if case.kind == "data":
        return _data_location(case, msg)
    return None


def _data_location(case: Case, msg: str) -> str | None:
    path = case.names[0]
    line = re.search(re.escape(path) + r"(\[\w+\])?:(\d+)", msg)
    if line is None:
        return None if any(w in msg for w in _WHOLE_FILE) else "data error without a line"
    pipeline = case.argv[0] == "data"  # a stage may refuse a record on its own terms (a label it has not seen)
    if pipeline and case.skip and not path.endswith(".json") and int(line.group(2)) > 1 \
            and "cannot read parquet" not in msg:
        return "on_error=skip stopped on a record error"
    return None


# ------------------------------------------------------------------------------------------ records
DEEP = "@@DEEP{}@@"


def words(rng: random.Random, n: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def base_record(rng: random.Random, fmt: str) -> dict:
    w = lambda: words(rng)  # noqa: E731
    if fmt == "text":
        return {"text": w()}
    if fmt == "alpaca":
        return {"instruction": w(), "input": rng.choice(["", w()]), "output": w()}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": w()}, {"role": "assistant", "content": w()}]}
    if fmt == "classification":
        return {"text": w(), "label": rng.choice(["pos", "neg", 0, 1])}
    if fmt == "preference":
        return {"prompt": w(), "chosen": "yes " + w(), "rejected": "no " + w()}
    if fmt == "kto":
        return {"prompt": w(), "completion": w(), "label": rng.choice([True, False])}
    return {"anchor": w(), "positive": w(), "score": rng.random()}


def junk(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 2.5, 10**30, 1e308, float("nan"), float("inf"), "", "   ", "\x00", "\u2028",
        "\ud800", "\udfff", "a\ud83db", "x" * rng.choice([10, 140_000]), [], {}, [1, "a", None], {"a": {"b": [1]}},
        [{"role": "user"}], [{"role": "wizard", "content": "x"}], [{"from": "gpt", "value": 5}],
        {"name": "f", "arguments": "{not json"}, [{"role": "assistant", "content": "", "tool_calls": "x"}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": DEEP.format(300)}}]}],
        '{"name": "f", "arguments": ' + "[" * 3000 + "]" * 3000 + "}", DEEP.format(rng.choice([150, 999, 20_000])),
    ])


def mutate_record(rng: random.Random, rec: dict, fmt: str) -> dict:
    rec = dict(rec)
    key = rng.choice([*rec, "tools", "system", "history", "conversations", "label"])
    how = rng.random()
    if how < 0.15:
        rec.pop(key, None)
    elif how < 0.25 and fmt == "messages":
        rec["messages"] = [dict(m) for m in rec["messages"]]
        rec["messages"][rng.randrange(2)][rng.choice(["role", "content", "tool_calls", "from"])] = junk(rng)
    else:
        rec[key] = junk(rng)
    return rec


def typed_columns(rng: random.Random, recs: list[dict], fmt: str) -> list[dict]:
    """Records whose one column (the same in each, so that arrow can build it) holds values JSON has no
    type for: what parquet and datasets sources can carry."""
    import datetime
    import decimal

    value = rng.choice([datetime.datetime(2020, 1, 2, 3, 4), datetime.date(2020, 1, 2), decimal.Decimal("1.50"),
                        b"\x00\xffbytes", {"when": datetime.datetime(2020, 1, 2)}, [decimal.Decimal("2")]])
    if fmt == "messages" and rng.random() < 0.5:
        call = {"function": {"name": "f", "arguments": {"x": value}}}
        msgs = [{"role": "user", "content": "q", "tool_calls": None},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "assistant", "content": "a", "tool_calls": None}]
        return [{"messages": msgs} for _ in recs]
    key = rng.choice([*recs[0], "tools"])
    return [{**r, key: value} for r in recs]


# ------------------------------------------------------------------------------------------ files
def _json_text(obj, rng: random.Random, indent=None) -> str:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=indent)
    return re.sub(r'"@@DEEP(\d+)@@"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8 bytes


def _cell(v) -> str:
    if isinstance(v, str):
        return v.replace(DEEP.format(""), "")  # csv has no nesting: keep the marker's digits as text
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def serialize(rng: random.Random, ext: str, recs: list[dict], path: Path) -> bytes:
    if ext == "jsonl":
        return _enc("".join(_json_text(r, rng) + rng.choice(["\n", "\r\n"]) for r in recs))
    if ext == "json":
        body = recs if rng.random() < 0.7 else {"data": recs}
        return _enc(_json_text(body, rng, indent=rng.choice([None, 1])))
    if ext == "txt":
        return _enc("\n".join(_cell(r.get("text", "")) for r in recs) + "\n")
    if ext == "csv":
        cols = list(dict.fromkeys(k for r in recs for k in r))
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(cols)
        for r in recs:
            w.writerow([_cell(r[c]) if c in r else "" for c in cols][: len(cols) + rng.choice([0, 0, 0, -1])])
        return _enc(out.getvalue())
    return _parquet_bytes(recs, path)


def _parquet_bytes(recs: list[dict], path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    clean = [{k: v for k, v in r.items() if not (isinstance(v, str) and "@@" in v)} for r in recs]
    try:
        pq.write_table(pa.Table.from_pylist(clean), path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types, empty structs: one column
        pq.write_table(pa.table({"text": [json.dumps(r, default=str) for r in clean]}), path)
    return path.read_bytes()


BAD_BYTES = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff", b"\x00", b"\xe9t\xe9"]


def mutate_bytes(rng: random.Random, data: bytes, ext: str) -> bytes:
    if ext == "parquet":
        how = rng.choice(["truncate", "garbage", "page"])
        if how == "truncate":
            return data[: rng.randrange(len(data))]
        if how == "garbage":
            return rng.choice([b"", b"PAR1", b"PAR1" + rng.randbytes(64) + b"PAR1", rng.randbytes(200)])
        raw = bytearray(data)
        for i in range(4, min(len(raw) // 3, 60)):
            raw[i] ^= 0x5A
        return bytes(raw)
    pos = rng.randrange(len(data) + 1)
    how = rng.choice(["bad", "bad", "truncate", "flip", "binary", "utf16", "nul", "long", "cr"])
    if how == "bad":
        return data[:pos] + rng.choice(BAD_BYTES) + data[pos:]
    if how == "truncate":
        return data[:pos]
    if how == "flip" and data:
        i = min(pos, len(data) - 1)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    if how == "binary":
        return rng.choice([b"\x89PNG\r\n\x1a\n", b"\x1f\x8b\x08\x00", b"PK\x03\x04", b""]) + rng.randbytes(300)
    if how == "utf16":
        return data.decode("utf-8", "replace").encode("utf-16")
    if how == "nul":
        return data[:pos] + b"\x00" * rng.randint(1, 5) + data[pos:]
    if how == "long":
        return data[:pos] + b"y" * 150_000 + data[pos:]
    return data.replace(b"\n", b"\r")


def data_case(rng: random.Random, i: int, root: Path, ctx: dict) -> Case:
    fmt = rng.choice(list(FORMATS))
    ext = rng.choice(EXTS[fmt])
    path = root / f"case{i}.{ext}"
    recs = [base_record(rng, fmt) for _ in range(rng.randint(2, 6))]
    for _ in range(rng.choice([0, 1, 1, 2])):
        j = rng.randrange(len(recs))
        recs[j] = mutate_record(rng, recs[j], fmt)
    if ext == "parquet" and rng.random() < 0.4:
        recs = typed_columns(rng, recs, fmt)
    data = serialize(rng, ext, recs, path)
    if rng.random() < 0.55 or data == b"":
        data = mutate_bytes(rng, data, ext)
    path.write_bytes(data)
    skip = rng.random() < 0.3
    opts = [f"data.format={fmt}", f"data.on_error={'skip' if skip else 'raise'}"]
    stage = FORMATS[fmt]
    if i % 3 == 0 and stage is not None:
        argv = ["train", stage, *opts, *_train_opts(stage, fmt, ctx), f"data.path={path}"]
    else:
        argv = ["data", "prepare", str(path), "--out", str(root / f"out{i}"), "--overwrite", "data.val_fraction=0",
                *opts]
    return Case(argv, [str(path)], "data", skip)


def _train_opts(stage: str, fmt: str, ctx: dict) -> list[str]:
    opts = ["model.name=llama-tiny", f"tokenizer={ctx['tokenizer']}", f"train.output_dir={ctx['runs']}"]
    return opts + (["loss=kto"] if fmt == "kto" else [])


# ------------------------------------------------------------------------------------------ config values
DATA_KEYS = ["data.format", "data.txt_mode", "data.columns", "data.val_path", "data.val_fraction", "data.split_seed",
             "data.max_records", "data.on_error", "data.clean.normalize", "data.clean.whitespace",
             "data.clean.min_chars", "data.clean.max_chars", "data.clean.dedup", "data.clean.near_dedup",
             "data.clean.near_dedup_threshold", "data.path", "out", "overwrite"]
VALUES = ["abc", "", "-1", "0", "1e400", "-1e400", ".nan", ".inf", "-.inf", "nan", "[1, 2]", "{a: 1}", "{", "[",
          "null", "~", "yes", "no", "0x1F", "1_000", "2.5", "9" * 400, "!!binary aGVsbG8=", "!!python/object:os.system x",
          "'quoted'", '"unterminated', "[" * 3000, "{a: " * 500, "a\x00b", "x" * 5000, "*alias", "&a [1]", "- 1",
          "key: value", "\udcff", "2020-01-01", "!!set {a, b}", "text", "classification", "1.5e3", "0.9999999999"]


def override_case(rng: random.Random, i: int, root: Path, good: Path) -> Case:
    key = rng.choice([*DATA_KEYS, "data.bogus", "data.clean.x", "datum.path", "data", "data.clean", "data.path.x"])
    value = rng.choice(VALUES)
    text = rng.choice([f"{key}={value}", f"{key}={value}", key + "=", "=" + value, f"{key}.={value}",
                       f"{key}..x={value}", f"--{key}={value}"])
    argv = ["data", "prepare", str(good), "--out", str(root / f"o{i}"), "--overwrite", text]
    return Case(argv, [text, *key_names(key)], "override")


def key_names(key: str) -> list[str]:
    """What may name ``key`` in an error: the key, a dotted prefix (``data.path`` for ``data.path.x``: the
    error is about data.path) or its field name (registries say "unknown format")."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 1, -1)] + [key, parts[-1] or key]


def _stage_config(rng: random.Random, stage: str, ctx: dict) -> dict:
    fmt = {"pretrain": "text", "sft": "alpaca", "classify": "classification", "dpo": "preference"}[stage]
    return {"stage": stage, "model": {"name": "llama-tiny"}, "tokenizer": ctx["tokenizer"],
            "data": {"path": [ctx["good"][fmt]], "format": fmt},
            "train": {"output_dir": ctx["runs"]}}


def _yaml_value(rng: random.Random):
    return rng.choice([None, -1, 0, 10**400, 1e400, float("nan"), "x", "", [], {}, [1, [2]], {"a": None}, True,
                       "\x00", "9" * 50, -(10**30), 1.5])


def yaml_case(rng: random.Random, i: int, root: Path, ctx: dict) -> Case:
    import yaml

    from lmwright.config import set_dotted

    stage = rng.choice(["pretrain", "sft", "classify", "dpo"])
    cfg = _stage_config(rng, stage, ctx)
    path = root / f"cfg{i}.yaml"
    key = rng.choice(ctx["keys"][stage])
    set_dotted(cfg, key, _yaml_value(rng))
    text = yaml.safe_dump(cfg, allow_unicode=True)
    names = key_names(key) + [key.split(".")[-2] if "." in key else key]  # "unknown method" for method.name
    if rng.random() < 0.25:  # broken or incomplete YAML: the file, or what the config then lacks
        names = [str(path), "data.path", "tokenizer", "stage", "unknown key"]
        text = rng.choice(["a: [1, 2\n", "stage: sft\n  bad: indent\n", "\tstage: sft\n", "- a\n- b\n", "42\n",
                           "? [a]\n: b\n", "1: x\nstage: sft\n", "data: {path: [" * 400 + "\n",
                           "stage: sft\nstage: dpo\n", "!!python/name:os.system\n", "data:\n  path: &a [*a]\n",
                           "\ufeffstage: sft\n", "{" * 3000 + "\n"])
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:
        data = data[: len(data) // 2] + rng.choice(BAD_BYTES) + data[len(data) // 2:]
        names = [str(path)]
    path.write_bytes(data)
    verb = rng.choice([["validate"], ["train", stage]])
    return Case([*verb, "-c", str(path)], names, "yaml")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from lmwright.config import iter_options
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer
    from lmwright.stages import STAGES

    root = tmp_path_factory.mktemp("fuzz-data")
    tok = root / "tok"
    texts = [f"{words(random.Random(k), 8)} {k}" for k in range(200)]
    train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1), tok)
    good = {}
    for fmt in ("text", "alpaca", "classification", "preference"):
        rng = random.Random(fmt)
        good[fmt] = str(root / f"good-{fmt}.jsonl")
        recs = [base_record(rng, fmt) for _ in range(8)]
        if fmt == "classification":
            recs = [{**r, "label": ["pos", "neg"][k % 2]} for k, r in enumerate(recs)]
        Path(good[fmt]).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    keys = {s: [k for k, *_ in iter_options(STAGES.get(s).Config) if not k.startswith(("stage",))]
            for s in ("pretrain", "sft", "classify", "dpo")}
    yield {"root": root, "tokenizer": str(tok), "good": good, "runs": str(root / "runs"), "keys": keys}
    _write_report()


@pytest.fixture
def no_model(monkeypatch, ctx):
    """Building a model or a run folder ends the case: the checks before it passed. Relative paths (``out=nan``)
    land in the fuzz's temporary folder, not in the checkout."""
    import lmwright.models
    from lmwright.engine.run import Run

    def reached(*a, **k):
        raise ReachedModel

    monkeypatch.chdir(ctx["root"])
    monkeypatch.setattr(lmwright.models, "build_model", reached)
    monkeypatch.setattr(Run, "create", classmethod(reached))
    monkeypatch.setattr(Run, "start", classmethod(reached))


def _run_cases(cases: list[Case], label: str) -> list[str]:
    bad = []
    for n, case in enumerate(cases):
        t = time.perf_counter()
        rc, err = run_cli(case.argv)
        STATS["seconds"] += time.perf_counter() - t
        verb = case.argv[0] if case.argv[0] != "data" else "data prepare"
        STATS[f"runs.{verb}"] += 1
        STATS[f"outcome.{'error' if rc == 2 else 'ok' if rc == 0 else rc}"] += 1
        STATS[f"cases.{label}"] += 1
        why = problem(case, rc, err)
        if why is not None:
            STATS["problems"] += 1
            STATS["tracebacks"] += why == "traceback"
            bad.append(f"[{label} {n}] {why}: {' '.join(a[:80] for a in case.argv)}\n{err[-1500:]}")
    return bad


def _write_report() -> None:
    report = {"harness": "tests/fuzz/test_fuzz_data_config.py", "seed": SEED, "cases": sum(v for k, v in STATS.items() if k.startswith("cases.")),
              "tracebacks": STATS["tracebacks"], "problems": STATS["problems"],
              "by_kind": {k[6:]: v for k, v in STATS.items() if k.startswith("cases.")},
              "runs": {k[5:]: v for k, v in STATS.items() if k.startswith("runs.")},
              "outcomes": {k[8:]: v for k, v in STATS.items() if k.startswith("outcome.")},
              "seconds_in_cli": round(STATS["seconds"], 1)}
    if os.environ.get("LMWRIGHT_FUZZ_REPORT"):
        Path(os.environ["LMWRIGHT_FUZZ_REPORT"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


# ------------------------------------------------------------------------------------------ tests
def test_baselines_reach_the_model(ctx, no_model):
    """The harness itself: a valid config and valid data pass every check, so a fuzz case that fails
    failed on what it broke."""
    for stage, fmt in (("pretrain", "text"), ("sft", "alpaca"), ("classify", "classification"),
                       ("dpo", "preference")):
        rc, err = run_cli(["train", stage, f"data.format={fmt}", f"data.path={ctx['good'][fmt]}",
                           *_train_opts(stage, fmt, ctx)])
        assert rc == "model", (stage, err[-2000:])
    rc, err = run_cli(["data", "prepare", ctx["good"]["text"], "--out", str(ctx["root"] / "base-out")])
    assert rc == 0, err


def test_fuzz_data_files(ctx, no_model):
    rng = random.Random(SEED)
    root = ctx["root"] / "files"
    root.mkdir()
    cases = [data_case(rng, i, root, ctx) for i in range(N_FILES)]
    bad = _run_cases(cases, "data_files")
    assert not bad, f"{len(bad)} of {len(cases)} cases went wrong:\n\n" + "\n\n".join(bad[:12])


def test_fuzz_config_values(ctx, no_model):
    rng = random.Random(SEED + 1)
    root = ctx["root"] / "configs"
    root.mkdir()
    cases = [override_case(rng, i, root, Path(ctx["good"]["text"])) for i in range(N_OVERRIDES)]
    cases += [yaml_case(rng, i, root, ctx) for i in range(N_YAML)]
    bad = _run_cases(cases, "config_values")
    assert not bad, f"{len(bad)} of {len(cases)} cases went wrong:\n\n" + "\n\n".join(bad[:12])
