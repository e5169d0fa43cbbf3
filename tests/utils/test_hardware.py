"""``mixed_precision: auto`` picks bf16 only where it trains faster than fp32."""

from __future__ import annotations

import pytest
import torch

from lmwright.utils import hardware


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16"),  # AMX: ~1.6x faster
    ({"avx512f", "avx512_bf16"}, "no"),  # avx512_bf16 alone and no model to probe: fp32 (the probe: below)
    ({"avx2"}, "no"),  # no native bf16: ~3x slower
])
def test_auto_precision_on_cpu_follows_what_is_faster(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
    assert hardware.choose_mixed_precision("auto") == expected
    assert hardware.choose_mixed_precision("bf16") == "bf16"  # an explicit choice is kept
    assert hardware.choose_mixed_precision("no") == "no"


def test_describe_names_the_cpu_flags_that_decide_precision(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16", "sse4_2"})
    assert hardware.describe()["cpu_flags"] == ["avx512_bf16"]


# ------------------------------------------------------------- the probe on avx512_bf16 without AMX
@pytest.fixture
def probe_cpu(monkeypatch, tmp_path):
    """A CPU with avx512_bf16 and no AMX, a private cache folder and an empty in-process memo."""
    from lmwright.utils import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setenv("LMWRIGHT_CACHE", str(tmp_path))
    monkeypatch.setenv("LMWRIGHT_PRECISION_PROBE", "on")
    monkeypatch.setattr(precision, "_memo", {})
    return precision


def fake_timing(monkeypatch, precision, fp32_s: float, bf16_s: float) -> list:
    calls = []

    def timed(model, kwargs, bf16):
        calls.append(bf16)
        return bf16_s if bf16 else fp32_s

    monkeypatch.setattr(precision, "_time_step", timed)
    return calls


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.5, "bf16"), (1.0, 0.9, "no"), (1.0, 1.6, "no")])
def test_auto_follows_the_probe_on_the_model(monkeypatch, probe_cpu, tiny_llama, fp32_s, bf16_s, expected):
    fake_timing(monkeypatch, probe_cpu, fp32_s, bf16_s)
    assert hardware.choose_mixed_precision("auto", tiny_llama) == expected
    assert hardware.choose_mixed_precision("auto") == "no"  # nothing to probe: fp32
    assert hardware.choose_mixed_precision("no", tiny_llama) == "no"


def test_probe_result_is_cached_per_model_and_machine(monkeypatch, probe_cpu, tiny_llama):
    calls = fake_timing(monkeypatch, probe_cpu, 1.0, 0.5)
    first = probe_cpu.bf16_probe(tiny_llama)
    assert first["source"] == "measured" and first["speedup"] == 2.0 and len(calls) == 10  # 2 warm-ups + 3 each
    assert probe_cpu.bf16_probe(tiny_llama) is first  # the same process: memo
    monkeypatch.setattr(probe_cpu, "_memo", {})
    again = probe_cpu.bf16_probe(tiny_llama)  # a new process: the cache file
    assert again["source"] == "cache" and again["choice"] == "bf16" and len(calls) == 10
    for p in tiny_llama.parameters():  # another trainable set (LoRA vs full) is another model to the probe
        p.requires_grad_(False)
    next(tiny_llama.parameters()).requires_grad_(True)
    assert probe_cpu.bf16_probe(tiny_llama)["source"] == "measured" and len(calls) == 20


def test_probe_measures_without_side_effects(probe_cpu, tiny_llama):
    """Real timing: the training RNG, the gradients and the train/eval mode are as before."""
    tiny_llama.train()
    w = next(tiny_llama.parameters())
    w.grad = torch.full_like(w, 0.5)
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    result = probe_cpu.measure(tiny_llama, tokens=32)
    assert torch.equal(torch.rand(3), expected_next)
    assert tiny_llama.training and torch.equal(w.grad, torch.full_like(w, 0.5))
    assert all(p.grad is None for p in list(tiny_llama.parameters())[1:])
    assert result["fp32_s"] > 0 and result["bf16_s"] > 0 and result["choice"] in ("bf16", "no")


def test_probe_reaches_a_policy_inside_a_wrapper(tiny_llama):
    from lmwright.utils.precision import probe_target

    class PolicyWithValue(torch.nn.Module):
        def __init__(self, policy):
            super().__init__()
            self.policy, self.value_head = policy, torch.nn.Linear(4, 1)

    assert probe_target(PolicyWithValue(tiny_llama)) is tiny_llama
    assert probe_target(tiny_llama) is tiny_llama


def test_probe_can_be_switched_off(monkeypatch, probe_cpu, tiny_llama):
    calls = fake_timing(monkeypatch, probe_cpu, 1.0, 0.5)
    monkeypatch.setenv("LMWRIGHT_PRECISION_PROBE", "off")
    assert hardware.choose_mixed_precision("auto", tiny_llama) == "no" and calls == []


def test_probe_rows_fit_the_models_context(probe_cpu, tokenizer):
    """A model with a short context gets rows it can take (gpt-2 style learned positions would index out of range)."""
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="gpt-tiny"), "causal-lm", tokenizer=tokenizer, seed=0)
    model.config.n_positions = 32
    model.transformer.wpe = torch.nn.Embedding(32, model.config.n_embd)
    kwargs = probe_cpu._probe_inputs(model, 512)
    assert kwargs["input_ids"].shape == (16, 32)
    assert probe_cpu.measure(model, tokens=64)["fp32_s"] > 0


def test_a_probe_that_fails_means_fp32(monkeypatch, probe_cpu, tiny_llama, caplog):
    def broken(model, kwargs, bf16):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(probe_cpu, "_time_step", broken)
    with caplog.at_level("WARNING", logger="lmwright"):
        assert hardware.choose_mixed_precision("auto", tiny_llama) == "no"
    assert "could not run this model" in caplog.text
