"""lm-eval harness integration: a local multiple-choice task through our LM wrapper (optional extra)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")


def test_local_lm_eval_task(tokenizer, tmp_path):
    from lmwright.eval import evaluate
    from lmwright.eval.lm_eval_bridge import lm_class
    from lmwright.models import ModelConfig, build_model

    build_model(ModelConfig(name="llama-tiny"), tokenizer=tokenizer, seed=0).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    rows = [{"question": f"Question {i}:", "choices": [" yes", " no"], "answer": i % 2} for i in range(4)]
    data = tmp_path / "tasks" / "mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    m = evaluate(tmp_path / "lm", "lm-eval:tiny_mc", tmp_path / "tasks")
    assert 0.0 <= m["acc"] <= 1.0
    # the wrapper's log-likelihood equals a hand computation through the model
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    lm = lm_class()(model, tokenizer)
    req = type("R", (), {"args": ("Question 0:", " yes")})()
    (ll, _), = lm.loglikelihood([req])
    ctx = tokenizer("Question 0:")["input_ids"]
    cont = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0], -1)
    want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    assert ll == pytest.approx(want, abs=1e-4)
