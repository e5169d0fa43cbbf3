"""Causal attention of packed training rows on a CPU, forward and backward, in one kernel of lmwright's own.

A packed SFT row holds several samples; each attends causally within itself (``models/attention.py``). torch's
CPU path for that is one ``scaled_dot_product_attention`` per sample, run in fp32 (its bf16 flash backward is
~1.7x slower on these shapes): on an AMD EPYC with avx512_bf16 and no AMX, 1 thread, a LoRA step of
SmolLM2-135M over two 512-token rows spent ~1.0 s of 4.6 s there, for ~40 GFLOP of attention. This kernel does
the same attention for every sample and head of the batch in one call (SmolLM2's: 15 ms per layer for two
512-token rows against torch's 38 ms):

- **forward**: per block of 4 query rows, the scores against 16 keys at a time with ``vdpbf16ps`` (q and k are
  bf16 numbers: products exact, sums in fp32; the keys stored pair-interleaved, 16 keys in the lanes), the row's
  softmax in fp32, then ``P @ V`` with ``vdpbf16ps`` over P rounded to bf16 (as bf16 flash attention on a GPU
  does; the normaliser is the fp32 sum). The output is rounded to bf16 once; the row's log-sum-exp is kept for
  backward (nothing of the scores' size is saved);
- **backward** (FlashAttention-2's, per key block): the probabilities again from the saved log-sum-exp,
  ``dP = dO V^T``, ``dS = P (dP - rowsum(dO O))``, then ``dQ += dS K``, ``dK += dS^T Q``, ``dV += P^T dO`` with
  ``vdpbf16ps`` over P and dS rounded to bf16 (under bf16 autocast every other matmul of the backward takes bf16
  inputs too), accumulated in fp32; the query heads of a key/value head summed into one fp32 buffer; every
  gradient rounded to bf16 once. Measured against torch's fp32 per-sample SDPA (the path it replaces): relative
  gradient error ~0.3%, the output within one bf16 rounding.

Both take q, k, v in bf16 (what the projections give under bf16 autocast) with any head size that is a multiple
of 32 and grouped-query attention; sums and softmax are fp32 (products of bf16 numbers are exact in it). Without
AVX512-BF16 the pair products run as two fp32 FMAs; without AVX-512 (or with ``LMWRIGHT_CPU_KERNELS=0``) the
kernel is not built and :func:`usable` says False: the callers keep torch's path. Built, cached and self-tested
like the other kernels (``models/cpu_kernels.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lmwright.models.cpu_kernels import _CPP_COMMON, _call, _compiled

PROFILE_NAME = "lmwright::cpu_attention.packed"

SOURCE = _CPP_COMMON + r"""
#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_KERNEL 1
static inline __m512i pair(const uint16_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
static inline __m512i lanes() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// keys-in-lanes pair tiles of L rows (row j at x + j * rs): t[((j / 16) * P + p) * 16 + j % 16] = (x[j][2p], x[j][2p + 1])
static void pair_tiles(const uint16_t* x, int64_t rs, int64_t L, int64_t D, std::vector<uint32_t>& t) {
    const int64_t P = D / 2, NB = (L + 15) / 16;
    t.assign(NB * P * 16, 0u);
    for (int64_t j = 0; j < L; ++j)
        for (int64_t p = 0; p < P; ++p) {
            uint32_t v; std::memcpy(&v, x + j * rs + 2 * p, 4);
            t[((j / 16) * P + p) * 16 + j % 16] = v;
        }
}
// row pairs with the columns in lanes: t[n * D + d] = (x[2n][d], x[2n + 1][d]), rows past L zero, n < rows / 2
static void row_pairs(const uint16_t* x, int64_t rs, int64_t L, int64_t rows, int64_t D, std::vector<uint32_t>& t) {
    t.assign(rows / 2 * D, 0u);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t n = 0; 2 * n < L; ++n) {  // 16 columns at a time: row 2n in the low halves, row 2n + 1 in the high
        const uint16_t* lo = x + 2 * n * rs;
        const uint16_t* hi = 2 * n + 1 < L ? lo + rs : nullptr;
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i a = _mm256_loadu_si256((const __m256i*)(lo + d));
            const __m256i b = hi ? _mm256_loadu_si256((const __m256i*)(hi + d)) : zero;
            _mm512_storeu_si512((void*)&t[n * D + d], _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                                                      _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
        }
    }
}
// 16 lanes of bf16 pairs (lo[c], hi[c]), each rounded to nearest even
static inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(f2bf16(lo)), _mm512_slli_epi32(_mm512_cvtepu16_epi32(f2bf16(hi)), 16));
}

// scores of 4 query rows (q rows at qr[r]) against key blocks jb (and jb + 1 where TWO): s[r][c] (+16)
// (the sums live in local variables, every loop over them unrolled, so that they stay in registers: through the
// caller's arrays GCC kept them in memory, a store and a load per product)
template <bool TWO>
static inline void scores4(const uint16_t* const* qr, const uint32_t* t0, int64_t P, __m512* a0, __m512* a1) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
    const uint16_t *q0 = qr[0], *q1 = qr[1], *q2 = qr[2], *q3 = qr[3];
    for (int64_t p = 0; p < P; ++p) {
        const __m512i k0 = _mm512_loadu_si512((const void*)(t0 + p * 16));
        const __m512i b0 = pair(q0 + 2 * p), b1 = pair(q1 + 2 * p), b2 = pair(q2 + 2 * p), b3 = pair(q3 + 2 * p);
        s0 = dot2(s0, b0, k0); s1 = dot2(s1, b1, k0); s2 = dot2(s2, b2, k0); s3 = dot2(s3, b3, k0);
        if (TWO) {
            const __m512i k1 = _mm512_loadu_si512((const void*)(t0 + (P + p) * 16));
            u0 = dot2(u0, b0, k1); u1 = dot2(u1, b1, k1); u2 = dot2(u2, b2, k1); u3 = dot2(u3, b3, k1);
        }
    }
    a0[0] = s0; a0[1] = s1; a0[2] = s2; a0[3] = s3;
    a1[0] = u0; a1[1] = u1; a1[2] = u2; a1[3] = u3;
}

// acc[x][r] += sum over pairs m < n of w_r[2m, 2m + 1] . t[m][x * 16 ..]: 4 rows of bf16 weights (row r at
// w + r * ws) times row pairs t (row_pairs' layout, D columns), NV vectors of 16 columns
template <int NV>
static inline void pair_weighted4(const uint16_t* w, int64_t ws, const uint32_t* t, int64_t D, int64_t n,
                                  __m512 (*acc)[4]) {
    __m512 c[NV][4];
#pragma GCC unroll 16
    for (int x = 0; x < NV; ++x)
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) c[x][r] = acc[x][r];
    for (int64_t m = 0; m < n; ++m) {
        __m512i tv[NV];
#pragma GCC unroll 16
        for (int x = 0; x < NV; ++x) tv[x] = _mm512_loadu_si512((const void*)(t + m * D + x * 16));
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
            const __m512i wb = pair(w + r * ws + 2 * m);
#pragma GCC unroll 16
            for (int x = 0; x < NV; ++x) c[x][r] = dot2(c[x][r], wb, tv[x]);
        }
    }
#pragma GCC unroll 16
    for (int x = 0; x < NV; ++x)
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) acc[x][r] = c[x][r];
}
template <typename F> static inline void by_chunks(int64_t D, F f) {  // 64 columns at a time, then 32
    for (int64_t dc = 0; dc < D; dc += 64) {
        if (D - dc >= 64) f.template operator()<4>(dc); else f.template operator()<2>(dc);
    }
}

// fn(b, s0, L, g) for every span (row b, start s0, length L > 0) of segs (n, 3) and key/value head g, in parallel
template <typename F>
static void each_span_head(const int64_t* segs, int64_t nseg, int64_t KV, int64_t nt, F fn) {
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1) collapse(2) if(nt > 1)
    for (int64_t si = 0; si < nseg; ++si)
        for (int64_t g = 0; g < KV; ++g) {
            const int64_t b = segs[si * 3], s0 = segs[si * 3 + 1], L = segs[si * 3 + 2] - s0;
            if (L > 0) fn(b, s0, L, g);
        }
}

// q (B, T, H, D), k and v (B, T, KV, D), out (B, T, H, D): bf16. lse (B, H, T) fp32. segs (n, 3): b, start, end.
static void forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                    const int64_t* segs, int64_t nseg, int64_t T, int64_t H, int64_t KV, int64_t D, float scale,
                    int64_t nt) {
    const int64_t G = H / KV, P = D / 2;
    each_span_head(segs, nseg, KV, nt, [&](int64_t b, int64_t s0, int64_t L, int64_t g) {
        const int64_t NB = (L + 15) / 16, W = NB * 16;
        std::vector<uint32_t> kt, vp;
        std::vector<float> sb(4 * W);
        std::vector<uint16_t> pb(4 * W);
        pair_tiles(k + ((b * T + s0) * KV + g) * D, KV * D, L, D, kt);
        row_pairs(v + ((b * T + s0) * KV + g) * D, KV * D, L, W, D, vp);
        for (int64_t h = g * G; h < (g + 1) * G; ++h) {
            for (int64_t i0 = 0; i0 < L; i0 += 4) {
                const int64_t ilast = std::min(i0 + 3, L - 1), nb = ilast / 16 + 1;
                const uint16_t* qr[4];
                for (int r = 0; r < 4; ++r) qr[r] = q + ((b * T + s0 + std::min(i0 + r, L - 1)) * H + h) * D;
                for (int64_t jb = 0; jb < nb; jb += 2) {
                    __m512 a0[4], a1[4];
                    const bool two = jb + 1 < nb;
                    if (two) scores4<true>(qr, kt.data() + jb * P * 16, P, a0, a1);
                    else scores4<false>(qr, kt.data() + jb * P * 16, P, a0, a1);
                    for (int r = 0; r < 4; ++r) {
                        const __m512i row = _mm512_set1_epi32((int)(i0 + r));
                        for (int h2 = 0; h2 < (two ? 2 : 1); ++h2) {
                            const __m512i j = _mm512_add_epi32(lanes(), _mm512_set1_epi32((int)((jb + h2) * 16)));
                            const __mmask16 ok = _mm512_cmp_epi32_mask(j, row, _MM_CMPINT_LE);
                            const __m512 sc = _mm512_mul_ps(h2 ? a1[r] : a0[r], _mm512_set1_ps(scale));
                            _mm512_storeu_ps(&sb[r * W + (jb + h2) * 16], _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, sc));
                        }
                    }
                }
                float l[4];
                for (int r = 0; r < 4; ++r) {  // the row's softmax numerators, as bf16 for P @ V; its sum in fp32
                    l[r] = 1.f;
                    const float* s = &sb[r * W];
                    uint16_t* pr = &pb[r * W];
                    if (i0 + r >= L) { std::memset(pr, 0, nb * 16 * sizeof(uint16_t)); continue; }
                    __m512 mv = _mm512_set1_ps(-INFINITY);
                    for (int64_t jb = 0; jb < nb; ++jb) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + jb * 16));
                    const float m = _mm512_reduce_max_ps(mv);
                    const __m512 mb = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
                    __m512 lv = _mm512_setzero_ps();
                    for (int64_t jb = 0; jb < nb; ++jb) {
                        const __m512 x = _mm512_loadu_ps(s + jb * 16);
                        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, mb)));
                        _mm256_storeu_si256((__m256i*)(pr + jb * 16), f2bf16(e));
                        lv = _mm512_add_ps(lv, e);
                    }
                    l[r] = _mm512_reduce_add_ps(lv);
                    lse[(b * H + h) * T + s0 + i0 + r] = m + std::log(l[r]);
                }
                by_chunks(D, [&]<int NV>(int64_t dc) {
                    __m512 acc[4][4];
                    for (int x = 0; x < NV; ++x) for (int r = 0; r < 4; ++r) acc[x][r] = _mm512_setzero_ps();
                    pair_weighted4<NV>(pb.data(), W, vp.data() + dc, D, ilast / 2 + 1, acc);
                    for (int r = 0; r < 4 && i0 + r < L; ++r) {
                        const __m512 inv = _mm512_set1_ps(1.f / l[r]);
                        for (int x = 0; x < NV; ++x)
                            store16(out + ((b * T + s0 + i0 + r) * H + h) * D + dc + x * 16, _mm512_mul_ps(acc[x][r], inv));
                    }
                });
            }
        }
    });
}

// the gradients dq (B, T, H, D), dk and dv (B, T, KV, D), bf16, from dout (B, T, H, D) and forward's out and lse
static void backward(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* out,
                     const uint16_t* dout, const float* lse, uint16_t* dq, uint16_t* dk, uint16_t* dv,
                     const int64_t* segs, int64_t nseg, int64_t T, int64_t H, int64_t KV, int64_t D, float scale,
                     int64_t nt) {
    const int64_t G = H / KV, P = D / 2;
    each_span_head(segs, nseg, KV, nt, [&](int64_t b, int64_t s0, int64_t L, int64_t g) {
        const int64_t NB = (L + 15) / 16, L4 = (L + 3) / 4 * 4;
        std::vector<uint32_t> kt, vt, kp, qp, op, pp(L4 / 2 * 16), sp(L4 / 2 * 16);
        std::vector<uint16_t> sb(L4 * 16);
        std::vector<float> dqa(L4 * D), dka(NB * D * 16, 0.f), dva(NB * D * 16, 0.f), dvec(L4, 0.f), lrow(L4, INFINITY);
        pair_tiles(k + ((b * T + s0) * KV + g) * D, KV * D, L, D, kt);
        pair_tiles(v + ((b * T + s0) * KV + g) * D, KV * D, L, D, vt);
        row_pairs(k + ((b * T + s0) * KV + g) * D, KV * D, L, NB * 16, D, kp);
        for (int64_t h = g * G; h < (g + 1) * G; ++h) {
            const uint16_t* qh = q + ((b * T + s0) * H + h) * D;
            const uint16_t* doh = dout + ((b * T + s0) * H + h) * D;
            const uint16_t* oh = out + ((b * T + s0) * H + h) * D;
            row_pairs(qh, H * D, L, L4, D, qp);
            row_pairs(doh, H * D, L, L4, D, op);
            for (int64_t i = 0; i < L; ++i) {  // rowsum(dO * O)
                __m512 acc = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(load16(doh + i * H * D + d), load16(oh + i * H * D + d), acc);
                dvec[i] = _mm512_reduce_add_ps(acc);
                lrow[i] = lse[(b * H + h) * T + s0 + i];
            }
            std::fill(dqa.begin(), dqa.end(), 0.f);
            for (int64_t jb = 0; jb < NB; ++jb) {
                const uint32_t* kb = kt.data() + jb * P * 16;
                const uint32_t* vb = vt.data() + jb * P * 16;
                const __m512i j = _mm512_add_epi32(lanes(), _mm512_set1_epi32((int)(jb * 16)));
                for (int64_t i0 = jb * 16; i0 < L; i0 += 4) {
                    const uint16_t *qr[4], *dr[4];
                    for (int r = 0; r < 4; ++r) {
                        const int64_t i = std::min(i0 + r, L - 1);
                        qr[r] = qh + i * H * D;
                        dr[r] = doh + i * H * D;
                    }
                    __m512 s[4], dp[4];
                    for (int r = 0; r < 4; ++r) { s[r] = _mm512_setzero_ps(); dp[r] = _mm512_setzero_ps(); }
                    for (int64_t p = 0; p < P; ++p) {
                        const __m512i k0 = _mm512_loadu_si512((const void*)(kb + p * 16));
                        const __m512i v0 = _mm512_loadu_si512((const void*)(vb + p * 16));
                        for (int r = 0; r < 4; ++r) {
                            s[r] = dot2(s[r], pair(qr[r] + 2 * p), k0);
                            dp[r] = dot2(dp[r], pair(dr[r] + 2 * p), v0);
                        }
                    }
                    __m512 pr[4], ds[4];
                    for (int r = 0; r < 4; ++r) {
                        const int64_t i = i0 + r;
                        const __mmask16 ok = i < L ? _mm512_cmp_epi32_mask(j, _mm512_set1_epi32((int)i), _MM_CMPINT_LE) : 0;
                        pr[r] = _mm512_maskz_mov_ps(ok, exp512(_mm512_fmsub_ps(s[r], _mm512_set1_ps(scale), _mm512_set1_ps(lrow[i]))));
                        ds[r] = _mm512_mul_ps(pr[r], _mm512_sub_ps(dp[r], _mm512_set1_ps(dvec[i])));
                        _mm256_storeu_si256((__m256i*)&sb[i * 16], f2bf16(ds[r]));
                    }
                    for (int r = 0; r < 4; r += 2) {  // row pairs (i, i + 1) for dK and dV
                        _mm512_storeu_si512((void*)&pp[(i0 + r) / 2 * 16], bf16_pairs(pr[r], pr[r + 1]));
                        _mm512_storeu_si512((void*)&sp[(i0 + r) / 2 * 16], bf16_pairs(ds[r], ds[r + 1]));
                    }
                    by_chunks(D, [&]<int NV>(int64_t dc) {  // dQ rows i0..i0+3 += dS (4 x 16) @ K block (16 x D)
                        __m512 acc[4][4];
                        for (int x = 0; x < NV; ++x) for (int r = 0; r < 4; ++r) acc[x][r] = _mm512_loadu_ps(&dqa[(i0 + r) * D + dc + x * 16]);
                        pair_weighted4<NV>(&sb[i0 * 16], 16, kp.data() + jb * 8 * D + dc, D, 8, acc);
                        for (int x = 0; x < NV; ++x) for (int r = 0; r < 4; ++r) _mm512_storeu_ps(&dqa[(i0 + r) * D + dc + x * 16], acc[x][r]);
                    });
                }
                // dK block (keys in lanes) += sum over row pairs of dS pairs x Q pairs; dV block: P pairs x dO pairs
                for (int side = 0; side < 2; ++side) {
                    const uint32_t* w = side ? pp.data() : sp.data();
                    const uint32_t* f = side ? op.data() : qp.data();
                    float* a = (side ? dva.data() : dka.data()) + jb * D * 16;
                    for (int64_t d0 = 0; d0 < D; d0 += 16) {
                        __m512 acc[16];
                        for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_loadu_ps(a + (d0 + dd) * 16);
                        for (int64_t n = jb * 8; n < L4 / 2; ++n) {
                            const __m512i wv = _mm512_loadu_si512((const void*)(w + n * 16));
                            const uint32_t* fr = f + n * D + d0;
                            for (int dd = 0; dd < 16; ++dd) acc[dd] = dot2(acc[dd], wv, _mm512_set1_epi32((int)fr[dd]));
                        }
                        for (int dd = 0; dd < 16; ++dd) _mm512_storeu_ps(a + (d0 + dd) * 16, acc[dd]);
                    }
                }
            }
            uint16_t* dqh = dq + ((b * T + s0) * H + h) * D;
            for (int64_t i = 0; i < L; ++i)
                for (int64_t d = 0; d < D; d += 16)
                    store16(dqh + i * H * D + d, _mm512_mul_ps(_mm512_loadu_ps(&dqa[i * D + d]), _mm512_set1_ps(scale)));
        }
        uint16_t* dkg = dk + ((b * T + s0) * KV + g) * D;
        uint16_t* dvg = dv + ((b * T + s0) * KV + g) * D;
        for (int64_t j = 0; j < L; ++j)
            for (int64_t d = 0; d < D; ++d) {
                const int64_t at = ((j / 16) * D + d) * 16 + j % 16;
                dkg[j * KV * D + d] = f2bf(dka[at] * scale);
                dvg[j * KV * D + d] = f2bf(dva[at]);
            }
    });
}
#endif

// mode 0: forward (out, lse); mode 1: backward (dq, dk, dv). nseg < 0: a capability probe.
extern "C" void kernel(int64_t mode, const void* q, const void* k, const void* v, void* out, const void* dout,
                       float* lse, void* dq, void* dk, void* dv, const int64_t* segs, int64_t nseg, int64_t T,
                       int64_t H, int64_t KV, int64_t D, float scale, int64_t nt) {
    NoGil nogil;
#ifdef HAVE_KERNEL
    if (nseg < 0) { ((uint16_t*)out)[0] = 1; return; }
    if (nseg == 0) return;
    if (mode == 0)
        forward((const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (uint16_t*)out, lse, segs, nseg, T, H,
                KV, D, scale, nt);
    else
        backward((const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (const uint16_t*)out,
                 (const uint16_t*)dout, lse, (uint16_t*)dq, (uint16_t*)dk, (uint16_t*)dv, segs, nseg, T, H, KV, D,
                 scale, nt);
#else
    if (nseg < 0) { ((uint16_t*)out)[0] = 0; return; }
#endif
}
"""
_ARGTYPES = ["int64_t", "const void*", "const void*", "const void*", "void*", "const void*", "float*", "void*",
             "void*", "void*", "const int64_t*", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "float",
             "int64_t"]
_reason: list[str] = []


@functools.cache
def kernel():
    """The compiled entry, or None where it cannot be used here (the reason in :func:`unavailable_reason`);
    compiled and self-tested once per process."""
    def probe(p):
        f = torch.zeros(1)
        return 0, p, p, p, p, p, f, p, p, p, torch.zeros(3, dtype=torch.long), -1, 0, 0, 0, 0, 1.0, 1

    return _compiled(SOURCE, _ARGTYPES, probe, _self_test, _reason)


def unavailable_reason() -> str | None:
    """Why :func:`kernel` returned None (None when it did not, or has not been asked yet)."""
    return _reason[0] if _reason else None


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """True where :func:`packed_attention` takes these (B, H, T, D) query and (B, KV, T, D) key and value: bf16 on
    a CPU, D a multiple of 32, whole query heads per key/value head, and the kernel runs here."""
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 4 for t in (query, key, value))
            and query.shape[3] % 32 == 0 and query.shape[3] > 0 and key.shape == value.shape
            and key.shape[3] == query.shape[3] and query.shape[1] % key.shape[1] == 0
            and key.shape[0] == query.shape[0] and key.shape[2] == query.shape[2] and kernel() is not None)


def autocast_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """q, k, v as CPU autocast at bf16 hands them to ``scaled_dot_product_attention`` (cast to bf16; under full
    fine-tuning the rotary embedding makes q and k fp32), else unchanged."""
    if (query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return tuple(t.to(torch.bfloat16) for t in (query, key, value))
    return query, key, value


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> contiguous (B, T, H, D) (free where the memory already lies that way, as after a projection's
    ``view(...).transpose(1, 2)``)."""
    return x.transpose(1, 2).contiguous()


def segment_table(segments: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Per-row (start, end) spans (``models.attention.segments``) as the kernel's (n, 3) table of (row, start, end)."""
    return torch.tensor([(b, s, e) for b, segs in enumerate(segments) for s, e in segs], dtype=torch.long
                        ).reshape(-1, 3)


class PackedAttention(torch.autograd.Function):
    """Causal attention within each (row, start, end) span of ``table``; q (B, H, T, D), k and v (B, KV, T, D), all
    bf16; returns (B, T, H, D) bf16 (transformers' attention-output layout). Callers check :func:`usable`."""

    @staticmethod
    def forward(ctx, q, k, v, table, scale: float):
        b, h, t, d = q.shape
        kv = k.shape[1]
        qt, kt, vt = _time_major(q), _time_major(k), _time_major(v)
        out = torch.empty(b, t, h, d, dtype=torch.bfloat16)
        lse = torch.empty(b, h, t)
        _call(kernel(), PROFILE_NAME, (0, qt, kt, vt, out, out, lse, out, out, out, table, table.shape[0], t, h, kv,
                                       d, float(scale), torch.get_num_threads()))
        ctx.save_for_backward(qt, kt, vt, out, lse, table)
        ctx.scale = float(scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qt, kt, vt, out, lse, table = ctx.saved_tensors
        b, t, h, d = qt.shape
        kv = kt.shape[2]
        g = grad_out.to(torch.bfloat16).contiguous()
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        _call(kernel(), PROFILE_NAME + ".backward",
              (1, qt, kt, vt, out, g, lse, dq, dk, dv, table, table.shape[0], t, h, kv, d, ctx.scale,
               torch.get_num_threads()))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     segments: list[list[tuple[int, int]]], scale: float | None = None) -> torch.Tensor:
    """Each (start, end) span of each row of (B, H, T, D) ``query`` attends causally to the same span of (B, KV, T,
    D) ``key``/``value``, every position in exactly one span; (B, T, H, D) bf16. The caller checked :func:`usable`."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return PackedAttention.apply(query, key, value, segment_table(segments), scale)


def reference(query, key, value, segments, scale=None) -> torch.Tensor:
    """What :func:`packed_attention` computes, through torch's SDPA in fp32 per span (for tests and the self-test)."""
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b, segs in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e].float(), key[b:b + 1, :, s:e].float(),
                                                value[b:b + 1, :, s:e].float(), is_causal=True, scale=scale,
                                                enable_gqa=groups > 1) for s, e in segs]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2)


def reference_grads(query, key, value, segments, grad_out, scale=None):
    """The gradients of :func:`reference` for ``grad_out`` (B, T, H, D), by the attention backward's formulas in
    float64 without autograd (the self-test may run inside a caller's forward, e.g. a gradient-checkpointed layer,
    where an autograd pass of its own would add saved tensors to the caller's)."""
    b_, h, t, d = query.shape
    groups = h // key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q, k, v = (x.detach().double() for x in (query, key, value))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    go = grad_out.detach().double().transpose(1, 2)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, segs in enumerate(segments):
        for s, e in segs:
            qs, ks, vs, gs = q[b, :, s:e], k[b, :, s:e], v[b, :, s:e], go[b, :, s:e]
            mask = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)
            p = torch.softmax((qs @ ks.transpose(-1, -2) * scale).masked_fill(mask, float("-inf")), -1)
            dv[b, :, s:e] = p.transpose(-1, -2) @ gs
            dp = gs @ vs.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            dq[b, :, s:e] = ds @ ks * scale
            dk[b, :, s:e] = ds.transpose(-1, -2) @ qs * scale
    fold = (b_, key.shape[1], groups, t, d)
    return dq, dk.reshape(fold).sum(2), dv.reshape(fold).sum(2)


def _self_test(fn) -> str | None:
    # the first use may come inside a caller's forward: no autograd here, no autocast
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return _check(fn)


def _check(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    for h, kv, d, segs in ((4, 2, 32, [[(0, 5), (5, 37)], [(0, 37)]]), (3, 3, 64, [[(0, 1), (1, 20), (20, 37)]])):
        t = segs[0][-1][1]
        b = len(segs)
        q, k, v = (torch.randn(b, n, t, d, generator=g).to(torch.bfloat16) for n in (h, kv, kv))
        go = torch.randn(b, t, h, d, generator=g).to(torch.bfloat16)
        table = segment_table(segs)
        qt, kt, vt = _time_major(q), _time_major(k), _time_major(v)
        out, lse = torch.empty(b, t, h, d, dtype=torch.bfloat16), torch.empty(b, h, t)
        fn(0, qt, kt, vt, out, out, lse, out, out, out, table, table.shape[0], t, h, kv, d, 0.3, 1)
        ref = reference(q, k, v, segs, 0.3)
        if not torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2):
            return f"forward: max error {float((out.float() - ref).abs().max()):.3g}"
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        fn(1, qt, kt, vt, out, go, lse, dq, dk, dv, table, table.shape[0], t, h, kv, d, 0.3, 1)
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), reference_grads(q, k, v, segs, go, 0.3)):
            got = got.transpose(1, 2).double()
            if not torch.allclose(got, want, atol=3e-2 * float(want.abs().max()), rtol=3e-2):
                return f"backward {name}: max error {float((got - want).abs().max()):.3g}"
    return None
