"""``lmwright.load`` (and so ``lmwright serve`` / ``chat`` / the web UI) builds a model the way the folder's
``lmwright.json`` says it was trained, with the loader every other command uses (``load_trained``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def lora_classifier(tmp_path_factory, tokenizer):
    """A LoRA adapter folder trained for 3-way classification (no config.json: nothing to guess a task from)."""
    from lmwright.methods import MethodConfig, apply_method, save_trained
    from lmwright.models import ModelConfig, build_model
    from tests.serve.conftest import scramble

    root = tmp_path_factory.mktemp("lora-cls")
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    base = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = build_model(ModelConfig(name=str(root / "base")), task="classification", tokenizer=tokenizer, seed=0,
                        num_labels=3, id2label=labels)
    model = apply_method(model, MethodConfig(name="lora", targets=["q_proj", "v_proj"]), "classification")
    scramble(model, std=0.2, seed=1)  # non-zero LoRA B and a distinctive head: logits tell a wrong load apart
    save_trained(model, MethodConfig(name="lora"), root / "adapter", tokenizer, base_path=root / "base",
                 task="classification")
    assert not (root / "adapter" / "config.json").exists()
    return root / "adapter"


def test_lora_classifier_loads_with_its_trained_head(lora_classifier):
    import lmwright
    from lmwright.methods import load_trained

    m = lmwright.load(lora_classifier)
    assert m.task == "classification"
    ref, tok = load_trained(lora_classifier)
    texts = ["a good day", "a bad day"]
    enc = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        probs = torch.softmax(ref(**enc).logits.float(), dim=-1)  # (2, 3)
    got = m.classify(texts)
    assert [g["label"] for g in got] == [["neg", "neutral", "pos"][int(k)] for k in probs.argmax(-1)]
    for g, p in zip(got, probs):
        assert [g["scores"][k] for k in ("neg", "neutral", "pos")] == pytest.approx(p.tolist(), abs=1e-5)


def test_the_folder_task_is_the_metadata_task(lora_classifier, lm_dir):
    from lmwright.methods.base import trained_task

    assert trained_task(lora_classifier) == "classification"
    assert trained_task(lm_dir) == "causal-lm"  # a plain Hugging Face folder: its architecture says
