"""Tool calling through the OpenAI-compatible server (issue 12): a request's ``tools`` reach the chat
template exactly as in training, assistant ``tool_calls`` and ``tool`` results are accepted, calls in the
answer come back as ``tool_calls`` (the official openai client reads them), and what cannot work says so."""

from __future__ import annotations

import json
import shutil

import pytest

from lmwright.serve.toolcalls import parse_tool_calls
from tests.data.test_chat_templates import CHATML_DEFAULT_SYSTEM, TOOL

requests = pytest.importorskip("requests")

CONVO = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
    {"role": "user", "content": "And in Rome?"},
]


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', None,
     [("get_weather", {"city": "Rome"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}</tool_call>', "Let me check.",
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}]', None, [("get_weather", {"city": "Lima"})]),
    ('<tool_call>{"name": "send_email", "arguments": {}}</tool_call>', "same", []),  # a tool not offered
    ('{"answer": 42}', "same", []),
    ("It is sunny.", "same", []),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', "same", []),  # cut short
])
def test_parse_tool_calls(text, content, calls):
    rest, got = parse_tool_calls(text, [TOOL])
    assert rest == (text if content == "same" else content)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


@pytest.fixture(scope="module")
def tools_lm(tmp_path_factory, lm_dir):
    from transformers import AutoTokenizer

    from lmwright.serve.api import load

    d = tmp_path_factory.mktemp("tools_lm") / "m"
    shutil.copytree(lm_dir, d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = CHATML_DEFAULT_SYSTEM
    tok.save_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024  # rotary positions: the tools system turn is long in a 512-token vocab
    (d / "config.json").write_text(json.dumps(cfg))
    return load(d, name="tools")


@pytest.fixture(scope="module")
def url(tools_lm, lm):
    from tests.serve.conftest import running_server

    with running_server({"tools": tools_lm, "tiny": lm}) as (u, _app):
        yield u


def _chat(url, **body):
    return requests.post(f"{url}/v1/chat/completions", json={"max_tokens": 4, "temperature": 0, **body}, timeout=60)


def test_tools_and_tool_turns_render_as_in_training(url, tools_lm):
    from lmwright.data.chat import render_prompt_ids
    from lmwright.data.formats import tool_calls, tools_list

    r = _chat(url, model="tools", messages=CONVO, tools=[TOOL])
    assert r.status_code == 200, r.text
    trained = [dict(m) for m in CONVO]
    trained[1] = {"role": "assistant", "content": "",
                  "tool_calls": tool_calls(CONVO[1]["tool_calls"], "t", "tool_calls", from_json=False)}
    want = render_prompt_ids(tools_lm.tokenizer, trained, tools_list([TOOL], "t"))
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    assert "get_weather" in tools_lm.tokenizer.decode(want) and "<tool_response>" in tools_lm.tokenizer.decode(want)
    plain = _chat(url, model="tools", messages=CONVO)  # no tools offered: the template's plain system turn
    assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] < len(want)
    none = _chat(url, model="tools", messages=CONVO, tools=[TOOL], tool_choice="none")
    assert none.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("model, body, status, words", [
    ("tiny", {"tools": [TOOL]}, 400, "tools"),  # its template ignores tools
    ("tools", {"tools": [TOOL], "tool_choice": "required"}, 400, "not supported"),
    ("tools", {"tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "name"),
    ("tools", {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]},
                            {"role": "tool", "content": "x"}]}, 400, "messages[1].tool_calls"),
])
def test_tool_requests_that_cannot_work_get_a_clear_400(url, model, body, status, words):
    r = _chat(url, model=model, **{"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_calls_in_the_answer_come_back_as_tool_calls(url, monkeypatch):
    """The model's answer is fixed here (a random tiny model writes no calls); the server must turn it into
    OpenAI tool_calls that the official client parses."""
    openai = pytest.importorskip("openai")
    import lmwright.serve.handlers as handlers

    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'

    async def fixed(state, request, engine, ids, params):
        return [answer], ["stop"], [9], [[]], None

    monkeypatch.setattr(handlers, "guarded_choices", fixed)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.chat.completions.create(model="tools", messages=CONVO, tools=[TOOL], max_tokens=4)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    # without tools in the request the same text is plain content
    out = client.chat.completions.create(model="tools", messages=CONVO, max_tokens=4)
    assert out.choices[0].message.content == answer and not out.choices[0].message.tool_calls
