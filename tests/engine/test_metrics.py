"""Answer metrics have one home (``lmwright.engine.metrics``): the SFT stage's held-out ``val_exact_match``
and ``lmwright eval --task generation`` score the same answers the same way."""

from __future__ import annotations

import pytest

from lmwright.engine.metrics import contains_match, exact_match

# (prediction, reference, exact, contains)
CASES = [
    ("Paris", "Paris", True, True),
    ("  Paris \n", "Paris", True, True),  # decoding leaves spaces/newlines at the ends: not a different answer
    ("Paris", " Paris ", True, True),
    ("paris", "Paris", False, False),  # case is part of the answer ("Write the word in capital letters.")
    ("HELLO", "hello", False, False),
    ("a  b", "a b", False, False),  # inner whitespace is part of the answer (code, JSON, word order)
    ("Paris, France", "Paris", False, True),
    ("It is 4.", "4", False, True),
    ("Lyon", "Paris", False, False),
]


@pytest.mark.parametrize("pred, ref, exact, contains", CASES)
def test_the_rule(pred, ref, exact, contains):
    assert exact_match(pred, ref) is exact
    assert contains_match(pred, ref) is contains


def test_eval_generation_uses_the_home():
    from lmwright.eval import generation

    assert generation.exact_match is exact_match and generation.contains_match is contains_match


def test_sft_and_eval_generation_score_the_same_answers(monkeypatch):
    """The same predictions against the same references: the stage's rate == the eval task's rate."""
    import torch

    from lmwright.data import chat
    from lmwright.engine import sampling
    from lmwright.eval import generation
    from lmwright.stages import sft

    preds = [p for p, *_ in CASES]
    refs = [r for _, r, *_ in CASES]
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": r}] for i, r in enumerate(refs)]

    class Tok:  # decodes the fake generated ids (one id = one prediction's index) to the prediction
        def decode(self, ids, skip_special_tokens=True):
            return preds[ids[0]]

    monkeypatch.setattr(chat, "render_prompt_ids", lambda tokenizer, messages, tools=None: [0])
    monkeypatch.setattr(sampling, "generate_batch",
                        lambda model, tok, prompts, n: [([i], True) for i in range(len(prompts))])
    stage_rate, answers = sft.exact_match(torch.nn.Linear(1, 1), Tok(), convs, max_new_tokens=4)
    assert answers == [p.strip() for p in preds]

    monkeypatch.setattr(generation, "generate_answers", lambda model, tok, prompts, max_new_tokens=64: list(preds))
    records = [{"messages": c} for c in convs]
    m = generation.Generation().run(None, None, records, fmt="messages")
    want = sum(e for *_, e, _ in CASES) / len(CASES)
    assert stage_rate == pytest.approx(want) and m["exact_match"] == pytest.approx(want)
    assert m["contains_match"] == pytest.approx(sum(c for *_, c in CASES) / len(CASES))
