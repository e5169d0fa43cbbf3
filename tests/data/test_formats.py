"""Every format: a valid record canonicalises; a malformed one fails naming file, line and field."""

from __future__ import annotations

import re

import pytest

from lmwright.data import FORMATS, DataError
from lmwright.data.formats import rename_columns

W = "data/train.jsonl:17"

VALID = {
    "text": ({"text": "hello", "extra": 1}, {"text": "hello"}),
    "alpaca": ({"instruction": "Add.", "input": "1 + 2", "output": "3"},
               {"system": "", "instruction": "Add.", "input": "1 + 2", "output": "3"}),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4", "name": "x"}]},
                 {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}], "tools": []}),
    "preference": ({"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                   {"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
    "classification": ({"text": "great film", "label": "positive"}, {"text": "great film", "label": "positive"}),
    "pairs": ({"anchor": "a cat", "positive": "a kitten", "score": "0.9"},
              {"anchor": "a cat", "positive": "a kitten", "negative": None, "score": 0.9}),
}

MALFORMED = {
    "text": ({"body": "x"}, "text", "missing"),
    "alpaca": ({"instruction": "Add."}, "output", "missing"),
    "messages": ({"messages": [{"role": "user", "content": "Hi"}]}, "messages", "no assistant turn"),
    "preference": ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    "classification": ({"text": "t", "label": True}, "label", "bool"),
    "pairs": ({"anchor": "a", "positive": ["not", "text"]}, "positive", "must be a string"),
}


def test_all_six_registered():
    assert set(FORMATS.names()) >= set(VALID)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_record(name):
    raw, want = VALID[name]
    fmt = FORMATS.get(name)
    got = fmt.canonicalize(raw, W)
    assert got == want
    assert fmt.canonicalize(got, W) == got  # canonical records are canonical (prepared folders re-read)
    assert fmt.text_of(got)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_record_names_file_line_field(name):
    raw, field, problem = MALFORMED[name]
    with pytest.raises(DataError) as e:
        FORMATS.get(name).canonicalize(raw, W)
    msg = str(e.value)
    assert msg.startswith(f"{W}: field '{field}'"), msg
    assert problem in msg


def test_alpaca_message_shape():
    with pytest.raises(DataError, match=r"^data/train.jsonl:17: field 'output': missing \(alpaca records need "
                                        r"instruction and output"):
        FORMATS.get("alpaca").canonicalize({"instruction": "x"}, W)


def test_alpaca_optional_system_and_empty_required():
    got = FORMATS.get("alpaca").canonicalize({"system": "S", "instruction": "I", "output": "O"}, W)
    assert got["system"] == "S" and got["input"] == ""
    with pytest.raises(DataError, match="field 'instruction': empty"):
        FORMATS.get("alpaca").canonicalize({"instruction": "  ", "output": "O"}, W)


@pytest.mark.parametrize("msgs, field", [
    ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}], "messages[1].content"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "messages[0].content"),
    ("hello", "messages"),
    ([], "messages"),
])
def test_messages_errors(msgs, field):
    with pytest.raises(DataError, match=re.escape(f"field '{field}'")):
        FORMATS.get("messages").canonicalize({"messages": msgs}, W)


def test_messages_tool_role_and_sharegpt():
    fmt = FORMATS.get("messages")
    got = fmt.canonicalize({"messages": [{"role": "user", "content": "time?"}, {"role": "tool", "content": "12:00"},
                                         {"role": "assistant", "content": "noon"}]}, W)
    assert [m["role"] for m in got["messages"]] == ["user", "tool", "assistant"]
    got = fmt.canonicalize({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, W)
    assert got == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   "tools": []}


def test_preference_messages_form_makes_all_lists():
    fmt = FORMATS.get("preference")
    got = fmt.canonicalize({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4",
                            "rejected": [{"role": "assistant", "content": "5"}]}, W)
    assert got["chosen"] == [{"role": "assistant", "content": "4"}]
    assert isinstance(got["prompt"], list) and isinstance(got["rejected"], list)
    with pytest.raises(DataError, match="field 'chosen': empty"):
        fmt.canonicalize({"prompt": "p", "chosen": "", "rejected": "r"}, W)
    with pytest.raises(DataError, match="field 'chosen': no assistant turn"):
        fmt.canonicalize({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}, W)


def test_classification_labels():
    fmt = FORMATS.get("classification")
    assert fmt.canonicalize({"text": "t", "label": 2}, W)["label"] == 2
    assert fmt.canonicalize({"text": "t", "label": 2.0}, W)["label"] == 2
    with pytest.raises(DataError, match="field 'label': 2.5 is not an integer"):
        fmt.canonicalize({"text": "t", "label": 2.5}, W)
    with pytest.raises(DataError, match="field 'label': missing"):
        fmt.canonicalize({"text": "t"}, W)


def test_pairs_score_and_negative():
    fmt = FORMATS.get("pairs")
    got = fmt.canonicalize({"anchor": "a", "positive": "b", "negative": "c", "score": 1}, W)
    assert got == {"anchor": "a", "positive": "b", "negative": "c", "score": 1.0}
    assert "c" in fmt.text_of(got)
    with pytest.raises(DataError, match="field 'score': must be a number"):
        fmt.canonicalize({"anchor": "a", "positive": "b", "score": "high"}, W)


def test_columns_mapping():
    raw = {"review": "lovely", "stars": 5, "id": 7}
    mapped = rename_columns(raw, {"review": "text", "stars": "label"})
    assert mapped == {"text": "lovely", "label": 5, "id": 7}
    assert FORMATS.get("classification").canonicalize(mapped, W) == {"text": "lovely", "label": 5}


def test_missing_field_lists_record_keys():
    with pytest.raises(DataError, match="the record has: question, answer"):
        FORMATS.get("alpaca").canonicalize({"question": "q", "answer": "a"}, W)


def test_unknown_format_suggests():
    with pytest.raises(KeyError, match="Did you mean 'alpaca'"):
        FORMATS.get("alpacca")
