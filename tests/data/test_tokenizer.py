"""Tokenizer training: AutoTokenizer loads it, special tokens, chat template, exact round-trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lmwright.data.chat import IM_END, render_prompt_ids, render_training_ids, stop_token_ids
from lmwright.data.tokenizer import TokenizerConfig, check_round_trip, train_tokenizer

TEXTS = ["The capital of Norland is Frostholm.", "北京是中国的首都。我们喜欢苹果。", "Привет, мир! Καλημέρα.",
         "  indented line\twith tab", "emoji 🙂 and café"]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_train_save_load(tmp_path, corpus, kind):
    train_tokenizer(corpus + TEXTS * 3, TokenizerConfig(type=kind, vocab_size=400, min_frequency=1, sentinels=4),
                    tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.mask_token == "<mask>"
    assert tok.convert_tokens_to_ids("<extra_id_3>") != tok.unk_token_id
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.chat_template and IM_END in tok.chat_template
    if kind != "wordpiece":  # WordPiece (BERT-style) does not keep whitespace, by design
        assert check_round_trip(tok, TEXTS) == []


def test_bpe_round_trips_unseen_scripts(tokenizer):
    """Byte-level BPE is lossless even for characters never seen in training."""
    assert check_round_trip(tokenizer, ["ქართული ენა", "日本語のテキスト", "한국어 🙂"]) == []


def test_chat_template_masks_assistant_tokens(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, labels = render_training_ids(tokenizer, msgs)
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == f"Hello{IM_END}4{IM_END}"
    _, last = render_training_ids(tokenizer, msgs, train_on="last")
    assert tokenizer.decode([t for t, lab in zip(ids, last) if lab != -100]) == f"4{IM_END}"
    # the serving prompt is exactly the training prefix up to the assistant's answer
    prompt = render_prompt_ids(tokenizer, msgs[:-1])
    assert ids[:len(prompt)] == prompt
    assert tokenizer.convert_tokens_to_ids(IM_END) in stop_token_ids(tokenizer)
