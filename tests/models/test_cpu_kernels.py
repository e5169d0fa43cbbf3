"""lmwright's CPU decode kernels (lmwright.models.cpu_kernels) against float64 references."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from lmwright.models import cpu_kernels as ck

needs_kernel = pytest.mark.skipif(ck.kernels() is None, reason=f"lmwright's CPU kernel: {ck.unavailable_reason()}")


needs_q8 = pytest.mark.skipif(ck.q8_kernel() is None, reason=f"lmwright's int8 kernel: {ck.q8_unavailable_reason()}")


def _wide_range_rows(rows, k, g):
    """Activation rows whose entries span four orders of magnitude (as a model's do)."""
    return (torch.randn(rows, k, generator=g) * torch.logspace(-3, 1, k)[torch.randperm(k, generator=g)]).bfloat16()


@pytest.mark.parametrize("n,k", [(16, 2), (48, 96), (37, 75), (160, 576), (3, 7)])
def test_bf16_tiles_round_trip(n, k):
    w = torch.randn(n, k).bfloat16()
    t = ck.tiles(w)
    assert t.dtype == w.dtype and t.shape == (-(-n // 16) * 16, k + k % 2)  # padded to whole tiles and pairs
    assert torch.equal(ck.untile(t, n, k), w)
    # tile 0, inputs 0 and 1 of outputs 0..15: the first 32 values; the padding is zero
    pad = torch.zeros(16, k + k % 2, dtype=w.dtype)
    pad[:min(n, 16), :k] = w[:16]
    assert torch.equal(t.reshape(-1)[:32], pad[:, :2].reshape(-1))
    assert float(t.double().abs().sum()) == float(w.double().abs().sum())  # exact in float64


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (160, 576), (32, 1536), (20, 176), (3, 7)])
def test_q8_tiles_round_trip(n, k):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    t = ck.q8_tiles(q)
    assert t.dtype == torch.int8 and t.shape == (-(-n // 16) * 16, -(-k // 32) * 32)  # padded to whole tiles
    assert torch.equal(ck.q8_untile(t, n, k), q)
    # tile 0, inputs 0..3 of outputs 0..15: the first 64 bytes, as q + 128 (unsigned); padding is q = 0
    first = t.view(torch.uint8).reshape(-1)[:64].reshape(16, 4).int()
    assert torch.equal(first[:min(n, 16), :min(k, 4)], q[:16, :4].int() + 128)
    assert (first[min(n, 16):] == 128).all() and (first[:, min(k, 4):] == 128).all()


@needs_q8
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (160, 576), (32, 1536), (40, 176), (5, 7)])
def test_q8_matches_its_definition_and_float64(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) / 40 + 1e-3).to(torch.bfloat16)
    x = _wide_range_rows(rows, k, g)
    y = ck.q8_matmul(x, ck.q8_tiles(q), scale)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    # the defined arithmetic (int8 activation blocks, exact int32 block sums, fp32 scaling): within bf16 rounding
    ref = ck.q8_reference(x, q, scale)
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6 * float(ref.abs().max())).all()
    # against the unquantized product: each activation is off by at most half its block's step (amax / 254)
    exact = (x.double() @ q.double().T) * scale.double()
    kp = -(-k // 32) * 32  # the last block partial where k is not a multiple of 32
    blocks = torch.nn.functional.pad(x.double(), (0, kp - k)).reshape(rows, kp // 32, 32)
    step = blocks.abs().amax(-1) / 254  # (rows, blocks)
    qsum = torch.nn.functional.pad(q.double().abs(), (0, kp - k)).reshape(n, kp // 32, 32).sum(-1)
    bound = torch.einsum("rb,nb->rn", step, qsum) * scale.double()
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + bound * 1.001 + 1e-9).all()


@needs_q8
def test_q8_sums_are_exact_at_the_extremes():
    """Every weight at -127 or 127 and every activation at its block's max: the unsigned offset (q + 128) and its
    correction must cancel exactly, the int32 block sums must not overflow."""
    k = 4096
    q = torch.full((32, k), 127, dtype=torch.int8)
    q[16:] = -127
    x = torch.full((3, k), 3.0).bfloat16()
    x[1] = -3.0
    y = ck.q8_matmul(x, ck.q8_tiles(q), torch.ones(32, dtype=torch.bfloat16))
    sign = torch.tensor([1.0, -1.0, 1.0])[:, None] * torch.cat([torch.ones(16), -torch.ones(16)])[None, :]
    assert torch.equal(y.float(), (sign * 127 * 3 * k).bfloat16().float())


@needs_q8
def test_q8_non_finite_rows_give_nan_and_zero_rows_give_zero():
    q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    scale = torch.full((16,), 0.01, dtype=torch.bfloat16)
    x = torch.randn(4, 64).bfloat16()
    x[1, 5] = float("inf")
    x[2] = 0
    y = ck.q8_matmul(x, ck.q8_tiles(q), scale)
    assert torch.isnan(y[1]).all() and (y[2] == 0).all()
    assert torch.isfinite(y[[0, 3]]).all()
    ref = ck.q8_reference(x[[0, 3]], q, scale)
    assert torch.allclose(y[[0, 3]].double(), ref, rtol=2**-7, atol=1e-3)


@needs_q8
def test_q8_rows_do_not_depend_on_the_batch_or_threads():
    """A row's result is the same bits alone, in any batch and with any thread count: a served stream's answer does
    not depend on the other streams decoded with it."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (272, 320), generator=g, dtype=torch.int8)
    scale = torch.rand(272, generator=g).bfloat16()
    t = ck.q8_tiles(q)
    x = _wide_range_rows(37, 320, g)  # 32 rows or more: quantized by both threads at 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([ck.q8_matmul(x[i:i + 1], t, scale) for i in range(37)])
        batch = ck.q8_matmul(x, t, scale)
        torch.set_num_threads(2)
        two = ck.q8_matmul(x, t, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, batch) and torch.equal(batch, two)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 37])
@pytest.mark.parametrize("n,k", [(70, 192), (37, 75)])
def test_bf16_matches_f_linear(rows, n, k):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(2, rows, k, generator=g).bfloat16()
    y = ck.matmul(x, ck.tiles(w), n)
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert y.shape == (2, rows, n) and ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()


@needs_kernel
def test_bf16_rows_do_not_depend_on_their_batch_or_threads():
    """A row's sums run in the same order whatever it is batched with (groups of 16 rows, a partial last one) and
    however many threads split the tiles: a stream's answer does not depend on how many others the server batches
    with it."""
    g = torch.Generator().manual_seed(0)
    w, x = _wide_range_rows(259, 320, g), _wide_range_rows(37, 320, g)
    t = ck.tiles(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([ck.matmul(x[i:i + 1], t, 259) for i in range(37)])
        batch = ck.matmul(x, t, 259)
        # 2-4 rows take the few-rows path (several tiles side by side; 259 outputs: whole groups of tiles and some
        # left over), 5 or more the 16-row groups
        few = {size: torch.cat([ck.matmul(x[i:i + size], t, 259) for i in range(0, 37, size)]) for size in (2, 3, 4, 5)}
        torch.set_num_threads(2)
        two = ck.matmul(x, t, 259)
        two_alone = torch.cat([ck.matmul(x[i:i + 1], t, 259) for i in range(37)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, batch) and torch.equal(batch, two) and torch.equal(two_alone, alone)
    for size, got in few.items():
        assert torch.equal(got, batch), f"{size} rows at a time"


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("LMWRIGHT_CPU_KERNELS", "0")
    ck.kernels.cache_clear()
    ck.q8_kernel.cache_clear()
    try:
        assert ck.kernels() is None and "LMWRIGHT_CPU_KERNELS" in ck.unavailable_reason()
        assert ck.q8_kernel() is None and "LMWRIGHT_CPU_KERNELS" in ck.q8_unavailable_reason()
        assert not ck.usable(torch.zeros(8, 64, dtype=torch.bfloat16))
        assert not ck.q8_usable(torch.zeros(16, 64, dtype=torch.int8))
    finally:
        ck.kernels.cache_clear()
        ck.q8_kernel.cache_clear()
        monkeypatch.delenv("LMWRIGHT_CPU_KERNELS")
        ck.kernels()
        ck.q8_kernel()


def test_usable_only_for_shapes_it_takes():
    if ck.kernels() is None:
        assert not ck.usable(torch.zeros(8, 64, dtype=torch.bfloat16))
    else:
        assert ck.usable(torch.zeros(3, 32, dtype=torch.bfloat16)) and ck.usable(torch.zeros(8, 45, dtype=torch.bfloat16))
        assert not ck.usable(torch.zeros(0, 64, dtype=torch.bfloat16))
        assert not ck.usable(torch.zeros(8, 64))  # fp32 weights: torch's kernels
        assert not ck.usable(torch.zeros(8, 64, dtype=torch.int8))  # int8: q8_matmul
    if ck.q8_kernel() is None:
        assert not ck.q8_usable(torch.zeros(16, 64, dtype=torch.int8))
    else:
        assert ck.q8_usable(torch.zeros(16, 64, dtype=torch.int8)) and ck.q8_usable(torch.zeros(20, 48, dtype=torch.int8))
        assert not ck.q8_usable(torch.zeros(16, 64, dtype=torch.bfloat16))
        assert not ck.q8_usable(torch.zeros(0, 64, dtype=torch.int8))


@needs_kernel
def test_calls_show_in_profiles():
    w = torch.randn(8, 64).bfloat16()
    with torch.profiler.profile() as prof:
        ck.matmul(torch.randn(1, 64).bfloat16(), ck.tiles(w), 8)
    assert ck.PROFILE_NAME in {e.key for e in prof.key_averages()}
    if ck.q8_kernel() is not None:
        q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
        with torch.profiler.profile() as prof:
            ck.q8_matmul(torch.randn(1, 64).bfloat16(), ck.q8_tiles(q), torch.ones(16, dtype=torch.bfloat16))
        assert ck.PROFILE_NAME in {e.key for e in prof.key_averages()}


@needs_kernel
def test_packed_linear_sends_every_call_to_the_kernel(monkeypatch):
    from lmwright.models.packed_linear import PackedLinear

    w = torch.randn(48, 64).bfloat16()
    mod = PackedLinear(w)
    assert mod.layout == "tiles" and mod._packed is None and mod._dense is None  # one copy of the weight
    assert torch.equal(mod.weight, w)
    calls = []
    real = ck.matmul
    monkeypatch.setattr(ck, "matmul", lambda *a: calls.append(a[0].numel() // 64) or real(*a))
    for rows in (1, 3, 16, 300):
        assert mod(torch.randn(rows, 64).bfloat16()).shape == (rows, 48)
    assert calls == [1, 3, 16, 300]
    mod.unpack()  # torch.compile: plain layouts only
    assert mod.layout == "dense" and mod._tiled is None and torch.equal(mod.weight, w)


needs_attention = pytest.mark.skipif(ck.attention_kernel() is None,
                                     reason=f"lmwright's CPU kernel: {ck.attention_unavailable_reason()}")


@needs_attention
@pytest.mark.parametrize("heads,kv,d", [(4, 2, 16), (9, 3, 64), (8, 8, 128), (6, 1, 32)])
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_attention_matches_sdpa(heads, kv, d, rows):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(heads * 100 + d + rows)
    slots, cap = 6, 300
    kc, vc = torch.randn(slots, kv, cap, d, generator=g), torch.randn(slots, kv, cap, d, generator=g)
    q = torch.randn(rows, heads, 1, d, generator=g) * 3  # peaked softmax rows too
    k, v = torch.randn(rows, kv, 1, d, generator=g), torch.randn(rows, kv, 1, d, generator=g)
    positions = torch.randint(0, 290, (rows,), generator=g)
    positions[0] = 0  # a row that sees only its own new column
    ref_k, ref_v = kc.clone(), vc.clone()
    ref_k[torch.arange(rows), :, positions] = k[:, :, 0]
    ref_v[torch.arange(rows), :, positions] = v[:, :, 0]
    ncols = int(positions.max()) + 1
    mask = (torch.arange(ncols)[None, :] <= positions[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, ref_k[:rows, :, :ncols], ref_v[:rows, :, :ncols], attn_mask=mask,
                                         scale=d ** -0.5, enable_gqa=kv != heads)
    assert ck.attention_usable(kc, heads)
    out = ck.decode_attention(q, k, v, kc, vc, positions, d ** -0.5)
    assert out.shape == (rows, heads, 1, d) and out.dtype == torch.float32
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)  # the new keys and values, at each row's position
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # threads split the (row, key/value head) pairs: same answer
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = ck.decode_attention(q, k, v, kc, vc, positions, d ** -0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two, out)


@needs_attention
@pytest.mark.parametrize("heads,kv", [(9, 3), (12, 2)])
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("rows", [1, 7])
def test_decode_attention_on_a_bf16_cache_is_the_fp32_arithmetic(rows, d, heads, kv):
    """A bf16 model's keys and values are bf16 numbers: a bf16 cache holds them exactly, and the kernel attends in
    fp32 on it, so its output is the fp32-cache output rounded to bf16 (half the cache's bytes). Where the head size
    is a multiple of 32 the scores sum bf16 pair products (exact) in another order than the fp32 path: an output
    may then land one bf16 step away; else bit for bit."""
    g = torch.Generator().manual_seed(rows)
    slots, cap = 8, 200
    kc = torch.randn(slots, kv, cap, d, generator=g).bfloat16()
    vc = torch.randn(slots, kv, cap, d, generator=g).bfloat16()
    q = (torch.randn(rows, heads, 1, d, generator=g) * 3).bfloat16()
    k, v = torch.randn(rows, kv, 1, d, generator=g).bfloat16(), torch.randn(rows, kv, 1, d, generator=g).bfloat16()
    positions = torch.randint(0, 190, (rows,), generator=g)
    kc32, vc32 = kc.float(), vc.float()
    ref = ck.decode_attention(q.float(), k.float(), v.float(), kc32, vc32, positions, 0.125).bfloat16().float()
    out = ck.decode_attention(q, k, v, kc, vc, positions, 0.125)
    assert out.dtype == torch.bfloat16
    diff = (out.float() - ref).abs()
    if d % 32:
        assert torch.equal(diff, torch.zeros_like(diff))
    else:
        assert bool((diff <= ref.abs() * 2**-7).all())  # at most one bf16 step
        assert float((diff == 0).float().mean()) > 0.995
    assert torch.equal(kc.float(), kc32) and torch.equal(vc.float(), vc32)  # the same writes


@needs_attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv,d", [(6, 2, 32), (9, 3, 64), (4, 4, 16)])
def test_prefill_attention_matches_sdpa_per_prompt(dtype, heads, kv, d):
    """Several prompts' rows in one call, each on its own buffer (a cached prefix before some, a buffer shorter than a
    block of 16 columns, one longer than two): the keys and values land at each row's position, and each row attends
    causally within its prompt, as the engine's per-prompt SDPA over a mask did."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(heads + d)
    layers, lens, starts = 3, [20, 9, 40], [5, 0, 23]
    bufs = [torch.randn(layers, 2, kv, n, d, generator=g).to(dtype) for n in lens]
    counts = [n - s for n, s in zip(lens, starts)]
    rows, step = ck.prefill_rows(bufs, counts)
    pos = torch.tensor([s + j for s, n in zip(starts, counts) for j in range(n)])
    r = sum(counts)
    for layer in range(layers):
        q = (torch.randn(r, heads, d, generator=g) * 3).to(dtype)
        k, v = torch.randn(r, kv, d, generator=g).to(dtype), torch.randn(r, kv, d, generator=g).to(dtype)
        ref_bufs = [b.clone() for b in bufs]
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = ck.prefill_attention(q, k, v, rows + layer * step, pos, 0.3)
            torch.set_num_threads(1)
            out = ck.prefill_attention(q, k, v, rows + layer * step, pos, 0.3)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(two, out) and out.shape == (r, heads, d) and out.dtype == dtype
        refs, o = [], 0
        for rb, s, n in zip(ref_bufs, starts, counts):
            rb[layer, 0, :, s:s + n] = k[o:o + n].transpose(0, 1)
            rb[layer, 1, :, s:s + n] = v[o:o + n].transpose(0, 1)
            mask = torch.arange(s + n)[None, :] <= (s + torch.arange(n))[:, None]
            refs.append(F.scaled_dot_product_attention(
                q[o:o + n].transpose(0, 1)[None].float(), rb[layer, 0][None, :, :s + n].float(),
                rb[layer, 1][None, :, :s + n].float(), attn_mask=mask, scale=0.3, enable_gqa=True)[0].transpose(0, 1))
            o += n
        assert all(torch.equal(a, b) for a, b in zip(bufs, ref_bufs))  # the writes, and nothing else
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(out.float(), torch.cat(refs), rtol=tol, atol=tol)


def test_prefill_rows_are_each_buffers_addresses():
    a, b = torch.zeros(2, 2, 3, 10, 16), torch.zeros(2, 2, 3, 4, 16, dtype=torch.bfloat16)
    rows, step = ck.prefill_rows([a, b], [2, 1])
    assert rows.tolist() == [[a.data_ptr(), a[0, 1].data_ptr(), 10]] * 2 + [[b.data_ptr(), b[0, 1].data_ptr(), 4]]
    assert (rows + step)[2].tolist() == [b[1, 0].data_ptr(), b[1, 1].data_ptr(), 4]  # layer 1
    with pytest.raises(ValueError, match="contiguous"):
        ck.prefill_rows([a.transpose(3, 4)], [1])


def test_attention_usable_only_for_caches_it_takes():
    if ck.attention_kernel() is None:
        assert not ck.attention_usable(torch.zeros(2, 2, 8, 64), 4)
        return
    assert ck.attention_usable(torch.zeros(2, 2, 8, 64), 4)
    assert ck.attention_usable(torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16), 4)  # a bf16 cache, fp32 arithmetic
    assert not ck.attention_usable(torch.zeros(2, 2, 8, 64, dtype=torch.float16), 4)
    assert not ck.attention_usable(torch.zeros(2, 2, 8, 40), 4)  # head size not a multiple of 16
    assert not ck.attention_usable(torch.zeros(2, 3, 8, 64), 4)  # heads not a multiple of key/value heads
    assert not ck.attention_usable(torch.zeros(2, 8, 2, 64).transpose(1, 2), 4)  # not contiguous


needs_ce = pytest.mark.skipif(ck.cross_entropy_kernel() is None,
                              reason=f"lmwright's CPU kernel: {ck.cross_entropy_unavailable_reason()}")


@needs_ce
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(1, 16), (7, 100), (33, 4099)])
def test_cross_entropy_matches_torch(dtype, n, v):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(n + v)
    x = (torch.randn(n, v, generator=g) * 5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    a = x.clone().requires_grad_()
    loss = ck.CrossEntropySum.apply(a, labels)
    (loss * 0.7).backward()
    b = x.clone().requires_grad_()
    ref = F.cross_entropy(b.float(), labels, ignore_index=-100, reduction="sum")
    (ref * 0.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)
    assert (a.grad[::3] == 0).all()  # ignored rows get no gradient


@needs_ce
def test_cross_entropy_threads_and_extremes():
    x = torch.tensor([[1000.0, -1000.0, 0.0, 3.0] * 8, [-50.0] * 32])  # a huge logit, a flat row
    labels = torch.tensor([1, 5])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = ck.CrossEntropySum.apply(x, labels)
    finally:
        torch.set_num_threads(threads)
    ref = torch.nn.functional.cross_entropy(x, labels, reduction="sum")
    assert torch.isfinite(two) and torch.allclose(two, ref, rtol=1e-5)


def test_token_cross_entropy_uses_the_kernel_and_keeps_torchs_errors(monkeypatch):
    import torch.nn.functional as F

    from lmwright.objectives.base import token_cross_entropy

    logits = torch.randn(2, 6, 40).bfloat16()
    labels = torch.randint(0, 40, (2, 6))
    labels[0, :2] = -100
    calls = []
    real = ck.CrossEntropySum.apply
    monkeypatch.setattr(ck.CrossEntropySum, "apply", lambda *a: calls.append(1) or real(*a))
    loss, n = token_cross_entropy(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum")
    assert int(n) == 9 and torch.allclose(loss, ref, rtol=1e-4)
    assert calls == ([1] if ck.cross_entropy_kernel() is not None else [])
    bad = labels.clone()
    bad[1, 3] = 40  # out of the vocabulary: torch's error, not a silently ignored row
    with pytest.raises((IndexError, RuntimeError)):
        token_cross_entropy(logits, bad)


@needs_kernel
def test_empty_inputs_are_no_work():
    """Zero rows (a batch with no decode rows, a validation batch without targets) return empty or zero results;
    zero sizes were once the kernels' capability probe, which wrote into the empty output (a segfault)."""
    w = ck.tiles(torch.randn(8, 64).bfloat16())
    assert ck.matmul(torch.zeros(0, 64).bfloat16(), w, 8).shape == (0, 8)
    assert ck.matmul(torch.zeros(2, 0, 64).bfloat16(), w, 8).shape == (2, 0, 8)
    if ck.q8_kernel() is not None:
        t = ck.q8_tiles(torch.randint(-127, 128, (16, 64), dtype=torch.int8))
        one = torch.ones(16, dtype=torch.bfloat16)
        assert ck.q8_matmul(torch.zeros(0, 64).bfloat16(), t, one).shape == (0, 16)
        assert ck.q8_matmul(torch.zeros(2, 0, 64).bfloat16(), t, one).shape == (2, 0, 16)
    if ck.cross_entropy_kernel() is not None:
        logits = torch.zeros(0, 50, requires_grad=True)
        loss = ck.CrossEntropySum.apply(logits, torch.zeros(0, dtype=torch.long))
        loss.backward()
        assert float(loss) == 0.0 and logits.grad.shape == (0, 50)
    if ck.attention_kernel() is not None:
        kc = torch.zeros(2, 1, 8, 16)
        out = ck.decode_attention(torch.zeros(0, 2, 1, 16), torch.zeros(0, 1, 1, 16), torch.zeros(0, 1, 1, 16), kc,
                                  kc.clone(), torch.zeros(0, dtype=torch.long), 0.25)
        assert out.shape == (0, 2, 1, 16)


@needs_attention
def test_decode_attention_positions_outside_the_cache_give_nan_not_a_write():
    kc, vc = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    q, k, v = torch.ones(2, 2, 1, 16), torch.ones(2, 1, 1, 16), torch.ones(2, 1, 1, 16)
    out = ck.decode_attention(q, k, v, kc, vc, torch.tensor([3, 8]), 0.25)  # row 1 at column 8 of 8
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    assert kc[1].abs().sum() == 0 and kc[0, :, 3].abs().sum() == 16  # row 0 wrote its column, row 1 nothing


@needs_ce
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_cross_entropy_self_test_passes_without_autograd(context):
    """The kernel is built and self-tested at its first use, which may be a validation pass under no_grad (the
    self-test's torch reference then failed: 'does not require grad', found by the CI run)."""
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        assert ck._cross_entropy_self_test(ck.cross_entropy_kernel()) is None
        logits = torch.randn(3, 40)
        loss = ck.CrossEntropySum.apply(logits, torch.tensor([1, -100, 39]))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([1, -100, 39]),
                                                                  reduction="sum"))


@needs_kernel
def test_long_kernels_let_other_python_threads_run():
    """A kernel call runs without the GIL: a Python thread keeps running through the middle of a ~0.3 s call (with
    the GIL held, the serving engine's kernels kept the server's event loop from sending tokens until the
    interpreter's switch interval let it in between calls)."""
    w = ck.tiles(torch.randn(4096, 4096).bfloat16())
    x = torch.randn(32, 4096).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ck.matmul(x, w, 4096)  # warm
        t0 = time.perf_counter()
        ck.matmul(x, w, 4096)
        reps = max(1, int(0.3 / max(time.perf_counter() - t0, 1e-4)))
        seen, stop = [], threading.Event()

        def other():
            n = 0
            while not stop.is_set():
                n += 1
                if n % 200 == 0:
                    seen.append(time.perf_counter())

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.02)
        x_big = x.repeat(reps, 1)  # one call of reps x 32 rows
        start = time.perf_counter()
        ck.matmul(x_big, w, 4096)
        end = time.perf_counter()
        stop.set()
        t.join()
    finally:
        torch.set_num_threads(threads)
    mid = [s for s in seen if start + 0.25 * (end - start) < s < end - 0.25 * (end - start)]
    assert end - start > 0.05 and len(mid) > 10, (end - start, len(mid))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("name", ["SOURCE", "Q8_SOURCE", "ATTENTION_SOURCE", "CROSS_ENTROPY_SOURCE", "SAMPLE_SOURCE"])
def test_sources_compile_without_avx512(name, tmp_path):
    """On a CPU without AVX-512 every kernel source still compiles (to its probe answering "not here"), so the reason
    given is the CPU's, not a compile error: the attention source once used its AVX-512-only row accessors outside
    the guard."""
    import subprocess
    import sysconfig

    src = tmp_path / "k.cpp"
    src.write_text(getattr(ck, name), encoding="utf-8")
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", f"-I{sysconfig.get_paths()['include']}",
                        "-mno-avx512f", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
