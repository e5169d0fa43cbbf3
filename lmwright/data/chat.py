"""Chat templates: how a conversation becomes the tokens a model is served and trained on.

The tokenizer's template (``tokenizer.chat_template``) is the single source of truth. The server renders
a request with ``render_prompt_ids`` (``apply_chat_template(..., add_generation_prompt=True)``); training
renders the whole conversation with ``render_training_ids``, the same ids as
``apply_chat_template(messages, tokenize=True)``, and marks the tokens the model must produce (labels;
-100 elsewhere). Every stage and the server go through these functions.

The loss mask, for any Jinja template (the model's own template is rendered, never re-implemented):

- a template with ``{% generation %}`` blocks (lmwright's ChatML, ``CHAT_TEMPLATE``) gives it directly
  (``return_assistant_tokens_mask``);
- any other template (Qwen, Llama-3, Gemma, Phi, Mistral, SmolLM2, ...): for each assistant message k,
  the prompt the server would feed, ``messages[:k]`` + generation prompt, must be a prefix of the
  rendering (text and token ids), and the turn is what follows up to and including the end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``), read from the rendering of
  ``messages[:k+1]``, which must agree with the full rendering up to there. The role header is in the
  prompt, so it is not trained; the newline a template writes after the end-of-turn token is not either.

What the template does is checked once per tokenizer (``template_info``, cached) on a probe conversation:
which token ends an assistant turn (``stop_token_ids`` returns it), and whether the template rewrites
earlier turns once later messages follow (Qwen3 drops past ``<think>`` reasoning and adds an empty
think block only to the last turn). For such a template, one sample cannot train several assistant
turns faithfully: ``render_training_ids`` raises ``HistoryRewriteError`` and ``render_training_samples``
(what SFT uses) splits the conversation into one sample per assistant turn, each exactly what the
server feeds at that turn plus the answer. ``train_on=last`` needs no split.

Errors are loud, never an all-zero mask: ``ConfigError`` for a template property (names the property
and the fix), ``DataError`` with ``reason`` ``empty_mask`` (no assistant turn to learn) or
``token_boundary`` (the served prompt's tokens would differ from the trained ones) for one conversation;
SFT drops and counts those (run.json). See docs/chat-templates.md.
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from lmwright.config import ConfigError
from lmwright.data.errors import DataError
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.chat")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TRAIN_ON = ("assistant", "last", "all")
# DataError reasons that concern one conversation: a stage drops it and counts it by reason
SKIPPABLE_REASONS = ("empty_mask", "token_boundary")

# ChatML. The assistant's content and its <|im_end|> are inside {% generation %} so that
# return_assistant_tokens_mask marks exactly the tokens the model must learn to produce.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_ANSWER = "Probe answer two"
# u/a/u/a, alternating (Mistral and Gemma templates refuse anything else), no system (Gemma-2 refuses it);
# the first answer carries reasoning the way Qwen3/DeepSeek data does, to reveal templates that drop it
_PROBE = [{"role": "user", "content": "Probe question one"},
          {"role": "assistant", "content": "<think>\nProbe reasoning\n</think>\n\nProbe answer one"},
          {"role": "user", "content": "Probe question two"},
          {"role": "assistant", "content": _PROBE_ANSWER}]
_PROBE_TOOL = {"type": "function", "function": {
    "name": "lmwright_probe_tool", "description": "A tool that shows whether the chat template renders tools.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string", "description": "any text"}},
                   "required": ["x"]}}}


class HistoryRewriteError(ConfigError):
    """The template renders an assistant turn differently once later messages follow it (Qwen3 drops
    earlier ``<think>`` reasoning), so the prompt served at a turn is not a prefix of the whole
    conversation: train one assistant turn per sample (``render_training_samples``) or ``train_on=last``."""


@dataclass(frozen=True)
class TemplateInfo:
    """What a chat template does, found by rendering a probe conversation (``template_info``)."""

    generation_blocks: bool  # has {% generation %}: the mask comes from return_assistant_tokens_mask
    end_of_turn: str | None  # the special token right after an assistant's content (None: the template has none)
    rewrites_history: str | None  # why the template rewrites earlier turns (None: it does not)


# per tokenizer: {(what, template): result}; weak so that a dropped tokenizer takes its entries with it
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(tokenizer, key: tuple, compute):
    try:
        per_tok = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no cache
        return compute()
    if key not in per_tok:
        per_tok[key] = compute()
    return per_tok[key]


def _template_of(tokenizer, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError as e:
        raise ConfigError(f"the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) has no usable chat "
                          f"template ({e}); use a tokenizer trained by `lmwright data tokenizer` (it adds ChatML) or "
                          f"add a chat_template to its tokenizer_config.json") from None


def _render(tokenizer, messages: list[dict], tools: list[dict] | None = None, generation_prompt: bool = False,
            template: str | None = None) -> str:
    """The template's text for ``messages``, exactly as ``apply_chat_template(tokenize=False)`` writes it."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        roles = "/".join(str(m.get("role")) for m in messages)
        raise DataError(f"the chat template refused a conversation ({roles}): {e}; fix the record or use a "
                        f"template that accepts these roles", reason="template_refused") from None


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text the way ``apply_chat_template(tokenize=True)`` makes them (no added
    specials: the template writes them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _around(text: str, i: int, n: int = 24) -> str:
    return f"{text[max(0, i - n):i]!r} | {text[i:i + n]!r}"


def _special_tokens(tokenizer) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}


def _first_special(tokenizer, text: str) -> str | None:
    """The special token that occurs first in ``text`` (the longest one where several start there)."""
    found = [(i, -len(t), t) for t in _special_tokens(tokenizer) if t and (i := text.find(t)) >= 0]
    return min(found)[2] if found else None


def _assistant_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant messages that can be trained: those with a prompt before them (an
    assistant message that opens a conversation is never generated by the served model)."""
    return [k for k, m in enumerate(messages) if m.get("role") == "assistant" and k > 0]


def _turn_end(turn: str, start: int, end_of_turn: str | None) -> int:
    """Where an assistant turn's trained text ends in its own rendering ``turn`` (the conversation up
    to that turn): after its last end-of-turn token, or at its last non-space character without one."""
    if end_of_turn:
        at = turn.rfind(end_of_turn, start)
        if at >= 0:
            return at + len(end_of_turn)
    return start + len(turn[start:].rstrip())


def _char_spans(tokenizer, messages: list[dict], turns: list[int], end_of_turn: str | None,
                tools: list[dict] | None = None, template: str | None = None) -> tuple[str, list[tuple[int, str, int]]]:
    """The rendering of ``messages`` and, per assistant turn k in ``turns``: (k, served prompt text, end of
    the turn's trained text); the trained text is ``full[len(prompt):end]``."""
    full = _render(tokenizer, messages, tools, template=template)
    spans = []
    for k in turns:
        prompt = _render(tokenizer, messages[:k], tools, generation_prompt=True, template=template)
        turn = _render(tokenizer, messages[:k + 1], tools, template=template)
        if not turn.startswith(prompt):
            raise ConfigError(
                f"the chat template's generation prompt is not how it starts assistant messages[{k}] (prompt: "
                f"{_around(prompt, len(prompt))}; turn: {_around(turn, len(prompt))}): the served prompt never "
                f"precedes the trained answer; supply a chat template whose assistant turn starts with its "
                f"generation prompt")
        if not full.startswith(prompt):
            raise HistoryRewriteError(
                f"the chat template rewrites earlier turns: messages[:{k}] + generation prompt is not a prefix "
                f"of the whole conversation's rendering (the template changes a message once later ones follow)")
        end = _turn_end(turn, len(prompt), end_of_turn)
        if full[:end] != turn[:end]:
            raise HistoryRewriteError(
                f"the chat template rewrites earlier turns: assistant messages[{k}] renders differently once "
                f"later messages follow (Qwen3's template drops past <think> reasoning)")
        if end <= len(prompt):
            raise ConfigError(f"the chat template renders nothing for assistant messages[{k}]: there is no answer to "
                              f"train on; check that the template renders the role 'assistant'")
        spans.append((k, prompt, end))
    return full, spans


def _probe(tokenizer, template: str) -> TemplateInfo:
    generation_blocks = bool(_GENERATION_BLOCK.search(template))
    try:
        prompt = _render(tokenizer, _PROBE[2:3], generation_prompt=True, template=template)
        turn = _render(tokenizer, _PROBE[2:4], template=template)
    except DataError as e:
        raise ConfigError(f"the chat template cannot render a plain user/assistant exchange: {e}") from None
    if not turn.startswith(prompt):
        raise ConfigError(f"the chat template's generation prompt ({_around(prompt, len(prompt))}) is not how it "
                          f"starts an assistant turn ({_around(turn, len(prompt))}): what the server feeds "
                          f"would differ from what is trained; fix add_generation_prompt in the template")
    at = turn.find(_PROBE_ANSWER, len(prompt))
    if at < 0:
        raise ConfigError("the chat template does not render the content of assistant messages; fix the template")
    end_of_turn = _first_special(tokenizer, turn[at + len(_PROBE_ANSWER):])
    if end_of_turn is None:
        log.warning("the chat template writes no special token after an assistant's answer (%r): the model cannot "
                    "learn to stop; generation stops at eos only", turn[at + len(_PROBE_ANSWER):][:20])
    rewrites = None
    if not generation_blocks:
        try:
            _char_spans(tokenizer, _PROBE, _assistant_turns(_PROBE), end_of_turn, template=template)
        except HistoryRewriteError as e:
            rewrites = f"{e}, in lmwright's probe conversation"
        except DataError as e:
            raise ConfigError(f"the chat template cannot render a two-turn user/assistant conversation: {e}") from None
    return TemplateInfo(generation_blocks, end_of_turn, rewrites)


def template_info(tokenizer, tools: list[dict] | None = None) -> TemplateInfo:
    """What the tokenizer's chat template does (``TemplateInfo``): probed once per tokenizer and template."""
    template = _template_of(tokenizer, tools)
    return _cached(tokenizer, ("info", template), lambda: _probe(tokenizer, template))


def check_tools(tokenizer, tools: list[dict] | None) -> None:
    """Raise ``ConfigError`` if ``tools`` are given and the chat template ignores them (the rendering of a
    probe conversation is the same with and without a tool)."""
    if not tools:
        return
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError(f"tools must be a list of tool/function JSON schemas (dicts), got {type(tools).__name__}")
    template = _template_of(tokenizer, tools)

    def renders_tools() -> bool:
        probe = _PROBE[:1]
        try:
            return _render(tokenizer, probe, [_PROBE_TOOL], template=template) != _render(tokenizer, probe,
                                                                                          template=template)
        except DataError:
            return False

    if not _cached(tokenizer, ("tools", template), renders_tools):
        raise ConfigError(f"the chat template of {tokenizer.name_or_path or 'this tokenizer'} does not support tools "
                          f"(it renders the same with and without them): drop the tools from the data, or use a model "
                          f"whose template renders tools (Qwen2.5/3, Llama-3.1+, Mistral v3) or supply such a template")


def _generation_config_eos(source) -> list[int]:
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "generation_config.json" if path.is_dir() else path
        if not path.is_file():
            return []
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError):
            return []
    else:
        eos = getattr(source, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...; ``<|im_end|>`` if the template shows none), eos, and the eos ids
    of ``generation_config``: a model folder or its ``generation_config.json``, or a ``GenerationConfig``
    (default: the tokenizer's own folder, when it has one)."""
    def compute() -> list[int]:
        try:
            end_of_turn = template_info(tokenizer).end_of_turn
        except ConfigError:  # no template, or one that cannot render a plain exchange: plain text generation
            end_of_turn = None
        vocab = tokenizer.get_vocab()
        ids = [vocab[t] for t in (end_of_turn, IM_END) if t in vocab][:1]
        source = generation_config
        if source is None and Path(str(tokenizer.name_or_path or "")).is_dir():
            source = tokenizer.name_or_path
        for i in [tokenizer.eos_token_id] + _generation_config_eos(source):
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    if generation_config is not None:
        return compute()
    return list(_cached(tokenizer, ("stop", str(tokenizer.chat_template), tokenizer.eos_token_id), compute))


def render_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn (what the server feeds); ``tools``:
    tool/function JSON schemas the template renders (``ConfigError`` if it cannot); default: the
    conversation's own ``tools`` attribute (a ``Conversation`` of the messages format carries them)."""
    tools = (tools if tools is not None else getattr(messages, "tools", None)) or None  # [] = no tools
    check_tools(tokenizer, tools)
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def _mask_from_generation_blocks(tokenizer, messages, tools, n_turns: int) -> tuple[list[int], list[tuple[int, int]]]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    if n_turns and not spans:
        raise ConfigError("the chat template's {% generation %} blocks mark no token of the assistant messages: "
                          "put each assistant's content and end-of-turn token inside {% generation %}")
    return ids, spans


def _token_end(tokenizer, ids: list[int], offsets: list[tuple[int, int]] | None, text: str, end: int,
               end_of_turn: str | None) -> int | None:
    """How many tokens of ``ids`` (the tokens of ``text``) cover ``text[:end]``; None if a token straddles
    ``end``. Offsets are exact after a special token; elsewhere the text up to ``end`` is encoded."""
    if offsets is not None and end_of_turn and text.endswith(end_of_turn, 0, end):
        stop = bisect.bisect_left(offsets, (end, -1))
        if stop and offsets[stop - 1][1] == end:
            return stop
    upto = _encode(tokenizer, text[:end])
    return len(upto) if ids[:len(upto)] == upto else None


def _mask_from_renderings(tokenizer, messages, turns, tools, info) -> tuple[list[int], list[tuple[int, int]]]:
    full, char_spans = _char_spans(tokenizer, messages, turns, info.end_of_turn, tools)
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]] if fast else None
    # what the server feeds before each turn, encoded in one batch
    served = tokenizer([prompt for _, prompt, _ in char_spans], add_special_tokens=False)["input_ids"]
    spans = []
    for (k, prompt, end), prompt_ids in zip(char_spans, served):
        if ids[:len(prompt_ids)] != list(prompt_ids):
            raise DataError(f"the tokens of the prompt served before assistant messages[{k}] are not a prefix of the "
                            f"conversation's tokens (the tokenizer merges the generation prompt with the start of "
                            f"the answer, {_around(full, len(prompt))}): trained tokens would differ "
                            f"from served ones", reason="token_boundary")
        stop = _token_end(tokenizer, ids, offsets, full, end, info.end_of_turn)
        if stop is None:
            raise DataError(f"assistant messages[{k}] does not end on a token boundary ({_around(full, end)})",
                            reason="token_boundary")
        for call in messages[k].get("tool_calls") or []:
            name = (call.get("function") or call).get("name")
            if name and name not in full[len(prompt):end]:
                raise ConfigError(f"the chat template does not render the tool_calls of assistant messages[{k}] "
                                  f"(no {name!r} in its turn): use a template that supports tool calls")
        spans.append((len(prompt_ids), stop))
    return ids, spans


def render_training_ids(tokenizer, messages: list[dict], train_on: str = "assistant",
                        tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation; labels are -100 outside the trained tokens.

    ``train_on``: ``assistant`` (every assistant turn), ``last`` (only the final assistant turn) or
    ``all`` (every token). A trained turn is its content and end-of-turn token(s), never the role header.
    With ``assistant``/``last``, messages after the last assistant turn (nothing to learn) are left out.
    ``tools``: tool/function JSON schemas for the template (default: ``messages.tools`` when the list
    carries them); assistant messages may carry OpenAI-style ``tool_calls``, and ``tool`` messages answer them.

    Raises ``DataError(reason="empty_mask")`` when there is no assistant turn to train on,
    ``HistoryRewriteError`` for several trained turns with a template that rewrites earlier ones
    (``render_training_samples`` splits them), ``ConfigError`` when the template cannot give a mask.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
    tools = (tools if tools is not None else getattr(messages, "tools", None)) or None  # [] = no tools
    check_tools(tokenizer, tools)
    if train_on == "all":
        ids = _encode(tokenizer, _render(tokenizer, messages, tools))
        return ids, list(ids)
    turns = _assistant_turns(messages)
    if not turns:
        raise DataError("the conversation has no assistant message after a prompt: nothing to train on "
                        f"(train_on={train_on}); add the answer or use train_on=all", reason="empty_mask")
    messages = messages[:turns[-1] + 1]
    if train_on == "last":
        turns = turns[-1:]
    info = template_info(tokenizer, tools)
    if info.generation_blocks:
        ids, spans = _mask_from_generation_blocks(tokenizer, messages, tools, len(turns))
        spans = spans[-1:] if train_on == "last" else spans
    else:
        if len(turns) > 1 and info.rewrites_history:
            raise HistoryRewriteError(f"{info.rewrites_history}. So a conversation with several assistant turns "
                                      f"cannot be trained as one sample: train one turn per sample "
                                      f"(render_training_samples, what sft does) or set train_on=last")
        ids, spans = _mask_from_renderings(tokenizer, messages, turns, tools, info)
    labels = [-100] * len(ids)
    for start, stop in spans:
        labels[start:stop] = ids[start:stop]
    return ids, labels


def render_training_samples(tokenizer, messages: list[dict], train_on: str = "assistant",
                            tools: list[dict] | None = None) -> list[tuple[list[int], list[int]]]:
    """``render_training_ids`` as a list of samples: one, or, with ``train_on=assistant`` and a template
    that rewrites earlier turns (Qwen3), one per assistant turn: the conversation up to that turn with
    only that turn trained, exactly what the server feeds at that turn followed by the answer."""
    tools = (tools if tools is not None else getattr(messages, "tools", None)) or None  # [] = no tools
    try:
        return [render_training_ids(tokenizer, messages, train_on, tools)]
    except HistoryRewriteError:
        if train_on != "assistant":
            raise
    return [render_training_ids(tokenizer, messages[:k + 1], "last", tools) for k in _assistant_turns(messages)]


def alpaca_to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    """An ``alpaca`` record as a conversation: optional system, user = instruction (+ "\\n" + input),
    assistant = output. The record's own ``system`` wins over ``system_prompt``; without ``output``
    (a prompt to answer) the conversation ends with the user turn."""
    msgs = []
    system = record.get("system") or system_prompt
    if system:
        msgs.append({"role": "system", "content": system})
    user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    msgs.append({"role": "user", "content": user})
    if record.get("output"):
        msgs.append({"role": "assistant", "content": record["output"]})
    return msgs
