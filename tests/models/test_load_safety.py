"""Issue 13: model.overrides cannot switch remote code or pickle loading on; .bin-only folders are refused."""

from __future__ import annotations

import pytest

from lmwright.config import ConfigError


def _tiny_folder(path, safetensors: bool):
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = tf.LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    if safetensors:
        model.save_pretrained(str(path))
    else:  # the layout of an old pickled checkpoint
        cfg.save_pretrained(str(path))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("key", ["trust_remote_code", "use_safetensors", "local_files_only"])
def test_overrides_refuse_loader_switches(key):
    from lmwright.config import from_dict
    from lmwright.models import ModelConfig

    with pytest.raises(ConfigError, match=f"overrides.{key}"):
        from_dict(ModelConfig, {"name": "llama-tiny", "overrides": {key: True}})


def test_load_model_refuses_trust_remote_code_even_without_check(tmp_path):
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model

    folder = _tiny_folder(tmp_path / "m", safetensors=True)
    cfg = ModelConfig(name=str(folder), overrides={"trust_remote_code": True})  # built in code: no check()
    with pytest.raises(ConfigError, match="remote code"):
        load_model(folder, model_cfg=cfg)


def test_bin_only_folder_gets_conversion_hint(tmp_path):
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model

    folder = _tiny_folder(tmp_path / "old", safetensors=False)
    with pytest.raises(ConfigError, match="safe_serialization=True") as e:
        load_model(folder, model_cfg=ModelConfig(name=str(folder), dtype="float32"))
    assert "pytorch_model.bin" in str(e.value)


def test_safetensors_folder_still_loads(tmp_path):
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model

    folder = _tiny_folder(tmp_path / "ok", safetensors=True)
    model = load_model(folder, model_cfg=ModelConfig(name=str(folder), dtype="float32",
                                                     overrides={"num_hidden_layers": 1}))
    assert model.config.num_hidden_layers == 1


def test_pickled_adapter_is_refused_with_a_peft_hint(tmp_path):
    """peft falls back to a pickled adapter_model.bin when adapter_model.safetensors is missing."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from lmwright.methods import load_trained
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model

    base = _tiny_folder(tmp_path / "base", safetensors=True)
    model = get_peft_model(load_model(base, model_cfg=ModelConfig(name=str(base), dtype="float32")),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    ad = tmp_path / "adapter"
    model.save_pretrained(str(ad))
    import torch

    torch.save(load_file(str(ad / "adapter_model.safetensors")), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="PeftModel.from_pretrained") as e:
        load_trained(ad, task="causal-lm")
    assert "adapter_model.bin" in str(e.value)
