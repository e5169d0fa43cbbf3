"""Smoke test of the encoder-decoder COMPAT cells the contract matrix does not cover (T5, BART): apply,
one forward/backward, a finite loss and gradients on the method's parameters. The decoder families
(GPT-2's Conv1D layers included) go through the whole contract in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from lmwright.methods import COMPAT, METHODS, MethodConfig, apply_method

CASES = {"t5-tiny": ("t5", "seq2seq"), "bart-tiny": ("bart", "seq2seq")}


def _cells() -> list:
    return [pytest.param(m, case, id=f"{m}-{case}") for m in METHODS.names() for case, (fam, task)
            in CASES.items() if fam in COMPAT[m]["families"] and task in COMPAT[m]["tasks"]]


def _model(case: str, tokenizer):
    from lmwright.models import ModelConfig, build_model

    if case == "bart-tiny":  # no preset: built from its transformers config
        import transformers as tf

        torch.manual_seed(0)
        config = tf.BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               decoder_start_token_id=tokenizer.eos_token_id)
        return tf.AutoModelForSeq2SeqLM.from_config(config)
    return build_model(ModelConfig(name=case, dtype="float32"), task="seq2seq", tokenizer=tokenizer, seed=0)


@pytest.mark.parametrize("method, case", _cells())
def test_method_trains_on_family(tokenizer, method, case):
    _, task = CASES[case]
    model = apply_method(_model(case, tokenizer), MethodConfig(name=method, r=4, num_virtual_tokens=4,
                                                               encoder_hidden_size=16, adapter_size=8,
                                                               freeze_last_n=1, qat_group_size=32), task)
    ids = torch.randint(5, len(tokenizer), (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
