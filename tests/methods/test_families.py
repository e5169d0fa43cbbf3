"""Smoke test of the COMPAT cells the contract matrix does not cover: GPT-2 (Conv1D layers) and T5
(encoder-decoder): apply, one forward/backward, a finite loss and gradients on the method's parameters."""

from __future__ import annotations

import pytest
import torch

from lmwright.methods import COMPAT, METHODS, MethodConfig, apply_method

CASES = {"gpt-tiny": ("gpt2", "causal-lm"), "t5-tiny": ("t5", "seq2seq")}


def _cells() -> list:
    return [pytest.param(m, preset, id=f"{m}-{preset}") for m in METHODS.names() for preset, (fam, task)
            in CASES.items() if fam in COMPAT[m]["families"] and task in COMPAT[m]["tasks"]]


@pytest.mark.parametrize("method, preset", _cells())
def test_method_trains_on_family(tokenizer, method, preset):
    from lmwright.models import ModelConfig, build_model

    _, task = CASES[preset]
    model = build_model(ModelConfig(name=preset, dtype="float32"), task=task, tokenizer=tokenizer, seed=0)
    model = apply_method(model, MethodConfig(name=method, r=4, num_virtual_tokens=4, encoder_hidden_size=16,
                                             adapter_size=8, freeze_last_n=1, qat_group_size=32), task)
    ids = torch.randint(5, len(tokenizer), (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
