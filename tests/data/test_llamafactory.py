"""The data users already have: ShareGPT conversations with tool calls, OpenAI messages with tool_calls,
preference pairs in ShareGPT / OpenAI / alpaca form, KTO's unpaired labelled replies, and LLaMA-Factory's
dataset_info.json registry (columns, tags, formatting, ranking). Hand-written records, malformed ones
(errors name file:line and field), and the real LLaMA-Factory demo files when ../shared/data has them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmwright.data import FORMATS, DataError, load_records, prepare, read_records
from lmwright.data.config import DataConfig

W = "data/train.json:17"
LF = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "llamafactory"
needs_lf = pytest.mark.skipif(not (LF / "dataset_info.json").is_file(), reason="needs ../shared/data/llamafactory")

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_TOOL = {"type": "function", "function": TOOL}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
GLAIVE = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                            {"from": "observation", "value": '{"temp": 3}'},
                            {"from": "gpt", "value": "It is 3 degrees."}],
          "tools": json.dumps([TOOL])}
CANON_TOOL_CHAT = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                {"role": "tool", "content": '{"temp": 3}'},
                                {"role": "assistant", "content": "It is 3 degrees."}],
                   "tools": [OPENAI_TOOL]}


def canon(fmt: str, record: dict) -> dict:
    out = FORMATS.get(fmt).canonicalize(record, W)
    assert FORMATS.get(fmt).canonicalize(out, W) == out  # canonical records are canonical (prepared folders)
    return out


def fails(fmt: str, record: dict, field: str, problem: str = "") -> str:
    with pytest.raises(DataError) as e:
        FORMATS.get(fmt).canonicalize(record, W)
    msg = str(e.value)
    assert msg.startswith(f"{W}: field '{field}'"), msg
    assert problem in msg, msg
    return msg


# ------------------------------------------------------------------------------------ messages + tools
def test_sharegpt_tool_conversation_becomes_openai_messages_with_tools():
    assert canon("messages", GLAIVE) == CANON_TOOL_CHAT
    assert canon("messages", {**GLAIVE, "tools": [TOOL]}) == CANON_TOOL_CHAT  # a list, not a JSON string
    assert canon("messages", {**GLAIVE, "tools": [OPENAI_TOOL]}) == CANON_TOOL_CHAT  # already OpenAI's form
    assert canon("messages", {**GLAIVE, "tools": "[]"})["tools"] == []
    assert canon("messages", {"conversations": GLAIVE["conversations"]})["tools"] == []
    text = FORMATS.get("messages").text_of(CANON_TOOL_CHAT)
    assert "get_weather" in text and "It is 3 degrees." in text  # the call is text too (dedup, length filters)


def test_openai_tool_calls_and_tool_results():
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": {"temp": 3}},
                        {"role": "assistant", "content": "3 degrees."}],
           "tools": [OPENAI_TOOL]}
    got = canon("messages", rec)
    assert got["messages"][1] == {"role": "user", "content": "Weather in Oslo?"}
    assert got["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", **CALL}]}
    assert got["messages"][3] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1"}
    assert got["tools"] == [OPENAI_TOOL]


def test_parallel_calls_system_column_and_alpaca_layout():
    two = dict(GLAIVE, conversations=[GLAIVE["conversations"][0],
                                      {"from": "function_call", "value": json.dumps([
                                          {"name": "get_weather", "arguments": {"city": "Oslo"}},
                                          {"name": "get_weather", "arguments": '{"city": "Rome"}'}])},
                                      *GLAIVE["conversations"][2:]])
    calls = canon("messages", two)["messages"][1]["tool_calls"]
    assert [c["function"]["arguments"]["city"] for c in calls] == ["Oslo", "Rome"]
    got = canon("messages", {**GLAIVE, "system": "You call tools."})
    assert got["messages"][0] == {"role": "system", "content": "You call tools."}
    sys_turn = {"conversations": [{"from": "system", "value": "Own."}, *GLAIVE["conversations"]], "system": "Column."}
    assert [m["content"] for m in canon("messages", sys_turn)["messages"][:1]] == ["Own."]  # the turn wins
    alpaca = {"instruction": "Add.", "input": "1 + 2", "output": "3", "history": [["hi", "hello"]]}
    assert canon("messages", alpaca)["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add.\n1 + 2"}, {"role": "assistant", "content": "3"}]


@pytest.mark.parametrize("change, field, problem", [
    ({1: {"from": "function_call", "value": "{name: get_weather}"}}, "conversations[1].value", "invalid JSON"),
    ({1: {"from": "function_call", "value": '{"arguments": {}}'}}, "conversations[1].value.name", "missing"),
    ({1: {"from": "function_call", "value": '{"name": "get_weather", "arguments": [1]}'}},
     "conversations[1].value.arguments", "must be an object"),
    ({1: {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'}}, "conversations[1]",
     "'get_time', which is not in tools"),
    ({3: {"from": "bot", "value": "x"}}, "conversations[3].from", "'bot' is not one of"),
    ({3: {"from": "gpt", "value": 7}}, "conversations[3].value", "must be a string"),
])
def test_bad_sharegpt_tool_records_name_the_field(change, field, problem):
    conv = [dict(t) for t in GLAIVE["conversations"]]
    for i, t in change.items():
        conv[i] = t
    fails("messages", {**GLAIVE, "conversations": conv}, field, problem)


@pytest.mark.parametrize("tools, field, problem", [
    ("[{", "tools", "invalid JSON"),
    (7, "tools", "must be a list"),
    ([{"description": "no name"}], "tools[0].name", "missing"),
    ([{"name": "f", "parameters": "x"}], "tools[0].parameters", "must be an object"),
])
def test_bad_tools_name_the_field(tools, field, problem):
    fails("messages", {**GLAIVE, "tools": tools}, field, problem)


def test_openai_tool_call_errors():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
            {"role": "assistant", "content": "a"}]
    fails("messages", {"messages": msgs}, "messages[1].tool_calls[0].name", "missing")
    msgs[1] = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    fails("messages", {"messages": msgs}, "messages[1].content", "image_url")


def test_alpaca_refuses_what_it_cannot_hold():
    fails("alpaca", {"instruction": "i", "output": "o", "history": [["q", "a"]]}, "history", "data.format=messages")
    fails("alpaca", {"instruction": "i", "output": "o", "tools": json.dumps([TOOL])}, "tools", "data.format=messages")
    assert canon("alpaca", {"instruction": "i", "output": "o", "history": [], "tools": ""})["instruction"] == "i"


# ------------------------------------------------------------------------------------ preference
def test_sharegpt_preference_pair():
    rec = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}],
           "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "What."}}
    assert canon("preference", rec) == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "What."}]}
    openai = {"messages": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello!"},
              "rejected": "What."}
    assert canon("preference", openai)["rejected"] == [{"role": "assistant", "content": "What."}]
    trl = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "What."}], "system": "Be kind."}
    assert canon("preference", trl)["prompt"][0] == {"role": "system", "content": "Be kind."}


def test_alpaca_ranking_pair_stays_text():
    assert canon("preference", {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}) == \
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    got = canon("preference", {"instruction": "Add.", "input": "2+2", "chosen": "4", "rejected": "5", "system": "S"})
    assert got["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add.\n2+2"}]


def test_bad_preference_records_name_the_field():
    conv = [{"from": "human", "value": "Hi"}]
    fails("preference", {"conversations": conv, "chosen": {"from": "human", "value": "x"}, "rejected": "y"},
          "chosen", "no assistant turn")
    fails("preference", {"conversations": conv, "chosen": {"from": "gpt", "value": "a"},
                         "rejected": {"from": "gpt", "value": "a"}}, "rejected", "identical to chosen")
    fails("preference", {"conversations": conv + [{"from": "gpt", "value": "a"}], "chosen": "b", "rejected": "c"},
          "conversations[1]", "the prompt ends with the assistant turn")
    fails("preference", {"conversations": conv, "chosen": "b"}, "rejected", "missing")
    fails("preference", {"conversations": conv, "chosen": "b", "rejected": "c", "tools": [TOOL]}, "tools",
          "do not keep tool schemas")


# ------------------------------------------------------------------------------------ kto
KTO_CANON = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}],
             "label": True}


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "label": True},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "label": True},
    {"prompt": "Hi", "completion": "Hello!", "label": True},
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}],
     "label": "true"},
    {"instruction": "Hi", "input": "", "output": "Hello!", "label": 1},
], ids=["llamafactory", "sharegpt", "trl-text", "trl-messages", "alpaca"])
def test_kto_forms(record):
    assert canon("kto", record) == KTO_CANON


def test_kto_multi_turn_prompt_and_false_label():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    got = canon("kto", {"messages": msgs, "label": False, "system": "S"})
    assert got["label"] is False and got["completion"] == msgs[3:]
    assert got["prompt"] == [{"role": "system", "content": "S"}] + msgs[:3]
    assert FORMATS.get("kto").text_of(got).endswith("d")


@pytest.mark.parametrize("record, field, problem", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "label", "missing"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "label": "maybe"},
     "label", "must be true or false"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"},
                   {"role": "user", "content": "?"}], "label": True}, "messages[2]", "the last turn is the user turn"),
    ({"messages": [{"role": "assistant", "content": "x"}], "label": True}, "messages", "only the reply"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": " "}], "label": True},
     "messages[3]", "the judged reply is empty"),
    ({"prompt": "Hi", "completion": "", "label": False}, "completion", "empty"),
])
def test_bad_kto_records_name_the_field(record, field, problem):
    fails("kto", record, field, problem)


# ------------------------------------------------------------------------------------ pipeline
def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def test_prepared_folder_keeps_tool_data(tmp_path):
    """Nested tool data survives prepare (JSON lines) and reads back identical, with the same hash."""
    data = _write(tmp_path / "glaive.json", [GLAIVE, dict(GLAIVE, conversations=GLAIVE["conversations"][:1] + [
        {"from": "gpt", "value": "No tool needed."}])])
    cfg = DataConfig(path=[str(data)], format="messages", val_fraction=0.0)
    man = prepare(cfg, tmp_path / "prep")
    train, _, man2 = load_records(DataConfig(path=[str(tmp_path / "prep")], format="messages"))
    assert train[0] == CANON_TOOL_CHAT and man2["sha256"] == man["sha256"]
    assert all(set(r) == {"messages", "tools"} for r in train)  # one schema: a table


def test_wrong_format_suggests_the_right_one(tmp_path):
    data = _write(tmp_path / "kto.json", [{"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "x"}], "label": True}])
    with pytest.raises(DataError, match=r"kto.json:2: .*set data.format=kto"):
        load_records(DataConfig(path=[str(data)], format="preference"))
    data = _write(tmp_path / "glaive.json", [GLAIVE])
    with pytest.raises(DataError, match=r"glaive.json:2: field 'tools'.*set data.format=messages"):
        load_records(DataConfig(path=[str(data)], format="alpaca"))


# ------------------------------------------------------------------------------------ dataset_info.json
@pytest.fixture
def registry(tmp_path) -> Path:
    """A LLaMA-Factory data folder: custom column names and role tags, as users write them."""
    tags = {"human": "u", "function_call": "call", "observation": "obs", "gpt": "a"}
    _write(tmp_path / "chat.json", [{"dialog": [{"speaker": tags[t["from"]], "text": t["value"]}
                                                for t in GLAIVE["conversations"]],
                                     "funcs": json.dumps([TOOL]), "sys": "Use tools."}])
    _write(tmp_path / "pairs.json", [{"question": "2+2?", "good": "4", "bad": "5"}] * 1
           + [{"question": "3+3?", "good": "6", "bad": "7"}])
    _write(tmp_path / "fb.json", [{"turns": [{"r": "user", "c": "Hi"}, {"r": "bot", "c": "Hey"}], "ok": False}])
    _write(tmp_path / "dataset_info.json", {
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "tools": "funcs", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "u", "assistant_tag": "a",
                          "function_tag": "call", "observation_tag": "obs"}},
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        "fb": {"file_name": "fb.json", "formatting": "sharegpt", "columns": {"messages": "turns", "kto_tag": "ok"},
               "tags": {"role_tag": "r", "content_tag": "c", "user_tag": "user", "assistant_tag": "bot"}},
        "hub": {"hf_hub_url": "someone/data"},
        "images": {"file_name": "chat.json", "columns": {"images": "img"}},
        "odd": {"file_name": "chat.json", "formatting": "xml"},
        "gone": {"file_name": "missing.json"},
        "first": {"file_name": "pairs.json", "ranking": True, "num_samples": 1,
                  "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
    })
    return tmp_path


def test_registry_columns_tags_and_formatting(registry):
    recs = list(read_records([f"{registry}/dataset_info.json:chat"]))
    assert recs[0].where == f"{registry}/chat.json:2"  # errors point at the data file
    got = canon("messages", recs[0].data)
    assert got == {"messages": [{"role": "system", "content": "Use tools."}] + CANON_TOOL_CHAT["messages"],
                   "tools": [OPENAI_TOOL]}
    pairs = [canon("preference", r.data) for r in read_records([f"{registry}:pairs"])]  # folder:name works too
    assert pairs[0] == {"prompt": "2+2?", "chosen": "4", "rejected": "5"} and len(pairs) == 2
    fb = canon("kto", next(iter(read_records([f"{registry}:fb"]))).data)
    assert fb == {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}],
                  "label": False}
    assert len(list(read_records([f"{registry}:first"]))) == 1  # num_samples


def test_registry_through_the_pipeline(registry):
    train, _, man = load_records(DataConfig(path=[f"{registry}/dataset_info.json:pairs"], format="preference",
                                            val_fraction=0.0))
    assert len(train) == 2 and man["sources"][0]["kind"] == "llamafactory"


@pytest.mark.parametrize("name, problem", [
    ("nope", "no data set 'nope'"),
    ("chatt", "did you mean 'chat'?"),
    ("hub", "field 'hub.file_name': missing (hf_hub_url=someone/data)"),
    ("images", "field 'images.columns.images': a multimodal data set"),
    ("odd", "field 'odd.formatting': 'xml' is not one of alpaca, sharegpt, openai"),
    ("gone", "field 'gone.file_name'"),
])
def test_registry_errors_name_the_entry(registry, name, problem):
    with pytest.raises(DataError) as e:
        list(read_records([f"{registry}/dataset_info.json:{name}"]))
    assert problem in str(e.value)
    if "field" in problem:  # the line of the entry in dataset_info.json
        line = next(i for i, t in enumerate((registry / "dataset_info.json").read_text().splitlines(), 1)
                    if t.strip().startswith(f'"{name}"'))
        assert str(e.value).startswith(f"{registry}/dataset_info.json:{line}: "), str(e.value)


def test_registry_without_a_name_and_in_a_folder(registry):
    with pytest.raises(DataError, match=r"a LLaMA-Factory registry, not data: .*dataset_info.json:<name> "
                                        r"\(local ones: chat, .*fb"):
        list(read_records([registry / "dataset_info.json"]))
    (registry / "other").mkdir()
    _write(registry / "other" / "a.json", [{"text": "x"}])
    _write(registry / "other" / "dataset_info.json", {"a": {"file_name": "a.json"}})
    assert [r.data for r in read_records([registry / "other"])] == [{"text": "x"}]  # the registry is not data


def test_registry_bad_role_tag_names_the_source_field(registry):
    _write(registry / "fb.json", [{"turns": [{"r": "user", "c": "Hi"}, {"r": "assistant", "c": "Hey"}], "ok": True}])
    with pytest.raises(DataError, match=re.escape(f"{registry}/fb.json:2: field 'turns[1].r': 'assistant' is not one "
                                                  "of the role tags")):
        list(read_records([f"{registry}:fb"]))


# ------------------------------------------------------------------------------------ the real files
@needs_lf
@pytest.mark.parametrize("path", ["glaive_toolcall_en_demo.json", "dataset_info.json:glaive_toolcall_en_demo"])
def test_real_glaive_toolcall(path):
    from collections import Counter

    recs = [canon("messages", r.data) for r in read_records([f"{LF}/{path}"])]
    assert len(recs) == 300
    roles = Counter(m["role"] for r in recs for m in r["messages"])
    calls = [m for r in recs for m in r["messages"] if m.get("tool_calls")]
    assert roles == {"user": 746, "assistant": 746 + 211, "tool": 211} and len(calls) == 211
    assert sum(bool(r["tools"]) for r in recs) == 191
    assert all(isinstance(c["tool_calls"][0]["function"]["arguments"], dict) for c in calls)
    assert all(t["type"] == "function" and t["function"]["name"] for r in recs for t in r["tools"])


@needs_lf
@pytest.mark.parametrize("path", ["dpo_en_demo.json", "dataset_info.json:dpo_en_demo"])
def test_real_dpo_pairs(path):
    recs = [canon("preference", r.data) for r in read_records([f"{LF}/{path}"])]
    assert len(recs) == 300
    assert sum(r["prompt"][0]["role"] == "system" for r in recs) == 80
    assert all(r["prompt"][-1]["role"] == "user" for r in recs)
    assert all(len(r["chosen"]) == len(r["rejected"]) == 1 and r["chosen"][0]["role"] == "assistant" for r in recs)


@needs_lf
@pytest.mark.parametrize("path", ["kto_en_demo.json", "dataset_info.json:kto_en_demo"])
def test_real_kto(path):
    recs = [canon("kto", r.data) for r in read_records([f"{LF}/{path}"])]
    assert len(recs) == 300 and sum(r["label"] for r in recs) == 150
    assert all(r["completion"][0]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in recs)
    assert sum(len(r["prompt"]) > 1 for r in recs) == 77  # multi-turn prompts


@needs_lf
def test_real_registry_alpaca_and_text_entries():
    alpaca = list(read_records([f"{LF}/dataset_info.json:alpaca_en_demo"]))
    assert len(alpaca) == 999 and canon("alpaca", alpaca[0].data)["instruction"]
    assert len([canon("text", r.data) for r in read_records([f"{LF}/dataset_info.json:wiki_demo"])]) == 30
    with pytest.raises(DataError, match="hf_hub_url"):
        list(read_records([f"{LF}/dataset_info.json:ultrachat_200k"]))
