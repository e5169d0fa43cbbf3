"""Typed config: YAML + overrides, unknown keys with suggestions, value errors naming the place."""

from __future__ import annotations

import pytest

from lmwright.config import ConfigError, load_config, options_table, parse_override, to_dict
from lmwright.stages.pretrain import PretrainConfig


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_files_and_overrides_merge(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  name: gpt-tiny\ntrain:\n  lr: 0.001\n  max_steps: 10\n")
    b = write(tmp_path, "b.yaml", "train:\n  max_steps: 20\n")
    cfg = load_config(PretrainConfig, [a, b], ["train.lr=5e-4", "data.path=[x.txt, y.txt]", "packing=false"])
    assert cfg.model.name == "gpt-tiny"
    assert cfg.train.max_steps == 20 and cfg.train.lr == pytest.approx(5e-4)
    assert cfg.data.path == ["x.txt", "y.txt"] and cfg.packing is False
    assert to_dict(cfg)["train"]["max_steps"] == 20


def test_unknown_key_suggests_and_names_file(tmp_path):
    f = write(tmp_path, "c.yaml", "train:\n  learning_rate: 0.1\n  max_step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, [f])
    msg = str(e.value)
    assert "c.yaml" in msg and "train.learning_rate" in msg
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        load_config(PretrainConfig, [], ["train.max_step=3"])
    with pytest.raises(ConfigError, match="override 'tokeniser=x'.*Did you mean 'tokenizer'"):
        load_config(PretrainConfig, [], ["tokeniser=x"])


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'train.max_steps' must be an integer"):
        load_config(PretrainConfig, [], ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="'train.mixed_precision' = 'fp8' is not one of"):
        load_config(PretrainConfig, [], ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        load_config(PretrainConfig, [], ["train.lr=0"])
    with pytest.raises(ConfigError, match="neither a preset nor an existing folder.*Did you mean 'llama-tiny'"):
        load_config(PretrainConfig, [], ["model.name=lama-tiny"])


def test_yaml_syntax_error_has_line(tmp_path):
    f = write(tmp_path, "bad.yaml", "train:\n  lr: [1, 2\n  x: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(PretrainConfig, [f])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, [tmp_path / "missing.yaml"])


def test_override_parsing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello world") == ("a", "hello world")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_options_table_lists_help():
    table = options_table(PretrainConfig)
    assert "| `train.lr` | float |" in table and "peak learning rate" in table


def test_yaml_booleans_map_to_literal_words():
    cfg = load_config(PretrainConfig, [], ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
