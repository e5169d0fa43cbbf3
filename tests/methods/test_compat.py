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


# ------------------------------------------------------------------------------------------- families
def _config_folder(tmp_path, family: str, tokenizer):
    """A folder with only the config.json of a family model (all check_compat reads)."""
    from tests.families import family_config

    family_config(family, tokenizer).save_pretrained(tmp_path / family)
    return str(tmp_path / family)


@pytest.mark.parametrize("config_cls, family", [
    ("LlamaConfig", "llama"), ("MistralConfig", "mistral"), ("Qwen2Config", "qwen2"), ("Qwen3Config", "qwen3"),
    ("GemmaConfig", "gemma"), ("Gemma2Config", "gemma2"), ("Gemma3TextConfig", "gemma3"), ("Phi3Config", "phi3"),
    ("GPT2Config", "gpt2"), ("BertConfig", "bert"), ("RobertaConfig", "bert"), ("T5Config", "t5"),
    ("BartConfig", "bart"), ("Gemma3Config", "gemma3-multimodal"), ("OPTConfig", "opt")])
def test_model_family_of_each_config(config_cls, family):
    import transformers as tf

    from lmwright.models.introspect import model_family

    assert model_family(getattr(tf, config_cls)()) == family


def test_untested_family_is_refused_naming_the_supported_ones(tmp_path):
    import transformers as tf

    tf.OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"not tested on the opt model family.*gemma2.*qwen3"):
        check_compat(MethodConfig(name="lora"), ModelConfig(name=str(tmp_path)), "causal-lm")


def test_gemma2_without_sdpa_names_the_attention_option(tmp_path, tokenizer):
    folder = _config_folder(tmp_path, "gemma2", tokenizer)
    with pytest.raises(ConfigError, match="model.attn_implementation=eager"):
        check_compat(MethodConfig(name="lora"), ModelConfig(name=folder), "causal-lm")
    check_compat(MethodConfig(name="lora"), ModelConfig(name=folder, attn_implementation="eager"), "causal-lm")


def test_phi3_fused_projections_are_the_targets(tmp_path, tokenizer):
    folder = _config_folder(tmp_path, "phi3", tokenizer)
    # v_proj is a suffix of qkv_proj as a string but not a module peft would match: refused, like q_proj
    for wrong in (["q_proj", "v_proj"], ["v_proj"]):
        with pytest.raises(ConfigError, match=r"not found.*its linear modules are: down_proj, gate_up_proj, o_proj, "
                                              r"qkv_proj"):
            check_compat(MethodConfig(name="lora", targets=wrong), ModelConfig(name=folder), "causal-lm")
    check_compat(MethodConfig(name="lora", targets=["qkv_proj", "gate_up_proj"]), ModelConfig(name=folder), "causal-lm")
    check_compat(MethodConfig(name="ia3", targets=["mlp.down_proj"]), ModelConfig(name=folder), "causal-lm")


def test_gpt2_lm_head_folders_are_causal_lms():
    from lmwright.models.introspect import task_from_arch

    assert task_from_arch("GPT2LMHeadModel") == "causal-lm"
    assert task_from_arch("BertModel") == "embedding"


def test_methods_doc_is_the_generated_one():
    """docs/methods.md (COMPAT + the family matrix) is what scripts/gen_docs.py writes now."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gen_docs", root / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (root / "docs" / "methods.md").read_text(encoding="utf-8") == gen.methods_doc(), \
        "docs/methods.md is stale: run python scripts/gen_docs.py"


# ------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("model, task, targets", [
    ("llama-tiny", "causal-lm", ["q_proj", "v_proj"]), ("llama-tiny", "causal-lm", ["self_attn.q_proj"]),
    ("llama-tiny", "causal-lm", ["model.layers.0.mlp.down_proj"]), ("llama-tiny", "causal-lm", ["lm_head"]),
    ("llama-tiny", "causal-lm", ["mlp"]), ("llama-tiny", "causal-lm", ["self_attn"]),
    ("llama-tiny", "causal-lm", ["input_layernorm"]), ("llama-tiny", "causal-lm", ["norm"]),
    ("llama-tiny", "causal-lm", ["rotary_emb"]), ("llama-tiny", "causal-lm", ["embed_tokens"]),
    ("llama-tiny", "causal-lm", ["q_proj", "mlp"]), ("llama-tiny", "classification", ["score"]),
    ("llama-tiny", "classification", ["q_proj"]), ("gpt-tiny", "causal-lm", ["c_attn"]),
    ("gpt-tiny", "causal-lm", ["attn"]), ("bert-tiny", "classification", ["classifier"]),
    ("bert-tiny", "classification", ["query", "value"])])
def test_validate_accepts_exactly_the_targets_training_accepts(method, model, task, targets):
    """check_compat (``lmwright validate``) and apply (training) decide method.targets with one function: a
    suffix that names a block (mlp), a norm, the rotary embedding or the task head passed validation and
    failed at the start of training."""
    from lmwright.methods import apply_method
    from lmwright.models import build_model

    cfg = MethodConfig(name=method, targets=targets)

    def outcome(fn):
        try:
            fn()
            return "ok"
        except ConfigError as e:
            return f"ConfigError: {e}"
        except Exception as e:  # noqa: BLE001 - peft's own refusal is what validate must foresee
            return f"{type(e).__name__}: {e}"

    validated = outcome(lambda: check_compat(cfg, ModelConfig(name=model), task))
    extra = {"num_labels": 2} if task == "classification" else {}
    trained = outcome(lambda: apply_method(build_model(ModelConfig(name=model), task=task, vocab_size=64, **extra),
                                           cfg, task))
    assert (validated == "ok") == (trained == "ok"), (validated, trained)
    if trained != "ok":
        assert trained.startswith("ConfigError") and "method.targets" in trained, trained


def test_target_that_names_a_block_says_what_can_be_adapted():
    with pytest.raises(ConfigError, match=r"method.targets \['mlp'\].*LlamaMLP.*gate_proj"):
        check_compat(MethodConfig(name="lora", targets=["mlp"]), ModelConfig(name="llama-tiny"), "causal-lm")
