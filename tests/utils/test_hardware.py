"""``mixed_precision: auto`` picks bf16 only where it trains faster than fp32."""

from __future__ import annotations

import pytest
import torch

from lmwright.utils import hardware


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16"),  # AMX: ~1.6x faster
    ({"avx512f", "avx512_bf16"}, "no"),  # avx512_bf16 alone: 0.78-1.15x on tiny/demo models (bench/precision.py)
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
