"""Contract matrix (design convention 6): every method x {tiny causal LM, tiny encoder classifier}.

For each cell where the method applies (``COMPAT``): the trainable set is what the method declares
(task head included), one AdamW step moves exactly the trainable parameters, save -> load_trained
gives identical logits, merged == unmerged logits (methods that merge; the others refuse clearly),
the disabled adapter is the base model, and weight-delta methods start equal to the base.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmwright.config import ConfigError
from lmwright.methods import (
    COMPAT,
    METHODS,
    MethodConfig,
    apply_method,
    disabled,
    get_method,
    load_trained,
    merge_trained,
    save_trained,
    trainable_report,
)

CASES = {"llama-causal": ("llama-tiny", "causal-lm"), "bert-cls": ("bert-tiny", "classification")}
FAMILY = {"llama-tiny": "llama", "bert-tiny": "bert"}
NUM_LABELS = 3

# what each method declares trainable, by parameter name (the classification head is added below)
DECLARED = {
    "full": lambda n: True,
    "freeze": lambda n: ".1." in n,  # the last of the two blocks (freeze_last_n=1)
    "lora": lambda n: "lora_" in n,
    "dora": lambda n: "lora_" in n,
    "ia3": lambda n: "ia3_" in n,
    "prefix": lambda n: "prompt_encoder" in n,
    "ptuning": lambda n: "prompt_encoder" in n,
    "prompt": lambda n: "prompt_encoder" in n,
    "adapter": lambda n: ".bottleneck." in n,
    "qat": lambda n: True,
}
HAS_DISABLE = {"lora", "dora", "ia3", "prefix", "ptuning", "prompt", "adapter"}
STARTS_AT_BASE = {"full", "freeze", "lora", "dora", "ia3", "adapter"}


def _cells() -> list:
    out = []
    for m in METHODS.names():
        for case, (preset, task) in CASES.items():
            if task in COMPAT[m]["tasks"] and FAMILY[preset] in COMPAT[m]["families"]:
                out.append(pytest.param(m, case, id=f"{m}-{case}"))
    return out


CELLS = _cells()


def _cfg(name: str) -> MethodConfig:
    return MethodConfig(name=name, r=4, alpha=8, dropout=0.0, num_virtual_tokens=4, encoder_hidden_size=16,
                        adapter_size=8, freeze_last_n=1, qat_group_size=32)


def _base(tokenizer, case: str):
    from lmwright.models import ModelConfig, build_model

    preset, task = CASES[case]
    extra = {"num_labels": NUM_LABELS} if task == "classification" else {}
    model = build_model(ModelConfig(name=preset, dtype="float32"), task=task, tokenizer=tokenizer, seed=0, **extra)
    return model.eval(), task


def _batch(task: str, vocab: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 10), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    b["labels"] = ids.clone() if task == "causal-lm" else torch.randint(0, NUM_LABELS, (2,), generator=g)
    return b


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _step(model, batch) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    # no zero_grad: the test reads which parameters had a non-zero gradient
    model.eval()


def _prepared(tokenizer, method: str, case: str):
    base, task = _base(tokenizer, case)
    batch = _batch(task, len(tokenizer))
    base_logits = _logits(base, batch)
    model = apply_method(copy.deepcopy(base), _cfg(method), task)
    return base, model, task, batch, base_logits


def _is_head(name: str) -> bool:
    return "classifier" in name or "score" in name


@pytest.mark.parametrize("method, case", CELLS)
def test_trainable_set_as_declared(tokenizer, method, case):
    _, model, task, _, _ = _prepared(tokenizer, method, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    declared = {n for n, _ in model.named_parameters()
                if DECLARED[method](n) or (task == "classification" and _is_head(n)
                                           and "original_module" not in n)}
    assert trainable == declared
    if task == "classification":
        assert any(_is_head(n) for n in trainable), "the new classification head must train"
    rep = trainable_report(model)
    assert 0 < rep["trainable"] <= rep["total"]
    if method not in ("full", "qat"):
        assert rep["trainable_pct"] < 100.0


@pytest.mark.parametrize("method, case", CELLS)
def test_one_step_changes_exactly_the_trainable_parameters(tokenizer, method, case):
    _, model, task, batch, _ = _prepared(tokenizer, method, case)
    before = _state(model)
    _step(model, batch)
    params = dict(model.named_parameters())
    moved_body = False
    for n, p in params.items():
        changed = not torch.equal(before[n], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen parameter {n} moved"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert changed, f"trainable parameter {n} had a gradient but did not move"
            moved_body |= not _is_head(n)
    assert moved_body, "the method's own parameters got no gradient (the method has no effect)"


@pytest.mark.parametrize("method, case", CELLS)
def test_save_load_gives_identical_logits(tokenizer, tmp_path, method, case):
    base, model, task, batch, _ = _prepared(tokenizer, method, case)
    base.save_pretrained(tmp_path / "base")
    _step(model, batch)
    expected = _logits(model, batch)
    out = save_trained(model, _cfg(method), tmp_path / "out", tokenizer=tokenizer, base_path=tmp_path / "base",
                       task=task)
    if method not in ("full", "freeze", "qat"):  # adapters save only what they train
        assert not (out / "model.safetensors").exists()
    loaded, tok = load_trained(out)
    assert tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-6, rtol=1e-6) if method != "qat" \
        else torch.testing.assert_close(_logits(loaded, batch), _logits(get_method("qat").merge(model), batch))


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] != "qat"])
def test_merged_equals_unmerged(tokenizer, method, case):
    _, model, task, batch, _ = _prepared(tokenizer, method, case)
    _step(model, batch)
    expected = _logits(model, batch)
    if not COMPAT[method]["merges"]:
        with pytest.raises(ConfigError, match="cannot be merged"):
            merge_trained(model, _cfg(method))
        return
    merged = merge_trained(model, _cfg(method))
    assert type(merged).__module__.startswith("transformers."), "merge must give a plain transformers model"
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] in HAS_DISABLE])
def test_disabled_adapter_is_the_base_model(tokenizer, method, case):
    _, model, task, batch, base_logits = _prepared(tokenizer, method, case)
    _step(model, batch)
    with disabled(model):
        got = _logits(model, batch)
    torch.testing.assert_close(got, base_logits, atol=1e-6, rtol=1e-6)
    after = _logits(model, batch)  # prompt methods add virtual positions to causal-LM logits
    assert after.shape != base_logits.shape or not torch.allclose(after, base_logits), "the method changes nothing"


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] in STARTS_AT_BASE])
def test_starts_equal_to_the_base_model(tokenizer, method, case):
    _, model, _, batch, base_logits = _prepared(tokenizer, method, case)
    torch.testing.assert_close(_logits(model, batch), base_logits, atol=1e-6, rtol=1e-6)


def test_matrix_covers_every_method():
    covered = {c.values[0] for c in CELLS}
    assert covered == set(METHODS.names())
