"""Eval tasks: hand-checked metric maths, each task end to end on tiny models, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmwright.eval import evaluate


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    from lmwright.models import ModelConfig, build_model

    d = tmp_path_factory.mktemp("lm")
    build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------ classification
def test_classification_metrics_by_hand():
    from lmwright.eval.classification import classification_metrics

    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: a = 0.5 (P 1/2, R 1/2), b = 0.8 (P 2/3, R 1), c = 2/3 (P 1, R 1/2)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}


class _FakeTokenizer:
    """Encodes a text as its index in a fixed list, so the fake model's predictions are known."""

    def __init__(self, texts):
        self.texts = texts

    def __call__(self, batch, **_):
        ids = torch.tensor([[self.texts.index(t)] for t in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _FakeClassifier(torch.nn.Module):
    def __init__(self, preds, id2label):
        super().__init__()
        self.preds = preds
        self.config = type("C", (), {"id2label": id2label})()

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], len(self.config.id2label))
        for i, idx in enumerate(input_ids[:, 0].tolist()):
            logits[i, self.preds[idx]] = 1.0
        return type("O", (), {"logits": logits})()


def test_classification_task_labels_by_name():
    """Record labels are names (or ids) matched through id2label, whatever order the data uses."""
    from lmwright.eval.classification import Classification

    texts = ["t0", "t1", "t2", "t3", "t4", "t5"]
    records = [{"text": t, "label": lab} for t, lab in zip(texts, ["a", "a", "b", 1, "c", "c"])]
    model = _FakeClassifier([0, 1, 1, 1, 2, 0], {0: "a", 1: "b", 2: "c"})
    m = Classification().run(model, _FakeTokenizer(texts), records, batch_size=4)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    with pytest.raises(Exception, match="not a class of the model"):
        Classification().run(model, _FakeTokenizer(texts), [{"text": "t0", "label": "zebra"}])


def test_classification_end_to_end(tokenizer, tmp_path):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny"), task="classification", tokenizer=tokenizer, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, seed=0)
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"story number {i}", "label": ["neg", "pos"][i % 2]}
                                          for i in range(10)])
    m = evaluate(tmp_path / "clf", "classification", data)
    assert m["examples"] == 10 and 0 <= m["accuracy"] <= 1
    assert sum(map(sum, m["confusion_matrix"])) == 10


# ------------------------------------------------------------------------------------ perplexity
def test_perplexity_equals_per_document_loss(lm_dir, tokenizer, tmp_path):
    """Packed evaluation == the plain per-document next-token loss (documents fit one row)."""
    from transformers import AutoModelForCausalLM

    docs = ["Once upon a time there was a cat.", "The robot liked apples.", "A short one."]
    data = _jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    m = evaluate(lm_dir, "perplexity", data, seq_len=256)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    nll, n = 0.0, 0
    for d in docs:
        ids = torch.tensor([tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    assert m["tokens"] == n
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


# ------------------------------------------------------------------------------------ generation
def test_match_functions():
    from lmwright.eval.generation import contains_match, exact_match

    # the rule of lmwright.engine.metrics (tests/engine/test_metrics.py): surrounding whitespace only
    assert exact_match("  Paris ", "Paris") and not exact_match("Paris, France", "Paris")
    assert not exact_match("paris", "Paris")
    assert contains_match("It is Paris, France.", "Paris") and not contains_match("Lyon", "Paris")


def test_generation_scores_answers(lm_dir, tmp_path, monkeypatch):
    from lmwright.eval import generation

    seen = []

    def fake_answers(model, tokenizer, prompts, max_new_tokens=64):
        seen.extend(prompts)
        return ["Paris", "it is 4.", "blue"]

    monkeypatch.setattr(generation, "generate_answers", fake_answers)
    rows = [{"instruction": "Capital of France?", "output": "Paris "},
            {"instruction": "2+2?", "output": "4"},
            {"instruction": "Sky colour?", "input": "at night", "output": "black"}]
    m = evaluate(lm_dir, "generation", _jsonl(tmp_path / "qa.jsonl", rows), fmt="alpaca")
    assert m["exact_match"] == pytest.approx(1 / 3) and m["contains_match"] == pytest.approx(2 / 3)
    from lmwright.data.chat import render_prompt_ids
    from lmwright.models.load import load_tokenizer

    tok = load_tokenizer(lm_dir)
    assert seen[2] == render_prompt_ids(tok, [{"role": "user", "content": "Sky colour?\nat night"}])


def test_generation_real_decoding(lm_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    m = evaluate(lm_dir, "generation", _jsonl(tmp_path / "m.jsonl", rows), fmt="messages", max_new_tokens=4)
    assert m["examples"] == 1 and isinstance(m["samples"][0]["prediction"], str)


# ------------------------------------------------------------------------------------ preference
def test_preference_metrics_by_hand():
    from lmwright.eval.preference import preference_metrics

    m = preference_metrics([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0])
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and m["mean_margin"] == pytest.approx(-0.25)


def test_preference_policy_and_reward_are_antisymmetric(lm_dir, tokenizer, tmp_path):
    """Swapping chosen and rejected negates every margin: accuracy -> 1 - accuracy."""
    from lmwright.models import ModelConfig, build_model

    rows = [{"prompt": "Tell me a story.", "chosen": "Once upon a time.", "rejected": "No."},
            {"prompt": "Say hi", "chosen": "Hi there", "rejected": "Bye"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    reward = build_model(ModelConfig(name="llama-tiny"), task="reward", tokenizer=tokenizer, seed=1)
    reward.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    for model, kind in ((lm_dir, "policy log-prob"), (tmp_path / "rm", "reward")):
        a = evaluate(model, "preference", _jsonl(tmp_path / "a.jsonl", rows))
        b = evaluate(model, "preference", _jsonl(tmp_path / "b.jsonl", swapped))
        assert a["scored_by"] == kind and a["pairs"] == 3
        assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
        assert a["mean_margin"] == pytest.approx(-b["mean_margin"], abs=1e-5)


# ------------------------------------------------------------------------------------ retrieval
def test_retrieval_metrics_by_hand():
    from lmwright.eval.retrieval import retrieval_metrics

    sim = [[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.1, 0.5, 0.4]]
    m = retrieval_metrics(sim, [0, 1, 2], ks=(1, 2))
    # ranks of the relevant document: 0, 1, 1
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_retrieval_end_to_end(tokenizer, tmp_path):
    from lmwright.models import ModelConfig, build_model

    enc = build_model(ModelConfig(name="bert-tiny"), task="embedding", tokenizer=tokenizer, seed=0)
    enc.save_pretrained(tmp_path / "emb")
    tokenizer.save_pretrained(tmp_path / "emb")
    rows = [{"anchor": f"question {i}", "positive": f"answer {i}", "negative": "nothing"} for i in range(6)]
    rows.append({"anchor": "same text", "positive": "same text"})
    m = evaluate(tmp_path / "emb", "retrieval", _jsonl(tmp_path / "p.jsonl", rows), fmt="pairs")
    assert m["queries"] == 7 and m["corpus"] == 8 and 0 < m["mrr"] <= 1 and m["recall@10"] == 1.0


# ------------------------------------------------------------------------------------ cli + compare
def test_cli_eval_writes_json(lm_dir, tmp_path, capsys):
    from lmwright.cli import main

    data = _jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}])
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(lm_dir), "--task", "perplexity", "--data", str(data), "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert json.loads(out.read_text())["perplexity"] > 1
    assert main(["eval", "--model", str(lm_dir), "--task", "perplexty", "--data", str(data)]) == 2
    assert "Did you mean 'perplexity'" in capsys.readouterr().err


def test_generation_eval_prompts_are_the_sft_training_prompts():
    """`lmwright eval --task generation --data x.jsonl` asks what SFT trained on (it joined instruction and input
    with a blank line where SFT uses one newline: a prompt the model never saw)."""
    from lmwright.eval.generation import qa_pair
    from lmwright.stages.sft import conversations

    rec = {"instruction": "Who likes cake?", "input": "Iris likes cake.", "output": "Iris", "system": "Be brief."}
    prompt, ref = qa_pair(rec, "alpaca")
    assert prompt == conversations([rec], "alpaca")[0][:-1]
    assert ref == "Iris"


@pytest.mark.parametrize("rec", [
    {"instruction": "Who likes cake?", "input": "Iris likes cake.", "output": "Iris", "system": "Be brief."},
    {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
    {"instruction": "Repeat the words.", "input": "red fox", "output": "red fox", "system": ""}])
def test_alpaca_prompts_have_one_home(rec, monkeypatch):
    """SFT (data.chat.alpaca_to_messages), the align stages' prompts (dpo/ppo/grpo/distill) and eval --task
    generation build an alpaca record's prompt with the same function."""
    from lmwright.data import chat
    from lmwright.eval.generation import qa_pair
    from lmwright.stages._align import prompt_and_reference

    want = chat.alpaca_to_messages(rec)[:-1]
    assert qa_pair(rec, "alpaca") == (want, rec["output"])
    assert prompt_and_reference(rec, "alpaca") == (want, rec["output"])
    calls = []
    real = chat.alpaca_to_messages
    monkeypatch.setattr(chat, "alpaca_to_messages", lambda r, *a: calls.append(r) or real(r, *a))
    qa_pair(rec, "alpaca")
    prompt_and_reference(rec, "alpaca")
    assert len(calls) == 2
