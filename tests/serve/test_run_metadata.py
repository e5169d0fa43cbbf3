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
    from lmwright.models.introspect import trained_task

    assert trained_task(lora_classifier) == "classification"
    assert trained_task(lm_dir) == "causal-lm"  # a plain Hugging Face folder: its architecture says


# ------------------------------------------------------------------------------------------- pooling
@pytest.fixture(scope="module")
def cls_embedder(tmp_path_factory, tokenizer):
    """An encoder saved as a contrastive run with ``contrastive.pooling=cls`` saves it: lmwright.json + the
    sentence-transformers layout."""
    from lmwright.models import ModelConfig, build_model
    from lmwright.objectives.contrastive import write_sentence_transformers
    from lmwright.stages.common import save_final
    from tests.serve.conftest import scramble

    out = tmp_path_factory.mktemp("cls-embedder") / "final"
    model = build_model(ModelConfig(name="bert-tiny"), task="embedding", tokenizer=tokenizer, seed=0)
    scramble(model, std=0.2)  # the first token's state differs clearly from the mean
    save_final(model, tokenizer, out, "embedding", extra={"objective": "contrastive", "pooling": "cls"})
    write_sentence_transformers(out, model.config.hidden_size, "cls", 128)
    return out


def _cls_vectors(folder, texts):
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        h = model(**enc).last_hidden_state  # (B, T, D)
    return torch.nn.functional.normalize(h[:, 0], dim=-1)


def test_every_embedding_path_uses_the_trained_pooling(cls_embedder):
    """`lmwright embed`, lmwright.load().embed, /v1/embeddings and `lmwright eval --task retrieval` give the
    vectors of the pooling the model was trained with (they used to mean-pool a cls model, all but the CLI)."""
    import json
    import urllib.request

    import lmwright
    from lmwright.models.pooling import read_pooling
    from lmwright.objectives.contrastive import embed_texts
    from tests.serve.conftest import running_server

    assert read_pooling(cls_embedder) == "cls"
    texts = ["The red fox runs to the river.", "a dog", "Anna gives the bread to Ben."]
    want = _cls_vectors(cls_embedder, texts)  # (3, D)
    e = lmwright.load(str(cls_embedder), task="embedding")  # what `lmwright embed` loads
    model, tok, pooling = e.model, e.tokenizer, e.pooling
    assert torch.allclose(embed_texts(model, tok, texts, pooling), want, atol=1e-5)  # lmwright embed
    m = lmwright.load(cls_embedder, name="cls")
    assert torch.allclose(torch.tensor(m.embed(texts)), want, atol=1e-5)
    with running_server({"cls": m}) as (url, _):
        req = urllib.request.Request(f"{url}/v1/embeddings", json.dumps({"model": "cls", "input": texts}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            served = [d["embedding"] for d in json.loads(r.read())["data"]]
    assert torch.allclose(torch.tensor(served), want, atol=1e-5)


def test_retrieval_eval_uses_the_trained_pooling(cls_embedder, tmp_path, monkeypatch):
    import json

    from lmwright.eval import evaluate, retrieval

    rows = [{"anchor": "The red fox runs to the river.", "positive": "a dog"},
            {"anchor": "a dog", "positive": "Anna gives the bread to Ben."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real = retrieval.retrieval_metrics
    monkeypatch.setattr(retrieval, "retrieval_metrics", lambda sim, relevant, *a: seen.append(sim) or real(sim, relevant))
    evaluate(cls_embedder, "retrieval", data, fmt="pairs")
    q = _cls_vectors(cls_embedder, [r["anchor"] for r in rows])
    d = _cls_vectors(cls_embedder, ["a dog", "Anna gives the bread to Ben."])  # the corpus, in first-seen order
    assert torch.allclose(torch.as_tensor(seen[0]), q @ d.T, atol=1e-5)
