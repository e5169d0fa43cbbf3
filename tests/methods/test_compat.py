"""``check_compat`` rejects impossible combinations at validate time, naming the option to change."""

from __future__ import annotations

import pytest

from lmwright.config import ConfigError, from_dict
from lmwright.methods import COMPAT, METHODS, MethodConfig, check_compat, compat_markdown
from lmwright.models import ModelConfig


def test_every_method_is_in_the_table_and_the_docs():
    md = compat_markdown()
    for name in METHODS.names():
        assert name in COMPAT
        assert f"`{name}`" in md


@pytest.mark.parametrize("method, model, task", [
    ("lora", "llama-tiny", "causal-lm"), ("dora", "gpt-tiny", "classification"), ("ia3", "t5-tiny", "seq2seq"),
    ("adapter", "bert-tiny", "masked-lm"), ("prefix", "llama-tiny", "causal-lm"), ("qat", "bert-tiny", "embedding"),
])
def test_valid_combinations_pass(method, model, task):
    check_compat(MethodConfig(name=method), ModelConfig(name=model), task)


def test_prefix_with_gradient_checkpointing_names_the_option():
    with pytest.raises(ConfigError, match="gradient_checkpointing=false"):
        check_compat(MethodConfig(name="prefix"), ModelConfig(name="llama-tiny"), "causal-lm",
                     gradient_checkpointing=True)


def test_quantized_base_needs_lora_or_dora():
    with pytest.raises(ConfigError, match="model.quantize=nf4.*method.name=lora"):
        check_compat(MethodConfig(name="full"), ModelConfig(name="llama-tiny", quantize="nf4"), "causal-lm")
    check_compat(MethodConfig(name="lora"), ModelConfig(name="llama-tiny", quantize="nf4"), "causal-lm")


def test_missing_targets_list_the_models_linear_modules():
    with pytest.raises(ConfigError, match=r"method.targets \['query'\].*q_proj.*v_proj"):
        check_compat(MethodConfig(name="lora", targets=["query"]), ModelConfig(name="llama-tiny"), "causal-lm")
    check_compat(MethodConfig(name="lora", targets="q_proj,v_proj"), ModelConfig(name="llama-tiny"), "causal-lm")


def test_unsupported_task_and_family():
    with pytest.raises(ConfigError, match="masked-lm task"):
        check_compat(MethodConfig(name="prompt"), ModelConfig(name="bert-tiny"), "masked-lm")
    with pytest.raises(ConfigError, match="seq2seq task"):
        check_compat(MethodConfig(name="adapter"), ModelConfig(name="t5-tiny"), "seq2seq")
    with pytest.raises(ConfigError, match="gpt2 model family"):
        check_compat(MethodConfig(name="qat"), ModelConfig(name="gpt-tiny"), "causal-lm")


def test_freeze_more_blocks_than_the_model_has():
    with pytest.raises(ConfigError, match="method.freeze_last_n"):
        check_compat(MethodConfig(name="freeze", freeze_last_n=5), ModelConfig(name="llama-tiny"), "causal-lm")


def test_unknown_method_suggests_the_closest():
    with pytest.raises(KeyError, match="Did you mean 'lora'"):
        check_compat(MethodConfig(name="lorra"), ModelConfig(name="llama-tiny"), "causal-lm")


def test_config_from_yaml_values():
    cfg = from_dict(MethodConfig, {"name": "lora", "targets": "all-linear", "qat_bits": 4, "r": "16"})
    assert cfg.targets == "all-linear" and cfg.qat_bits == 4 and cfg.r == 16
    cfg = from_dict(MethodConfig, {"targets": ["q_proj", "v_proj"]})
    assert cfg.targets == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="adapter_placement"):
        from_dict(MethodConfig, {"adapter_placement": "middle"})
