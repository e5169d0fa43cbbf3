"""The causal-LM loss's two speed levers give the same loss and gradients as the plain computation:
per-sample attention on packed rows (``models.attention``) and the output head run only where a target is
(``objectives.base.selected_logits``)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmwright.models.attention import NAME, packed_kwargs, segments, use_packed_attention
from lmwright.objectives.base import IGNORE_INDEX, causal_lm_loss, token_cross_entropy
from tests.families import FAMILY_ATTENTION, FAMILY_NAMES, build_family_model


def reference_loss(model, batch):
    """What the loss was before the levers: every position's logits, transformers' own mask."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    T = batch["labels"].shape[1]
    return token_cross_entropy(model(**kwargs).logits[:, -T:], batch["labels"], shift=True)


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two packed rows of 48 tokens: samples of 11+20+17 and 30+18, the prompt part of each unlabelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    pos, labels = [], ids.clone()
    for r, lens in enumerate(([11, 20, 17], [30, 18])):
        p, s = [], 0
        for n in lens:
            p += list(range(n))
            labels[r, s:s + n // 2] = IGNORE_INDEX  # the "prompt" half
            s += n
        pos.append(p)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor(pos)}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segments_follow_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_loss_and_grads_equal_reference(tokenizer, family):
    # eval mode: GPT-2's dropout would draw different masks in the two computations (gradients flow all the same)
    ref = build_family_model(family, tokenizer, seed=0, attn_implementation=FAMILY_ATTENTION.get(family))
    ours = copy.deepcopy(ref)
    switched = use_packed_attention(ours)
    assert switched == (ref.config._attn_implementation == "sdpa")
    batch = packed_batch(len(tokenizer))
    if switched:
        assert packed_kwargs(ours, batch)["lmwright_segments"][0] == [(0, 11), (11, 31), (31, 48)]
    want_sum, want_n = reference_loss(ref, batch)
    got = causal_lm_loss(ours, batch)
    assert int(got.n_targets) == int(want_n)
    assert float(got.loss_sum) == pytest.approx(float(want_sum), rel=1e-5)
    want_sum.backward()
    got.loss_sum.backward()
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ref.keys() == g_ours.keys()
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_packed_attention_is_per_sample(tokenizer):
    """The attention output of a packed row's second sample equals that sample run alone."""
    model = build_family_model("qwen2", tokenizer, seed=1)
    use_packed_attention(model)
    assert model.config._attn_implementation == NAME
    batch = packed_batch(len(tokenizer), seed=2)
    kwargs = {"input_ids": batch["input_ids"][:1], "position_ids": batch["position_ids"][:1], "use_cache": False}
    with torch.no_grad():
        packed = model(**kwargs, **packed_kwargs(model, kwargs)).logits[0, 11:31]
        alone = model(input_ids=batch["input_ids"][:1, 11:31], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_switched_model_generates_and_saves_like_sdpa(tokenizer, tmp_path):
    """Without packed rows nothing changes: padded batches, generation with a cache, config.json."""
    ref = build_family_model("llama", tokenizer, seed=3)
    ours = copy.deepcopy(ref)
    use_packed_attention(ours)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))
    ours.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()


def test_gradient_checkpointing_replays_the_packed_path(tokenizer):
    ref = build_family_model("llama", tokenizer, seed=4).train()
    ours = copy.deepcopy(ref)
    use_packed_attention(ours)
    ours.gradient_checkpointing_enable()
    batch = packed_batch(len(tokenizer), seed=5)
    want, _ = reference_loss(ref, batch)
    got = causal_lm_loss(ours, batch)
    assert float(got.loss_sum) == pytest.approx(float(want), rel=1e-5)
    want.backward()
    got.loss_sum.backward()
    for k, g in grads(ref).items():
        torch.testing.assert_close(grads(ours)[k], g, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_selected_logits_with_peft(tokenizer, method):
    """LoRA (head untouched) and prompt tuning (virtual tokens prepended to the hidden states)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    base = build_family_model("qwen2", tokenizer, seed=6).train()
    cfg = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0) if method == "lora" else \
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    if method == "lora":
        cfg.init_lora_weights = False  # non-zero B, so the adapter changes the loss
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, len(tokenizer), (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    want, want_n = reference_loss(model, batch)
    want.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, batch)
    assert int(got.n_targets) == int(want_n) == 2 * 12
    assert float(got.loss_sum) == pytest.approx(float(want), rel=1e-5)
    got.loss_sum.backward()
    g_ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g_ref and g_ref.keys() == g_ours.keys()
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_head_runs_only_on_target_positions(tokenizer):
    model = build_family_model("llama", tokenizer, seed=8)
    seen = []
    h = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape)))
    batch = packed_batch(len(tokenizer), seed=9)
    out = causal_lm_loss(model, batch)
    h.remove()
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert seen == [(n, len(tokenizer))] and int(out.n_targets) == n


def test_bf16_packed_attention_runs_in_fp32_on_cpu():
    """Under bf16 autocast on a CPU, where lmwright's attention kernel does not take the shape (head size 8 here,
    not a multiple of 32), the per-sample SDPA runs over exact fp32 upcasts of the bf16 q, k, v (torch's CPU
    kernel is slower in bf16, its backward ~1.7x on SmolLM2's shapes) and returns bf16, as sdpa would."""
    import torch.nn.functional as F

    from lmwright.models.attention import packed_sdpa

    class Attn(torch.nn.Module):
        is_causal, num_key_value_groups = True, 2

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 8, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 10, 8, generator=g).bfloat16() for _ in range(2))
    segs = [[(0, 6), (6, 10)]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa(Attn(), q, k, v, None, scaling=0.5, lmwright_segments=segs)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 10, 4, 8)
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(),
                                                     is_causal=True, scale=0.5, enable_gqa=True) for s, e in segs[0]],
                     dim=2).transpose(1, 2).bfloat16()
    assert torch.equal(out, want)


def test_packed_attention_backward_makes_no_whole_size_slice_gradients():
    """Samples are split out of the row (one concatenation in backward), not sliced (a zero-filled tensor of the
    whole row per sample and per q/k/v in backward); the gradients are those of per-sample SDPA."""
    import torch.nn.functional as F

    from lmwright.models.attention import packed_sdpa

    class Attn(torch.nn.Module):
        is_causal, num_key_value_groups = True, 2

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 12, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 8, generator=g, requires_grad=True) for _ in range(2))
    segs = [[(0, 5), (5, 9), (9, 12)], [(0, 12)]]
    with torch.profiler.profile() as prof:
        out, _ = packed_sdpa(Attn(), q, k, v, None, scaling=0.3, lmwright_segments=segs)
        out.sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::slice_backward" not in names
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.cat([torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                                is_causal=True, scale=0.3, enable_gqa=True)
                                for s, e in segs[b]], dim=2) for b in range(2)])
    ref.transpose(1, 2).sum().backward()
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


def test_adapter_saved_while_packed_reloads_with_sdpa(tokenizer, tmp_path):
    """An adapter saved from a model switched to lmwright's packed attention records ``sdpa`` in lmwright.json:
    ``lmwright_packed`` is registered only in the training process, so `lmwright eval --model <run>` in a fresh
    process could not reload the demo's LoRA run (found by running the demo's printed next commands)."""
    import json

    from lmwright.methods import MethodConfig, apply_method
    from lmwright.methods.base import load_trained, save_trained
    from lmwright.models import ModelConfig, build_model
    from lmwright.models.attention import FP32_NAME, saved_name

    base = build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = apply_method(base, MethodConfig(name="lora", r=4, alpha=8.0), "causal-lm")
    assert use_packed_attention(model)
    save_trained(model, MethodConfig(name="lora", r=4, alpha=8.0), tmp_path / "adapter", tokenizer,
                 base_path=tmp_path / "base")
    meta = json.loads((tmp_path / "adapter" / "lmwright.json").read_text())
    assert meta["attn_implementation"] == "sdpa"
    meta["attn_implementation"] = NAME  # a folder saved before the fix still loads
    (tmp_path / "adapter" / "lmwright.json").write_text(json.dumps(meta))
    loaded, _ = load_trained(tmp_path / "adapter")
    assert loaded.config._attn_implementation == "sdpa"
    assert saved_name(NAME) == saved_name(FP32_NAME) == "sdpa" and saved_name("eager") == "eager"
