"""Contract matrix (design convention 6): every method x {tiny causal LM, tiny encoder classifier} and every
method x every decoder family (a tiny random model of each, saved as a local folder: see "families" below).

For each cell where the method applies (``COMPAT``): the trainable set is what the method declares
(task head included), one AdamW step moves exactly the trainable parameters, save -> load_trained
gives identical logits, merged == unmerged logits (methods that merge; the others refuse clearly),
the disabled adapter is the base model, and weight-delta methods start equal to the base.
"""

from __future__ import annotations

import copy
import re

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
from tests.families import FAMILY_ATTENTION, FAMILY_NAMES, folder_factory

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


def _check_trainable_set(model, declared, task: str, full: bool) -> None:
    """The trainable parameters are exactly those ``declared`` names (plus a new classification head)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {n for n, _ in model.named_parameters()
            if declared(n) or (task == "classification" and _is_head(n) and "original_module" not in n)}
    assert trainable == want
    if task == "classification":
        assert any(_is_head(n) for n in trainable), "the new classification head must train"
    rep = trainable_report(model)
    assert 0 < rep["trainable"] <= rep["total"]
    if not full:
        assert rep["trainable_pct"] < 100.0


def _check_one_step(model, batch) -> None:
    """One AdamW step moves every trainable parameter that got a gradient, and nothing else."""
    before = _state(model)
    _step(model, batch)
    moved_body = False
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen parameter {n} moved"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert changed, f"trainable parameter {n} had a gradient but did not move"
            moved_body |= not _is_head(n)
    assert moved_body, "the method's own parameters got no gradient (the method has no effect)"


def _check_save_load(model, cfg: MethodConfig, tokenizer, base_dir, out_dir, task: str, batch, atol: float = 1e-6):
    expected = _logits(model, batch)
    out = save_trained(model, cfg, out_dir, tokenizer=tokenizer, base_path=base_dir, task=task)
    if cfg.name not in ("full", "freeze", "qat"):  # adapters save only what they train
        assert not (out / "model.safetensors").exists()
    loaded, tok = load_trained(out)
    assert tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    if cfg.name == "qat":  # the saved float weights reload into the model QAT converts to
        torch.testing.assert_close(_logits(loaded, batch), _logits(get_method("qat").merge(model), batch))
        return
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=atol, rtol=atol)


def _check_merge(model, cfg: MethodConfig, batch, atol: float = 1e-5) -> None:
    """merged == unmerged logits, or a clear refusal for methods that cannot merge (consumes ``model``)."""
    expected = _logits(model, batch)
    if not COMPAT[cfg.name]["merges"]:
        with pytest.raises(ConfigError, match="cannot be merged"):
            merge_trained(model, cfg)
        return
    merged = merge_trained(model, cfg)
    assert type(merged).__module__.startswith("transformers."), "merge must give a plain transformers model"
    torch.testing.assert_close(_logits(merged, batch), expected, atol=atol, rtol=atol)


def _check_disabled_is_base(model, batch, base_logits, atol: float = 1e-6) -> None:
    with disabled(model):
        got = _logits(model, batch)
    torch.testing.assert_close(got, base_logits, atol=atol, rtol=atol)
    after = _logits(model, batch)  # prompt methods add virtual positions to causal-LM logits
    assert after.shape != base_logits.shape or not torch.allclose(after, base_logits), "the method changes nothing"


@pytest.mark.parametrize("method, case", CELLS)
def test_trainable_set_as_declared(tokenizer, method, case):
    _, model, task, _, _ = _prepared(tokenizer, method, case)
    _check_trainable_set(model, DECLARED[method], task, full=method in ("full", "qat"))


@pytest.mark.parametrize("method, case", CELLS)
def test_one_step_changes_exactly_the_trainable_parameters(tokenizer, method, case):
    _, model, task, batch, _ = _prepared(tokenizer, method, case)
    _check_one_step(model, batch)


@pytest.mark.parametrize("method, case", CELLS)
def test_save_load_gives_identical_logits(tokenizer, tmp_path, method, case):
    base, model, task, batch, _ = _prepared(tokenizer, method, case)
    base.save_pretrained(tmp_path / "base")
    _step(model, batch)
    _check_save_load(model, _cfg(method), tokenizer, tmp_path / "base", tmp_path / "out", task, batch)


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] != "qat"])
def test_merged_equals_unmerged(tokenizer, method, case):
    _, model, task, batch, _ = _prepared(tokenizer, method, case)
    _step(model, batch)
    _check_merge(model, _cfg(method), batch)


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] in HAS_DISABLE])
def test_disabled_adapter_is_the_base_model(tokenizer, method, case):
    _, model, task, batch, base_logits = _prepared(tokenizer, method, case)
    _step(model, batch)
    _check_disabled_is_base(model, batch, base_logits)


@pytest.mark.parametrize("method, case", [c for c in CELLS if c.values[0] in STARTS_AT_BASE])
def test_starts_equal_to_the_base_model(tokenizer, method, case):
    _, model, _, batch, base_logits = _prepared(tokenizer, method, case)
    torch.testing.assert_close(_logits(model, batch), base_logits, atol=1e-6, rtol=1e-6)


def test_matrix_covers_every_method():
    covered = {c.values[0] for c in CELLS}
    assert covered == set(METHODS.names())


# ------------------------------------------------------------------------------------------- families
# Every decoder family as a user has it: a local folder (tests/families.py) loaded by lmwright's loader.
# Each cell runs the whole contract on one model: validate accepts it, trainable set, starts at the base,
# one step, disabled == base, save -> load, merged == unmerged. Beside the methods: qlora (lora on a
# model.quantize=nf4 base) and lora-targets (lora on the family's own attention projection names).
FAMILY_TARGETS = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"]}  # default: q_proj, v_proj


def _targets(family: str) -> list[str]:
    return FAMILY_TARGETS.get(family, ["q_proj", "v_proj"])


def _family_method_cfg(method: str, family: str) -> MethodConfig:
    cfg = _cfg("lora" if method in ("qlora", "lora-targets") else method)
    if method == "lora-targets":
        cfg.targets = _targets(family)
    return cfg


def _family_cells() -> tuple[list, list]:
    """(cells COMPAT supports, cells COMPAT refuses) over FAMILY_NAMES x methods + qlora, lora-targets."""
    ok, refused = [], []
    for family in FAMILY_NAMES:
        for m in [*METHODS.names(), "qlora", "lora-targets"]:
            c = COMPAT[_family_method_cfg(m, family).name]
            cell = pytest.param(m, family, id=f"{m}-{family}")
            (ok if family in c["families"] else refused).append(cell)
    return ok, refused


FAMILY_CELLS, REFUSED_FAMILY_CELLS = _family_cells()


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory, tokenizer):
    return folder_factory(tmp_path_factory, tokenizer)


def _family_model_cfg(folder, family: str, quantize: str = "none"):
    from lmwright.models import ModelConfig

    return ModelConfig(name=str(folder), dtype="float32", quantize=quantize,
                       attn_implementation=FAMILY_ATTENTION.get(family, "sdpa"))


def _declared(method: str, family: str):
    if method == "lora-targets":
        return lambda n: "lora_" in n and any(f".{t}." in n for t in _targets(family))
    return DECLARED["lora" if method == "qlora" else method]


@pytest.mark.parametrize("method, family", FAMILY_CELLS)
def test_family_contract(tokenizer, family_folder, tmp_path, method, family):
    from lmwright.methods import check_compat
    from lmwright.models import build_model

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    folder = family_folder(family)
    cfg = _family_method_cfg(method, family)
    model_cfg = _family_model_cfg(folder, family, "nf4" if method == "qlora" else "none")
    check_compat(cfg, model_cfg, "causal-lm")  # `lmwright validate` accepts the cell
    base = build_model(model_cfg, task="causal-lm").eval()  # lmwright's loader, as a stage loads it
    if method == "qlora":  # as load_trained does: eval below must not repack the 4-bit blocks for bf16
        from lmwright.methods.peft_methods import disable_bnb_cpu_repack

        disable_bnb_cpu_repack(base)
    batch = _batch("causal-lm", len(tokenizer))
    base_logits = _logits(base, batch)
    # a 4-bit base is consumed by the method (frozen, prepared for k-bit training) rather than copied
    model = apply_method(base if method == "qlora" else copy.deepcopy(base), cfg, "causal-lm")
    atol = 1e-5 if method == "qlora" else 1e-6

    _check_trainable_set(model, _declared(method, family), "causal-lm", full=cfg.name in ("full", "qat"))
    if cfg.name in STARTS_AT_BASE:
        torch.testing.assert_close(_logits(model, batch), base_logits, atol=atol, rtol=atol)
    _check_one_step(model, batch)
    if cfg.name in HAS_DISABLE:
        _check_disabled_is_base(model, batch, base_logits, atol=atol)
    _check_save_load(model, cfg, tokenizer, folder, tmp_path / "out", "causal-lm", batch, atol=atol)
    if cfg.name != "qat":  # qat's merge (convert to integer weights) is checked in test_quantized.py
        _check_merge(model, cfg, batch, atol=1e-4 if method == "qlora" else 1e-5)


@pytest.mark.parametrize("method, family", REFUSED_FAMILY_CELLS)
def test_family_refusals_are_real_and_explained(tokenizer, family_folder, method, family):
    """validate refuses the cell with COMPAT's reason, and the method really does not work there."""
    from lmwright.methods import check_compat
    from lmwright.models import build_model

    folder = family_folder(family)
    cfg = _family_method_cfg(method, family)
    model_cfg = _family_model_cfg(folder, family)
    with pytest.raises(ConfigError, match=re.escape(COMPAT[cfg.name]["refused"][family])):
        check_compat(cfg, model_cfg, "causal-lm")
    with pytest.raises(Exception):  # noqa: B017 - whatever the failure, the cell must not silently train
        apply_method(build_model(model_cfg, task="causal-lm"), cfg, "causal-lm")


def test_family_matrix_covers_every_family_and_method():
    from lmwright.models.introspect import FAMILIES

    assert set(FAMILY_NAMES) <= set(FAMILIES)
    cells = {tuple(c.values) for c in FAMILY_CELLS + REFUSED_FAMILY_CELLS}
    assert cells == {(m, f) for f in FAMILY_NAMES for m in [*METHODS.names(), "qlora", "lora-targets"]}
