"""Issue 14: one writer of what lmwright adds to a model folder (``lmwright.models.meta.write_meta``):
``lmwright.json``, a causal LM's ``generation_config.json`` and a classifier's ``id2label``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lmwright"


def _tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from lmwright.data.synthetic import chat_task, iter_texts, story_corpus
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    texts = story_corpus(60, seed=1) + list(iter_texts(chat_task(20, seed=3)))
    train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2), tmp_path / "tok")
    return AutoTokenizer.from_pretrained(str(tmp_path / "tok"))


def test_causal_lm_gets_lmwright_json_and_generation_config(tmp_path):
    from lmwright.data.chat import stop_token_ids
    from lmwright.models.meta import GENERATION_FILE, META_FILE, read_meta, write_meta

    tok = _tiny_tokenizer(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    meta = {"task": "causal-lm", "method": "full", "base": None, "stage": "sft"}
    assert write_meta(out, meta, tokenizer=tok) == meta
    assert (out / META_FILE).read_text(encoding="utf-8") == json.dumps(meta, indent=2)
    assert read_meta(out) == meta
    gc = json.loads((out / GENERATION_FILE).read_text())
    assert gc["eos_token_id"] == stop_token_ids(tok) and gc["pad_token_id"] == tok.pad_token_id
    assert (gc["do_sample"], gc["temperature"], gc["top_p"], gc["max_new_tokens"]) == (True, 0.8, 0.95, 128)
    assert sorted(p.name for p in out.iterdir()) == [GENERATION_FILE, META_FILE]


def test_generation_config_keeps_the_source_sampling_and_adds_stops(tmp_path):
    from transformers import GenerationConfig

    from lmwright.data.chat import stop_token_ids
    from lmwright.models.meta import GENERATION_FILE, write_generation_config

    tok = _tiny_tokenizer(tmp_path)
    src = tmp_path / "src"
    GenerationConfig(do_sample=True, temperature=0.5, top_k=7, eos_token_id=63).save_pretrained(str(src))
    write_generation_config(tok, tmp_path / "out", source=src)
    gc = json.loads((tmp_path / "out" / GENERATION_FILE).read_text())
    assert (gc["temperature"], gc["top_k"]) == (0.5, 7)
    assert gc["eos_token_id"] == [63] + [s for s in stop_token_ids(tok) if s != 63]


def test_classifier_gets_id2label_and_no_generation_config(tmp_path):
    import transformers as tf

    from lmwright.models.meta import GENERATION_FILE, META_FILE, write_meta

    config = tf.BertConfig(id2label={0: "neg", 1: "pos"})
    out = tmp_path / "out"
    out.mkdir()
    got = write_meta(out, {"method": "lora", "task": "classification", "num_labels": 2}, config=config,
                     tokenizer=_tiny_tokenizer(tmp_path))
    assert got == {"method": "lora", "task": "classification", "num_labels": 2, "id2label": {"0": "neg", "1": "pos"}}
    assert json.loads((out / META_FILE).read_text()) == got
    assert not (out / GENERATION_FILE).exists()
    # other tasks carry no labels
    assert write_meta(out, {"task": "masked-lm"}, config=config) == {"task": "masked-lm"}


def _str_of_first(comp: ast.DictComp) -> bool:
    """Whether a dict comprehension over ``(k, v)`` pairs has the key ``str(k)``."""
    target, key = comp.generators[0].target, comp.key
    return isinstance(target, ast.Tuple) and isinstance(key, ast.Call) and ast.unparse(key.func) == "str" \
        and len(key.args) == 1 and ast.unparse(key.args[0]) == ast.unparse(target.elts[0])


def test_lmwright_writes_its_folder_files_in_one_place():
    """No module but models/meta.py writes lmwright.json or a generation config (model.save_pretrained of a
    model that carries one aside), nor serialises an id2label for a folder."""
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent)
        if rel.as_posix() == "lmwright/models/meta.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if call == "write_text" and ("META_FILE" in ast.unparse(node) or "lmwright.json" in ast.unparse(node)):
                bad.append(f"{rel}:{node.lineno} writes lmwright.json")
            if call == "save_pretrained" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in ("gc", "generation_config"):
                bad.append(f"{rel}:{node.lineno} saves a generation config")
            if isinstance(node, ast.DictComp) and "id2label.items()" in ast.unparse(node.generators[0].iter) \
                    and _str_of_first(node):  # {str(id): label}: JSON keys (readers turn them back into ints)
                bad.append(f"{rel}:{node.lineno} serialises id2label")
    assert not bad, "write these through lmwright.models.meta.write_meta:\n" + "\n".join(bad)
