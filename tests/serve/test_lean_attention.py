"""The lean path's decode attention: lmwright's CPU kernel against torch's SDPA over the mask."""

from __future__ import annotations

import pytest
import torch

from lmwright.models import cpu_kernels
from lmwright.serve.lean import LeanLlama, Segment

needs_kernel = pytest.mark.skipif(cpu_kernels.attention_kernel() is None,
                                  reason=f"lmwright's CPU kernel: {cpu_kernels.attention_unavailable_reason()}")


def _load(lean: LeanLlama, prompts: list[list[int]]) -> list[int]:
    """Prefill each prompt alone into slot 0, 1, ...: the greedy first tokens."""
    firsts = []
    for row, ids in enumerate(prompts):
        buf = lean.new_buffer(len(ids))
        firsts.append(int(lean.prefill([Segment(buf, 0, ids)])[0].argmax()))
        lean.load_row(row, buf, len(ids))
    return firsts


def _decode(lean: LeanLlama, prompts: list[list[int]], steps: int):
    """Prefill each prompt into its slot, then ``steps`` batched greedy decode steps: (logits per step, tokens)."""
    with torch.inference_mode():
        firsts = _load(lean, prompts)
        tokens, positions = torch.tensor(firsts), torch.tensor([len(p) for p in prompts])
        logits, out = [], [firsts]
        for _ in range(steps):
            lean.grow(int(positions.max()) + 2)
            step = lean.decode(tokens, positions, int(positions.max()) + 1)
            logits.append(step)
            tokens, positions = step.argmax(-1), positions + 1
            out.append(tokens.tolist())
    return logits, out


@needs_kernel
def test_kernel_decode_equals_sdpa_decode(lm):
    prompts = [lm.prompt_ids(q) for q in ("Hello there", "What is the capital of France? Answer briefly.", "2+2=")]
    on = LeanLlama(lm.model, max_seqs=4, max_context=256)
    off = LeanLlama(lm.model, max_seqs=4, max_context=256)
    off.attn_kernel = False
    assert on.attn_kernel and on.k[0].dtype == torch.float32
    logits_on, tokens_on = _decode(on, prompts, 10)
    logits_off, tokens_off = _decode(off, prompts, 10)
    assert tokens_on == tokens_off
    for a, b in zip(logits_on, logits_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for i in range(len(on.k)):  # the kernel wrote the same keys and values into the slots (up to the rounding
        # that the earlier layers' attention outputs carry into later layers' projections)
        torch.testing.assert_close(on.k[i][:3, :, :40], off.k[i][:3, :, :40], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(on.v[i][:3, :, :40], off.v[i][:3, :, :40], rtol=1e-4, atol=1e-5)
        assert torch.equal(on.k[i][:3, :, 40:], off.k[i][:3, :, 40:])  # columns past every position: untouched


@needs_kernel
def test_kernel_mixed_step_equals_sdpa_step(lm):
    """A step with decode rows and several prompts (one whole, one continuing after its first chunk): with the kernel,
    every prompt row attends in one call per layer on its own buffer; without, one SDPA per prompt over a mask. Same
    logits, same keys and values in the buffers."""
    prompts = [lm.prompt_ids(q) for q in ("Hello there", "What is the capital of France? Answer briefly.", "2+2=")]
    new = [lm.prompt_ids(q) for q in ("Once upon a time in a land far away", "The dog")]
    results = []
    for kernel in (True, False):
        lean = LeanLlama(lm.model, max_seqs=4, max_context=256)
        lean.attn_kernel = kernel and lean.attn_kernel
        assert lean.attn_kernel is kernel
        with torch.inference_mode():
            firsts = _load(lean, prompts)
            bufs = [lean.new_buffer(len(ids)) for ids in new]
            lean.prefill([Segment(bufs[0], 0, new[0][:4])])  # a first chunk: the next one starts at column 4
            positions = torch.tensor([len(p) for p in prompts])
            lean.grow(int(positions.max()) + 2)
            dec, pre = lean.step(torch.tensor(firsts), positions, int(positions.max()) + 1,
                                 [Segment(bufs[0], 4, new[0][4:]), Segment(bufs[1], 0, new[1])])
        results.append((dec, pre, [b.whole.clone() for b in bufs]))
    (dec_on, pre_on, bufs_on), (dec_off, pre_off, bufs_off) = results
    torch.testing.assert_close(dec_on, dec_off, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pre_on, pre_off, rtol=1e-4, atol=1e-4)
    for a, b in zip(bufs_on, bufs_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_turns_the_kernel_off(lm, monkeypatch):
    lean = LeanLlama(lm.model, max_seqs=2, max_context=64)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # what matters is the switch, not inductor
    lean.compile()
    assert lean.attn_kernel is False


def test_prefill_buffers_and_slot_rows_copy_in_one_go(lm):
    """A prefill buffer's layers are views of one tensor, and so are the slot cache's: copying a cached prefix,
    loading a finished prompt into a slot and moving a slot are one copy each (60 small ones for SmolLM2 took ~1.3 ms
    per prompt), with the same result as the per-layer copies."""
    from lmwright.serve.lean import PrefillBuffer

    lean = LeanLlama(lm.model, max_seqs=3, max_context=64)
    with torch.inference_mode():
        src, dst = lean.new_buffer(10), lean.new_buffer(12)
        assert isinstance(src, PrefillBuffer) and len(src) == len(lean.layers)
        src.whole.copy_(torch.randn(src.whole.shape))
        dst.whole.zero_()
        assert src[1][0].data_ptr() == src.whole[1, 0].data_ptr() and src[1][0].shape == (1, lean.kv_heads, 10,
                                                                                         lean.head_dim)
        lean.copy_prefix(src, dst, 7)
        for (ks, vs), (kd, vd) in zip(src, dst):
            assert torch.equal(kd[:, :, :7], ks[:, :, :7]) and torch.equal(vd[:, :, :7], vs[:, :, :7])
            assert not kd[:, :, 7:].any()  # the columns past the prefix are not touched
        lean.load_row(2, src, 10)
        lean.move_row(2, 0, 10)
        for i, (ks, vs) in enumerate(src):
            for row in (0, 2):
                assert torch.equal(lean.k[i][row, :, :10], ks[0].to(lean.cache_dtype))
                assert torch.equal(lean.v[i][row, :, :10], vs[0].to(lean.cache_dtype))
            assert lean.k[i].data_ptr() == lean._k[i].data_ptr()  # the layers are views of the one tensor
        lean.grow(lean.capacity + 1)  # a larger cache keeps the rows
        assert torch.equal(lean.k[-1][2, :, :10], src[-1][0][0].to(lean.cache_dtype))
