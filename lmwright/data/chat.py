"""The default chat template and the helpers that turn conversations into training tokens.

The template is stored in the tokenizer (``tokenizer.chat_template``) and is the single source of
truth: SFT renders conversations with ``apply_chat_template`` and takes the loss mask from the
template's ``{% generation %}`` blocks; the server renders requests with the same call and
``add_generation_prompt=True``. A test proves both produce the same token ids.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

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


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: ``<|im_end|>`` (if present) and eos."""
    ids = []
    im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def render_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn (what the server feeds)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def render_training_ids(tokenizer, messages: list[dict], train_on: str = "assistant"
                        ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation; labels are -100 outside the trained tokens.

    ``train_on``: ``assistant`` (every assistant turn), ``last`` (only the final assistant turn) or
    ``all`` (every token).
    """
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    if train_on == "all":
        return ids, list(ids)
    if train_on == "last":
        # keep only the final contiguous run of assistant tokens
        last_start = None
        for i in range(len(mask)):
            if mask[i] and (i == 0 or not mask[i - 1]):
                last_start = i
        mask = [1 if (last_start is not None and i >= last_start and mask[i]) else 0 for i in range(len(mask))]
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return ids, labels


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
