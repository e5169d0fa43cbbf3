"""lmwright's LoRA layers add the low-rank update in place (lean_lora_layers): same loss and gradients as
peft's own forward, for float and nf4 bases, in fp32 and under bf16 autocast; DoRA keeps peft's forward."""

from __future__ import annotations

import pytest
import torch

from lmwright.methods import MethodConfig, apply_method
from lmwright.methods.peft_methods import _LeanLoraForward, lean_lora_layers


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _loss_and_grads(model, batch, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from lmwright.objectives.base import token_cross_entropy

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, _ = token_cross_entropy(out.logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _peft_forward(model) -> None:
    """Put peft's own classes back (undo lean_lora_layers)."""
    for mod in model.modules():
        if isinstance(mod, _LeanLoraForward):
            mod.__class__ = type(mod).__mro__[2]


def _model(tokenizer, tmp_path, quantize: str, method: str = "lora"):
    from lmwright.models import ModelConfig, build_model, load_model

    build_model(ModelConfig(name="llama-tiny", dtype="float32"), task="causal-lm", tokenizer=tokenizer,
                seed=0).save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base", model_cfg=ModelConfig(name=str(tmp_path / "base"), quantize=quantize,
                                                               dtype="float32"))
    model = apply_method(base, MethodConfig(name=method), "causal-lm")
    torch.manual_seed(0)
    for mod in model.modules():  # lora_B starts at zero: make the update (and its gradient path) non-trivial
        for lin in getattr(mod, "lora_B", {}).values():
            torch.nn.init.normal_(lin.weight, std=0.05)
    return model


@pytest.mark.parametrize("quantize", ["none", pytest.param("nf4", marks=pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"))])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_lora_matches_peft_forward(tokenizer, tmp_path, quantize, autocast):
    model = _model(tokenizer, tmp_path, quantize)
    lean = [m for m in model.modules() if isinstance(m, _LeanLoraForward)]
    assert len(lean) == 14  # 2 blocks x (q, k, v, o, gate, up, down): all-linear
    batch = _batch(len(tokenizer))
    loss, grads = _loss_and_grads(model, batch, autocast)
    _peft_forward(model)
    assert not any(isinstance(m, _LeanLoraForward) for m in model.modules())
    ref_loss, ref_grads = _loss_and_grads(model, batch, autocast)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=tol, atol=tol * ref_grads[n].abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_lean_lora_keeps_peft_forward_for_disabled_merged_and_dora(tokenizer, tmp_path):
    from lmwright.methods import disabled, merge_trained

    model = _model(tokenizer, tmp_path, "none")
    batch = _batch(len(tokenizer))
    model.eval()
    with torch.no_grad():
        on = model(input_ids=batch["input_ids"]).logits
        with disabled(model):
            off = model(input_ids=batch["input_ids"]).logits
        merged = merge_trained(model, MethodConfig(name="lora"))(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(on, off, atol=1e-3)  # the update is there, and disabling removes it
    torch.testing.assert_close(merged, on, rtol=1e-4, atol=1e-4)
    assert lean_lora_layers(model) is model  # idempotent, nothing left to swap after merging
    dora = _model(tokenizer, tmp_path / "d", "none", method="dora")
    assert all(m.lora_variant for m in dora.modules() if isinstance(m, _LeanLoraForward))


def test_a_loaded_adapter_runs_the_training_forward(tokenizer, tmp_path):
    """load_trained (eval, serve, export parity) gives the saved LoRA adapter the forward it trained with,
    so the logits served are the logits the run measured, to the bit."""
    from lmwright.methods import load_trained, save_trained

    model = _model(tokenizer, tmp_path, "none")
    save_trained(model, MethodConfig(name="lora"), tmp_path / "adapter", tokenizer=tokenizer,
                 base_path=tmp_path / "base", task="causal-lm")
    loaded, _ = load_trained(tmp_path / "adapter")
    assert sum(isinstance(m, _LeanLoraForward) for m in loaded.modules()) == 14
    model.eval()
    batch = _batch(len(tokenizer))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=batch["input_ids"]).logits
        got = loaded(input_ids=batch["input_ids"]).logits
    assert torch.equal(want, got)
