"""Issue 14: task and family introspection has one home, ``lmwright.models.introspect``.

The two former ``model_family`` functions (stages.common's, of a ModelConfig: the raw model_type; methods.base's,
of a config or model: the family key) are ``model_type`` and ``model_family`` there, and both answer the same
for every way of naming a model: a transformers config, a model, a ModelConfig, a folder, a config.json dict
and an lmwright.json dict.
"""

from __future__ import annotations

import json

import pytest

TINY = {
    "llama": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32),
    "bert": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=32),
    "roberta": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=40),
    "t5": dict(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2),
}
CONFIG_CLASS = {"llama": "LlamaConfig", "bert": "BertConfig", "roberta": "RobertaConfig", "t5": "T5Config"}


def _config(model_type: str):
    import transformers as tf

    return getattr(tf, CONFIG_CLASS[model_type])(**TINY[model_type])


def _meta_model(config, task: str):
    import torch
    import transformers as tf

    from lmwright.models.introspect import TASK_CLASSES

    with torch.device("meta"):
        return getattr(tf, TASK_CLASSES[task]).from_config(config)


def _every_name_of(config, task: str, tmp_path):
    """The same model named every way model_type/model_family accept."""
    from lmwright.models import ModelConfig

    folder = tmp_path / "model"
    config.save_pretrained(str(folder))
    adapter = tmp_path / "adapter"  # an adapter folder: its lmwright.json names the base folder
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    meta = {"method": "lora", "task": task, "base": str(folder)}
    return {"config": config, "model": _meta_model(config, task), "ModelConfig": ModelConfig(name=str(folder)),
            "folder": folder, "folder (str)": str(folder),
            "config.json dict": json.loads((folder / "config.json").read_text()), "lmwright.json dict": meta}


@pytest.mark.parametrize("model_type, family, task", [
    ("llama", "llama", "causal-lm"), ("bert", "bert", "masked-lm"), ("roberta", "bert", "embedding"),
    ("t5", "t5", "seq2seq")])
def test_type_and_family_agree_for_every_way_of_naming_a_model(model_type, family, task, tmp_path):
    from lmwright.models.introspect import model_family
    from lmwright.models.introspect import model_type as type_of

    names = _every_name_of(_config(model_type), task, tmp_path)
    assert {k: type_of(v) for k, v in names.items()} == dict.fromkeys(names, model_type)
    assert {k: model_family(v) for k, v in names.items()} == dict.fromkeys(names, family)


def test_presets_and_adapter_folders(tmp_path):
    from lmwright.models import PRESETS, ModelConfig
    from lmwright.models.introspect import model_family, model_type

    for name, preset in PRESETS.items():
        assert model_type(ModelConfig(name=name)) == model_family(ModelConfig(name=name)) == preset["family"]
    adapter = tmp_path / "adapter"  # no config.json: its family is its base's, which the folder does not say
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert model_type(ModelConfig(name=str(adapter))) is None and model_family(adapter) is None
    assert model_type({"task": "causal-lm", "base": None}) is None  # a plain folder's lmwright.json


def test_family_keys_map_model_types():
    from lmwright.models.introspect import FAMILIES, model_family

    assert model_family({"model_type": "gemma3_text"}) == "gemma3"
    assert model_family({"model_type": "gemma3"}) == "gemma3-multimodal"
    assert model_family({"model_type": "opt"}) == "opt"  # no known family: its model_type
    assert {model_family({"model_type": f}) for f in FAMILIES if f != "gemma3"} == set(FAMILIES) - {"gemma3"}


@pytest.mark.parametrize("arch, task", [
    ("LlamaForCausalLM", "causal-lm"), ("GPT2LMHeadModel", "causal-lm"), ("BertForMaskedLM", "masked-lm"),
    ("T5ForConditionalGeneration", "seq2seq"), ("BartForConditionalGeneration", "seq2seq"),
    ("LlamaForSequenceClassification", "classification"), ("BertForSequenceClassification", "classification"),
    ("BertModel", "embedding"), ("T5EncoderModel", "embedding"), ("", "causal-lm")])
def test_task_from_arch(arch, task):
    from lmwright.models.introspect import task_from_arch

    assert task_from_arch(arch) == task


@pytest.mark.parametrize("task, model_type", [
    ("causal-lm", "llama"), ("masked-lm", "bert"), ("seq2seq", "t5"), ("classification", "llama"),
    ("reward", "llama"), ("embedding", "bert")])
def test_each_task_class_is_read_back_as_its_task(task, model_type):
    """TASK_CLASSES builds a model whose class says its task (a reward model is a 1-label classifier: only
    lmwright.json tells them apart)."""
    from lmwright.models.introspect import TASK_CLASSES, task_of, task_of_model

    model = _meta_model(_config(model_type), task)
    expected = "classification" if task == "reward" else task
    assert task_of_model(model) == expected
    assert task_of({}, {"architectures": [type(model).__name__]}) == expected
    assert task_of({"task": task}, {"architectures": [type(model).__name__]}) == task
    assert set(TASK_CLASSES) == {"causal-lm", "masked-lm", "seq2seq", "classification", "reward", "embedding"}


def test_task_of_a_peft_wrapped_model():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lmwright.models.introspect import task_of_model, unwrap

    base = tf.LlamaForSequenceClassification(_config("llama"))
    wrapped = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
    assert unwrap(wrapped) is base and unwrap(base) is base
    assert task_of_model(wrapped) == "classification"


def test_trained_task_of_a_folder(tmp_path):
    from lmwright.models.introspect import trained_task

    folder = tmp_path / "m"
    _config("bert").save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    assert trained_task(folder) == "masked-lm"  # the architecture says
    (folder / "lmwright.json").write_text(json.dumps({"task": "reward"}))
    assert trained_task(folder) == "reward"  # lmwright.json wins
    empty = tmp_path / "adapter"
    empty.mkdir()
    assert trained_task(empty) == "causal-lm"  # nothing says: a causal LM
