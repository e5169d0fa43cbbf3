"""lmwright's CPU attention kernel for packed training rows (lmwright.models.cpu_attention): forward and backward
against torch's fp32 SDPA per sample, and the packed attention path of a bf16 training step using it."""

from __future__ import annotations

import pytest
import torch

from lmwright.models import cpu_attention as ca
from tests.models.conftest import rel_error

needs_kernel = pytest.mark.skipif(ca.kernel() is None, reason=f"lmwright's CPU attention: {ca.unavailable_reason()}")


def _inputs(b, h, kv, t, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = ((torch.randn(b, n, t, d, generator=g) * scale).bfloat16().requires_grad_() for n in (h, kv, kv))
    go = torch.randn(b, t, h, d, generator=g).bfloat16()
    return q, k, v, go


CASES = [  # (heads, kv heads, head size, spans per row)
    (4, 2, 32, [[(0, 1), (1, 16), (16, 33)], [(0, 17), (17, 33)]]),  # lengths 1, 15, 16, 17: every block edge
    (9, 3, 64, [[(0, 70), (70, 101)], [(0, 101)]]),  # SmolLM2's heads
    (2, 2, 96, [[(0, 40), (40, 45)]]),  # a head size of 3 x 32 (the 2-vector tail of the 64-column chunks)
    (4, 1, 128, [[(0, 3), (3, 50)]]),  # multi-query, head size 128
]


@needs_kernel
@pytest.mark.parametrize("h,kv,d,segs", CASES)
def test_forward_and_backward_match_fp32_sdpa_per_sample(h, kv, d, segs):
    t = segs[0][-1][1]
    q, k, v, go = _inputs(len(segs), h, kv, t, d, scale=2.0)
    out = ca.packed_attention(q, k, v, segs, scale=0.2)
    assert out.dtype == torch.bfloat16 and out.shape == (len(segs), t, h, d)
    ref = ca.reference(q, k, v, segs, scale=0.2)
    # the output is the fp32 result rounded once to bf16: within one bf16 rounding of the reference
    torch.testing.assert_close(out.float(), ref.detach(), atol=1e-2, rtol=2**-8)
    out.backward(go)
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref.backward(go.float())
    for name, a, x in zip("qkv", got, (q, k, v)):
        assert a.dtype == torch.bfloat16 and a.shape == x.shape
        assert rel_error(a, x.grad) < 1e-2, f"d{name}: relative error {rel_error(a, x.grad):.3g}"


@needs_kernel
def test_each_span_attends_only_within_itself():
    """Changing the keys and values of one sample changes no other sample's output or gradients."""
    segs = [[(0, 20), (20, 45)]]
    q, k, v, go = _inputs(1, 4, 2, 45, 64, seed=3)
    out = ca.packed_attention(q, k, v, segs)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 20:] += 1.0
    v2[:, :, 20:] -= 1.0
    out2 = ca.packed_attention(q, k2, v2, segs)
    assert torch.equal(out[:, :20], out2[:, :20]) and not torch.equal(out[:, 20:], out2[:, 20:])


@needs_kernel
def test_results_do_not_depend_on_threads_or_batch_layout():
    """Spans run independently: 1 and 2 threads, or a row on its own, give the same bits."""
    segs = [[(0, 30), (30, 64)], [(0, 64)]]
    q, k, v, go = _inputs(2, 6, 3, 64, 64, seed=5)
    res = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = ca.packed_attention(q, k, v, segs)
            out.backward(go)
        finally:
            torch.set_num_threads(old)
        res.append([out.detach()] + [x.grad.clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    for a, b in zip(*res):
        assert torch.equal(a, b)
    alone = ca.packed_attention(q[1:].detach(), k[1:].detach(), v[1:].detach(), segs[1:])
    assert torch.equal(alone, res[0][0][1:])


@needs_kernel
def test_large_scores_stay_finite():
    """Scores of +-hundreds (the row max is subtracted before exp, and the saved log-sum-exp in backward)."""
    segs = [[(0, 40)]]
    q, k, v, go = _inputs(1, 2, 2, 40, 32, seed=7, scale=8.0)
    out = ca.packed_attention(q, k, v, segs, scale=1.0)
    out.backward(go)
    assert all(torch.isfinite(x).all() for x in (out, q.grad, k.grad, v.grad))
    ref = ca.reference(q, k, v, segs, scale=1.0)
    torch.testing.assert_close(out.float(), ref.detach(), atol=2e-2 * float(ref.abs().max()), rtol=2**-8)


def test_usable_refuses_what_it_does_not_take():
    q, k, v, _ = _inputs(1, 4, 2, 8, 32)
    q, k, v = q.detach(), k.detach(), v.detach()
    assert not ca.usable(q.float(), k.float(), v.float())  # fp32: torch's path (nothing to round)
    assert not ca.usable(q[..., :16], k[..., :16], v[..., :16])  # head size not a multiple of 32
    assert not ca.usable(q[:, :3], k, v)  # 3 query heads over 2 key/value heads
    assert ca.usable(q, k, v) == (ca.kernel() is not None)


class _Attn(torch.nn.Module):
    is_causal, num_key_value_groups = True, 2


@needs_kernel
def test_packed_sdpa_takes_the_kernel_for_bf16_and_torch_otherwise():
    from lmwright.models.attention import packed_sdpa

    segs = [[(0, 6), (6, 40)]]
    q, k, v, _ = _inputs(1, 4, 2, 40, 32)
    q, k, v = q.detach(), k.detach(), v.detach()
    with torch.profiler.profile() as prof:
        out, _ = packed_sdpa(_Attn(), q, k, v, None, scaling=0.5, lmwright_segments=segs)
    assert ca.PROFILE_NAME in {e.key for e in prof.key_averages()}
    assert torch.equal(out, ca.packed_attention(q, k, v, segs, 0.5))
    module = _Attn().train()
    with torch.profiler.profile() as prof:  # attention dropout while training: torch's path
        packed_sdpa(module, q, k, v, None, dropout=0.1, scaling=0.5, lmwright_segments=segs)
    assert ca.PROFILE_NAME not in {e.key for e in prof.key_averages()}


@needs_kernel
def test_bf16_training_step_matches_the_fp32_attention_path(monkeypatch):
    """A LoRA-style bf16 autocast step of a small Llama over packed rows: loss and gradients with the kernel are
    those of torch's per-sample fp32 SDPA (the path it replaces), within bf16 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmwright.models.attention import packed_kwargs, use_packed_attention

    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # as an adapter's frozen base is held under bf16 training
    model.config._attn_implementation = "sdpa"
    assert use_packed_attention(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 48), generator=g)
    pos = torch.tensor([list(range(20)) + list(range(28)), list(range(48))])
    batch = {"input_ids": ids, "position_ids": pos}

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch, use_cache=False, **packed_kwargs(model, batch)).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    with torch.profiler.profile() as prof:
        loss, grads = step()
    assert ca.PROFILE_NAME + ".backward" in {e.key for e in prof.key_averages()}
    monkeypatch.setattr(ca, "usable", lambda *a: False)
    ref_loss, ref_grads = step()
    assert abs(float(loss) - float(ref_loss)) < 2e-3
    for n, gr in ref_grads.items():
        assert rel_error(grads[n], gr) < 3e-2, f"{n}: relative error {rel_error(grads[n], gr):.3g}"


@needs_kernel
def test_autocast_hands_fp32_inputs_to_the_kernel_as_bf16_like_sdpa():
    """Under full fine-tuning the rotary embedding makes q and k fp32; CPU autocast casts SDPA's inputs to bf16,
    and so does the packed path before the kernel (gradients flow back to the fp32 inputs)."""
    from lmwright.models.attention import packed_sdpa

    segs = [[(0, 10), (10, 33)]]
    q, k, v, go = _inputs(1, 4, 2, 33, 32, seed=9)
    qf = q.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa(_Attn(), qf, k, v, None, scaling=0.4, lmwright_segments=segs)
    assert torch.equal(out, ca.packed_attention(q.detach(), k.detach(), v.detach(), segs, 0.4))
    out.backward(go)
    assert qf.grad.dtype == torch.float32 and torch.isfinite(qf.grad).all() and k.grad.dtype == torch.bfloat16


def test_reference_grads_are_autograds():
    """The self-test's autograd-free reference gradients equal autograd's through the SDPA reference."""
    segs = [[(0, 7), (7, 30)]]
    q, k, v, go = _inputs(1, 4, 2, 30, 32, seed=11)
    ref = ca.reference(q, k, v, segs, scale=0.3)
    ref.backward(go.float())
    for got, x in zip(ca.reference_grads(q, k, v, segs, go, scale=0.3), (q, k, v)):
        torch.testing.assert_close(got.float(), x.grad.float(), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_first_use_inside_a_gradient_checkpointed_forward(monkeypatch):
    """The kernel is built and self-tested at first use, which may be inside a gradient-checkpointed layer: the
    self-test must save nothing for backward there (it ran an autograd pass of its own, and the recomputation then
    saved fewer tensors than the forward: CheckpointError in the SmolLM2 LoRA run with gradient checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    from lmwright.models import cpu_kernels

    segs = [[(0, 10), (10, 40)]]
    q, k, v, go = _inputs(1, 4, 2, 40, 32, seed=13)

    calls = []

    def layer(q, k, v):
        if not calls:  # as in a fresh process: the forward's call builds and self-tests, the recomputation's not
            ca.kernel.cache_clear()
            cpu_kernels.cross_entropy_kernel.cache_clear()
            assert cpu_kernels.cross_entropy_kernel() is not None
        calls.append(1)
        return ca.packed_attention(q * 1.0, k * 1.0, v * 1.0, segs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = checkpoint(layer, q, k, v, use_reentrant=False)
    out.backward(go)
    assert len(calls) == 2 and ca.kernel() is not None and all(torch.isfinite(x.grad).all() for x in (q, k, v))
