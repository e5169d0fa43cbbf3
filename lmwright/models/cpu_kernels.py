"""lmwright's own CPU kernels (AVX-512), where torch's leave much of the machine unused:

- :func:`q8_matmul`: every product of an int8 layer (``--weights int8`` serving), any row count (section below);
- :func:`matmul`: every product of a bf16 layer served on the CPU (any row count; below);
- :func:`decode_attention`: one decode step's attention on the serving engine's slot cache (fp32 or bf16);
- :func:`sample_row`: plain temperature sampling of one row of logits;
- :class:`CrossEntropySum`: the training loss over the output head's logits, forward and backward.

A decode step multiplies one row (one token) per stream by every weight of the model, so it is bound by how fast
the weights stream from memory. torch's kernels for these shapes leave much of that bandwidth unused (measured on
an AMD EPYC with avx512_bf16/avx512_vnni and no AMX, 1 thread, one row times a 49152 x 576 int8 weight:
``torch._weight_int8pack_mm`` 3.7 ms, 7.6 GB/s, converts every weight to float; a plain streaming read of the same
bytes runs at ~26 GB/s), and a batch of decode rows is too few for oneDNN's GEMM to reach the machine's peak. The
bf16 kernel reads each weight once, in the order it lies in memory, and uses each weight load for 16 rows:

- the weight is stored in **tiles** of 16 outputs, ``(N/16, K/2, 16, 2)``: two inputs of 16 outputs per 64-byte
  line, one sequential stream per tile (prefetched ahead), whose 16 fp32 lanes are the tile's 16 outputs (no
  horizontal sums); zero-padded to whole tiles and pairs;
- the activation rows are interleaved by groups of 16, so one tile meets 16 rows per pass while it is in L1: a
  batch reads the weights from memory once, and each weight line feeds 16 ``vdpbf16ps`` (AVX512-BF16 pair products
  summed in fp32; an fp32 FMA path without it), one accumulator per row;
- every row's sums run in the same order whatever its batch and the thread count, so a row's result does not
  depend on what it is batched with (tested).

Measured on that CPU, 1 thread, SmolLM2-135M's linears (30 layers and the 49,152-word head) per call size, against
oneDNN's packed product of the same weights in the same run: 1 row 18.8 vs 25.9 ms, 4 rows 20.3 vs 27.0, 16 rows
27.2-33.8 vs 37.3-51.5, 32 rows 47.6-59.3 vs 59.2-77.8; from 64 rows on (prefill) even with oneDNN at 1 thread
(within 2%, 64-2048 rows) and 4-10% slower than it at 2 threads (270-2048 rows). It replaced both the blocked
few-rows kernel (up to 3 rows; 19-22 ms at 1-2 rows) and oneDNN's packed copy for more rows, so a bf16 weight is
held once (it was held twice).

Each source is compiled once per machine by torch's own inductor C++ toolchain (the compiler ``torch.compile``
uses on CPUs; cached on disk) and called through a thin Python binding: no build step, no new dependency. It is
built only for CPUs with AVX-512 (F + BW; the int8 kernel also VNNI); elsewhere, or where compiling fails, the
kernel's accessor returns None (with the reason beside it) and callers keep torch's kernels.
``LMWRIGHT_CPU_KERNELS=0`` turns them all off. A self-test against a reference runs before first use.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

TILE = 16  # outputs per tile of the bf16 kernel's weight layout
PROFILE_NAME = "lmwright::cpu_kernels.matmul"  # the span a torch profiler sees for each call

# C++ shared by the kernels below: bf16 <-> fp32 (round to nearest even, as torch) and, with AVX-512, a vectorized
# exp (range reduction to 2^n * e^r, |r| <= ln2/2, then a degree-6 polynomial: ~1e-7 relative; underflows to 0)
_CPP_COMMON = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <limits>
#include <immintrin.h>

// A kernel that takes milliseconds runs without the GIL (it touches no Python object; it is always called from Python,
// holding it): the server's event loop thread sends the tokens of the step before meanwhile. Held, the loop got the
// GIL only between kernel calls, after the interpreter's 5 ms switch interval each time it wanted it back.
struct NoGil {
    PyThreadState* state;
    NoGil() : state(PyEval_SaveThread()) {}
    ~NoGil() { PyEval_RestoreThread(state); }
};
static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { return bf2f(*p); }
#if defined(__AVX512F__)
static inline __m512 exp512(__m512 x) {  // every caller passes x <= 0 (a value minus its row max)
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
// acc + a.lo * b.lo + a.hi * b.hi in each 32-bit lane of bf16 pairs
static inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
#endif
}
// 16 floats to bf16, rounded to nearest even as f2bf (nan stays nan)
static inline __m256i f2bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
}
// 16 bf16 (or fp32) values from memory as fp32
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, f2bf16(v)); }
#endif
"""

SOURCE = _CPP_COMMON + r"""

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_KERNEL 1
constexpr int NT = 16;    // outputs per tile (one 512-bit vector of fp32 lanes)
constexpr int G = 16;     // activation rows per group (multiplied by a tile together)
constexpr int PF = 2048;  // prefetch distance in bytes along a tile's weight stream

// MG (<= 16) rows of one group against one tile of 16 outputs. w: the tile's (K2, 16, 2) bf16 pairs; xg: the group's
// activations as (K2, 16 rows) bf16 pairs. out[m] lane j = sum over pairs p of w[p, j] . x[m, p] (fp32, in order of p:
// the same sums whatever MG, so a row's result does not depend on its batch)
template <int MG>
static inline void tile_rows(const uint16_t* w, const uint32_t* xg, int64_t K2, __m512* out) {
    __m512 acc[MG];
    for (int m = 0; m < MG; ++m) acc[m] = _mm512_setzero_ps();
    #pragma GCC unroll 4
    for (int64_t p = 0; p < K2; ++p) {
        const __m512i wv = _mm512_loadu_si512((const void*)(w + p * 2 * NT));
        _mm_prefetch((const char*)(w + p * 2 * NT) + PF, _MM_HINT_T0);
        for (int m = 0; m < MG; ++m) acc[m] = dot2(acc[m], wv, _mm512_set1_epi32((int)xg[p * G + m]));
    }
    for (int m = 0; m < MG; ++m) out[m] = acc[m];
}

// A few rows (a decode step's 1-4) against TQ tiles at once: TQ weight streams read side by side keep more lines
// in flight from memory than one tile after another (with one row a tile is a single chain of products, each waiting
// on its line), with a longer prefetch distance (PF_FEW) than the compute-bound 16-row groups need. Each output's sum
// runs over p in the same order as in tile_rows, so a row's result does not change with its batch. SmolLM2's linears
// for one row, 1 thread, same process: 20.5 -> 15.0 ms (one tile at a time: 2 rows 19.2 -> 14.9 ms).
constexpr int PF_FEW = 8192;
template <int MG, int TQ>
static inline void tiles_rows(const uint16_t* w, int64_t tile_stride, const uint32_t* xg, int64_t K2, __m512* out) {
    __m512 acc[TQ * MG];
    for (int i = 0; i < TQ * MG; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; ++p) {
        __m512i xv[MG];
        for (int m = 0; m < MG; ++m) xv[m] = _mm512_set1_epi32((int)xg[p * G + m]);
        for (int q = 0; q < TQ; ++q) {
            const uint16_t* wq = w + q * tile_stride + p * 2 * NT;
            const __m512i wv = _mm512_loadu_si512((const void*)wq);
            _mm_prefetch((const char*)wq + PF_FEW, _MM_HINT_T0);
            for (int m = 0; m < MG; ++m) acc[q * MG + m] = dot2(acc[q * MG + m], wv, xv[m]);
        }
    }
    for (int i = 0; i < TQ * MG; ++i) out[i] = acc[i];
}

// y (MG, N) for MG <= 4 rows: TQ tiles at a time (the last tiles one at a time), split over the threads
template <int MG, int TQ>
static void few_rows(const uint16_t* w, const uint32_t* xi, uint16_t* y, int64_t N, int64_t K2, int64_t tiles,
                     int64_t nt) {
    const int64_t groups = tiles / TQ, items = groups + tiles % TQ;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t i = 0; i < items; ++i) {
        const int64_t t = i < groups ? i * TQ : groups * TQ + (i - groups), tq = i < groups ? TQ : 1;
        const uint16_t* wt = w + t * NT * 2 * K2;
        __m512 out[TQ * MG];
        if (tq == TQ) tiles_rows<MG, TQ>(wt, NT * 2 * K2, xi, K2, out);
        else tiles_rows<MG, 1>(wt, 0, xi, K2, out);
        for (int64_t q = 0; q < tq; ++q) {
            const int64_t tt = t + q, cols = N - tt * NT < NT ? N - tt * NT : NT;
            const __mmask16 valid = (__mmask16)((1u << cols) - 1u);
            for (int m = 0; m < MG; ++m)
                _mm256_mask_storeu_epi16((void*)(y + m * N + tt * NT), valid, f2bf16(out[q * MG + m]));
        }
    }
}
#endif

// y (M, N) bf16 = x (M, K) bf16 @ w.T with w given as tiles (Np/16, K2, 16, 2) of bf16 pairs (zero-padded: Np = N
// rounded up to 16 outputs, K2 = K/2 rounded up). M < 0: a capability probe (y[0] = 1 where built). M == 0: nothing.
extern "C" void kernel(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t M, int64_t N, int64_t K,
                       int64_t nt) {
    NoGil nogil;
#ifdef HAVE_KERNEL
    if (M < 0) { y[0] = 1; return; }
    if (M == 0 || N == 0) return;
    const int64_t K2 = (K + 1) / 2, groups = (M + G - 1) / G;
    std::vector<uint32_t> xi(groups * K2 * G, 0);  // (groups, K2, 16 rows) bf16 pairs
    // the activations regrouped by all threads (a prompt's 270 x 1536 took ~0.1 ms of the call alone on one)
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && M >= 2 * G)
    for (int64_t m = 0; m < M; ++m) {
        const uint16_t* xr = x + m * K;
        uint32_t* dst = xi.data() + (m / G) * K2 * G + m % G;
        for (int64_t p = 0; p < K / 2; ++p) { uint32_t v; std::memcpy(&v, xr + 2 * p, 4); dst[p * G] = v; }
        if (K % 2) dst[(K2 - 1) * G] = xr[K - 1];
    }
    const int64_t tiles = (N + NT - 1) / NT;
    switch (M) {  // a few rows: several tiles side by side (see few_rows)
        case 1: few_rows<1, 8>(w, xi.data(), y, N, K2, tiles, nt); return;
        case 2: few_rows<2, 8>(w, xi.data(), y, N, K2, tiles, nt); return;
        case 3: few_rows<3, 4>(w, xi.data(), y, N, K2, tiles, nt); return;
        case 4: few_rows<4, 4>(w, xi.data(), y, N, K2, tiles, nt); return;
        default: break;
    }
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t t = 0; t < tiles; ++t) {
        const uint16_t* wt = w + t * NT * 2 * K2;
        const int64_t cols = N - t * NT < NT ? N - t * NT : NT;
        const __mmask16 valid = (__mmask16)((1u << cols) - 1u);
        __m512 out[G];
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t m0 = g * G, mg = M - m0 < G ? M - m0 : G;
            const uint32_t* xg = xi.data() + g * K2 * G;
            switch (mg) {
                case 16: tile_rows<16>(wt, xg, K2, out); break;
                case 15: tile_rows<15>(wt, xg, K2, out); break;
                case 14: tile_rows<14>(wt, xg, K2, out); break;
                case 13: tile_rows<13>(wt, xg, K2, out); break;
                case 12: tile_rows<12>(wt, xg, K2, out); break;
                case 11: tile_rows<11>(wt, xg, K2, out); break;
                case 10: tile_rows<10>(wt, xg, K2, out); break;
                case 9: tile_rows<9>(wt, xg, K2, out); break;
                case 8: tile_rows<8>(wt, xg, K2, out); break;
                case 7: tile_rows<7>(wt, xg, K2, out); break;
                case 6: tile_rows<6>(wt, xg, K2, out); break;
                case 5: tile_rows<5>(wt, xg, K2, out); break;
                case 4: tile_rows<4>(wt, xg, K2, out); break;
                case 3: tile_rows<3>(wt, xg, K2, out); break;
                case 2: tile_rows<2>(wt, xg, K2, out); break;
                default: tile_rows<1>(wt, xg, K2, out); break;
            }
            for (int64_t m = 0; m < mg; ++m)
                _mm256_mask_storeu_epi16((void*)(y + (m0 + m) * N + t * NT), valid, f2bf16(out[m]));
        }
    }
#else
    if (M < 0) { y[0] = 0; return; }
#endif
}
"""

_ARGTYPES = ["const uint16_t*", "const uint16_t*", "uint16_t*", "int64_t", "int64_t", "int64_t", "int64_t"]
_reason: list[str] = []


def unavailable_reason() -> str | None:
    """Why :func:`kernels` returned None (None when it did not, or has not been asked yet)."""
    return _reason[0] if _reason else None


def _build(source: str, argtypes: list[str], probe_args, needs: str = "AVX-512 F/BW") -> tuple[object | None, str | None]:
    """(compiled entry, None) or (None, why not): off by the environment, no compiler, no AVX-512 (``needs``)."""
    if os.environ.get("LMWRIGHT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by LMWRIGHT_CPU_KERNELS=0"
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        fn = CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
    except Exception as e:  # noqa: BLE001 - no compiler, an older torch, ...: torch's kernels are used instead
        return None, f"could not be compiled ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
    probe = torch.zeros(1, dtype=torch.bfloat16)
    fn(*probe_args(probe))  # a capability probe (a negative size): writes the raw 16-bit value 1 where it is built
    if int(probe.view(torch.int16)[0]) != 1:
        return None, f"this CPU (or compiler) has no {needs}"
    return fn, None


def _compiled(source: str, argtypes: list[str], probe_args, self_test, reason: list[str],
              needs: str = "AVX-512 F/BW"):
    """A kernel's entry, built by :func:`_build` and passed through its ``self_test`` (an error text or None), or
    None; why not is kept in ``reason`` (what the kernel's ``*_unavailable_reason`` returns)."""
    fn, why = _build(source, argtypes, probe_args, needs)
    if fn is not None and (err := self_test(fn)) is not None:
        fn, why = None, f"failed its self-test ({err})"
    reason[:] = [why] if why else []
    return fn


@functools.cache
def kernels():
    """The compiled bf16 kernel entry (``kernel(w, x, y, M, N, K, threads)``), or None where it cannot be used
    here (see the module docstring); compiled and self-tested once per process."""
    return _compiled(SOURCE, _ARGTYPES, lambda p: (p, p, p, -1, 0, 0, 1), _self_test, _reason)


def _self_test(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    n, k = 2 * TILE + 7, 75  # a partial tile, an odd inner size
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = torch.empty(m, n, dtype=torch.bfloat16)
        fn(tiles(w), x, y, m, n, k, 1)
        ref = x.double() @ w.double().T
        if not torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())):
            return f"{m} rows: max error {float((y.double() - ref).abs().max()):.3g}"
    return None


def usable(weight: torch.Tensor) -> bool:
    """True where the bf16 kernel runs here and takes ``weight`` (a non-empty bf16 (N, K) CPU tensor): without the
    self-test's or compiler's cost for weights it could never take."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.numel() > 0 and kernels() is not None)


def _to_tiles(w: torch.Tensor, inner: int, k_multiple: int) -> torch.Tensor:
    """``w`` (N, K) zero-padded to whole tiles of 16 outputs (N) and to a multiple of ``k_multiple`` (K), as tiles
    (N/16, K/inner, 16, inner): each tile's 16 outputs side by side, ``inner`` inputs of each at a time. Shape (N', K')."""
    n, k = w.shape
    np_, kp = -(-n // TILE) * TILE, -(-k // k_multiple) * k_multiple
    padded = torch.zeros(np_, kp, dtype=w.dtype)
    padded[:n, :k] = w.detach()
    return padded.reshape(np_ // TILE, TILE, kp // inner, inner).permute(0, 2, 1, 3).contiguous().reshape(np_, kp)


def _from_tiles(t: torch.Tensor, n: int, k: int, inner: int) -> torch.Tensor:
    """The plain (``n``, ``k``) matrix back from :func:`_to_tiles`'s layout."""
    np_, kp = t.shape
    return t.reshape(np_ // TILE, kp // inner, TILE, inner).permute(0, 2, 1, 3).reshape(np_, kp)[:n, :k].contiguous()


def tiles(w: torch.Tensor) -> torch.Tensor:
    """``w`` (N, K) in the bf16 kernel's layout: zero-padded to whole tiles and pairs (N up to a multiple of 16, K
    of 2), as tiles (N/16, K/2, 16, 2): each tile's 16 outputs side by side, two inputs each per 64-byte line. Shape
    (N', K'), the padded sizes."""
    return _to_tiles(w, 2, 2)


def untile(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The plain (``n``, ``k``) weight back from :func:`tiles`'s layout."""
    return _from_tiles(t, n, k, 2)


def _rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x (..., K)`` as a contiguous bf16 (rows, K) matrix (a view where it already is one)."""
    x2 = x.reshape(x.numel() // k, k)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    return x2 if x2.is_contiguous() else x2.contiguous()


def matmul(x: torch.Tensor, tiled: torch.Tensor, n: int) -> torch.Tensor:
    """``x (..., K) @ w.T`` in bf16 (fp32 sums) with the bf16 ``w`` (``n``, K) given in :func:`tiles`'s layout;
    returns bf16 (..., n). The caller checked :func:`usable`."""
    k = x.shape[-1]
    x2 = _rows_of(x, k)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    _call(kernels(), PROFILE_NAME, (tiled, x2, y, x2.shape[0], n, k, torch.get_num_threads()))
    return y


def _call(fn, name: str, args: tuple) -> None:
    """Run a kernel entry; under a torch profiler as a span named ``name`` (it is not an aten op otherwise)."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            fn(*args)
    else:
        fn(*args)


# ----------------------------------------------------------------------------------------------- int8 weights
# The products of ``--weights int8`` serving at every row count (decode steps of any batch, prefill), with
# AVX512-VNNI's ``vpdpbusd`` (64 byte products summed into 16 int32 lanes per instruction, one per cycle on the
# EPYC above: twice ``vdpbf16ps``'s 32). The activation rows are quantized to int8 per block of 32 inputs, one fp32
# scale each (``amax / 127``), as llama.cpp's q8_0 products do: a scale per row (8 bits over the row's range)
# measured too coarse (SmolLM2-135M's greedy top-1 agreement with fp32 over 940 teacher-forced answer tokens of
# alpaca en + zh: per row 89.9%, per 64 inputs 94.1%, per 32 95.9%, bf16 activations 96.9%). Each block's 32
# products are summed exactly in int32, then scaled and summed over blocks in fp32. ``vpdpbusd`` multiplies unsigned
# by signed bytes, so the weights are stored as ``q + 128`` (1..255) and each block's int32 sum starts at
# ``-128 x sum(xq)`` (exact: subtracting the offset's share after scaling, in fp32, measurably lost accuracy, 94.4% vs
# 95.9% agreement below). Weights are stored in
# tiles of 16 outputs, ``(N/16, K/4, 16, 4)`` bytes (zero-padded to whole tiles and blocks): four consecutive inputs
# of 16 outputs per 64-byte line, one sequential stream per tile, whose lanes are the 16 outputs (no horizontal
# sums). The quantized activations are interleaved by groups of 8 rows, so one tile meets 8 rows per pass while it
# is in L1: a batch reads the weights from memory once. Every row's arithmetic is the same whatever the batch and
# the thread count (tested). Measured on the same CPU, 1 thread, SmolLM2-135M's linears (30 layers and the
# 49,152-word head) per call size, against oneDNN's packed bf16 product of the same weights in the same run: 1 row
# 8.7 vs 24.6 ms (torch's ``_weight_int8pack_mm`` took 21; the int16 few-row kernel this replaced 8.0), 16 rows
# 18.7 vs 36.1, 64 rows 63 vs 104, 256 rows 208 vs 364.
Q8_SOURCE = _CPP_COMMON + r"""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_KERNEL 1
constexpr int NT = 16;   // outputs per tile (one 512-bit vector of int32 / fp32 lanes)
constexpr int KB = 32;   // inputs per activation block (one scale each)
constexpr int G = 8;     // activation rows per group (multiplied by a tile together)
constexpr int PF = 1024; // prefetch distance in bytes along a tile's weight stream

// MG (<= 8) rows of one group against one tile of 16 outputs. w: the tile's (Kp/4, 16, 4) bytes q + 128;
// xg: the group's int8 activations as (blocks, 8 quads, 8 rows, 4 inputs); sg: its block scales (blocks, 8 rows);
// cg: 128 x each block's sum of xq (blocks, 8 rows). out[m] = sum over blocks of s_b * sum_k q * xq, each block's
// sum exact in int32: it starts at -128 x sum(xq) and adds (q + 128) * xq.
template <int MG>
static inline void tile_rows(const uint8_t* w, const int8_t* xg, const float* sg, const int32_t* cg, int64_t nb,
                             __m512* out) {
    __m512 accf[MG];
    for (int m = 0; m < MG; ++m) accf[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = w + b * (KB * NT);
        const int8_t* xb = xg + b * (KB * G);
        __m512i acc[MG];
        for (int m = 0; m < MG; ++m) acc[m] = _mm512_set1_epi32(-cg[b * G + m]);
        for (int l = 0; l < 8; ++l) _mm_prefetch((const char*)wb + PF + 64 * l, _MM_HINT_T0);
        #pragma GCC unroll 8
        for (int j = 0; j < KB / 4; ++j) {
            const __m512i wv = _mm512_loadu_si512((const void*)(wb + j * 64));
            for (int m = 0; m < MG; ++m) {
                int32_t quad; std::memcpy(&quad, xb + (j * G + m) * 4, 4);
                acc[m] = _mm512_dpbusd_epi32(acc[m], wv, _mm512_set1_epi32(quad));
            }
        }
        for (int m = 0; m < MG; ++m)
            accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(sg[b * G + m]), accf[m]);
    }
    for (int m = 0; m < MG; ++m) out[m] = accf[m];
}
#endif

// y (M, N) bf16 = x (M, K) bf16 @ (q * scale).T with wq the tiles (Np/16, Kp/4, 16, 4) of q + 128 as unsigned bytes
// (stored as q ^ 0x80; q zero-padded to Np = N rounded up to 16 outputs, Kp = K rounded up to 32 inputs), scale (N,).
// Each activation row is quantized to int8 per block of 32 inputs (one fp32 scale each, amax / 127); a row with
// inf / nan gives nan outputs, as the float product would. M < 0: a capability probe (y[0] = 1 where built).
extern "C" void kernel(const int8_t* wq, const uint16_t* x, const uint16_t* scale, uint16_t* y,
                       int64_t M, int64_t N, int64_t K, int64_t nt) {
    NoGil nogil;
#ifdef HAVE_KERNEL
    if (M < 0) { y[0] = 1; return; }
    if (M == 0 || N == 0) return;
    const uint8_t* w = (const uint8_t*)wq;
    const int64_t Kp = (K + KB - 1) / KB * KB, nb = Kp / KB, groups = (M + G - 1) / G;
    std::vector<int8_t> xq(groups * nb * KB * G, 0);   // (groups, blocks, 8 quads, 8 rows, 4)
    std::vector<float> xs(groups * nb * G, 0.f);        // (groups, blocks, 8 rows)
    std::vector<int32_t> xc(groups * nb * G, 0);        // (groups, blocks, 8 rows): 128 x sum of the block's xq
    std::vector<uint8_t> bad(M, 0);
    // the rows quantized by all threads (each writes only its own entries)
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1 && M >= 4 * G)
    for (int64_t m = 0; m < M; ++m) {
        const int64_t g = m / G, r = m % G;
        for (int64_t b = 0; b < nb; ++b) {
            const uint16_t* xb = x + m * K + b * KB;
            const int64_t valid = K - b * KB < KB ? K - b * KB : KB;
            const __mmask32 lanes = valid == KB ? (__mmask32)0xffffffffu : (__mmask32)((1u << valid) - 1u);
            __m512i raw = _mm512_maskz_loadu_epi16(lanes, (const void*)xb);
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
            __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            if (!std::isfinite(amax)) bad[m] = 1;
            const float s = (amax > 0.f && std::isfinite(amax)) ? amax / 127.f : 0.f;
            const __m512 inv = _mm512_set1_ps(s > 0.f ? 127.f / amax : 0.f);
            __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
            xs[(g * nb + b) * G + r] = s;
            xc[(g * nb + b) * G + r] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            alignas(64) int8_t v[KB];
            _mm_store_si128((__m128i*)v, _mm512_cvtsepi32_epi8(qlo));
            _mm_store_si128((__m128i*)(v + 16), _mm512_cvtsepi32_epi8(qhi));
            int8_t* dst = xq.data() + (g * nb + b) * (KB * G);
            for (int j = 0; j < KB / 4; ++j) std::memcpy(dst + (j * G + r) * 4, v + j * 4, 4);
        }
    }
    const int64_t tiles = (N + NT - 1) / NT;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t t = 0; t < tiles; ++t) {
        const uint8_t* wt = w + t * NT * Kp;
        const int64_t cols = N - t * NT < NT ? N - t * NT : NT;
        const __mmask16 valid = (__mmask16)((1u << cols) - 1u);
        const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, (const void*)(scale + t * NT))), 16));
        __m512 out[G];
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t m0 = g * G, mg = M - m0 < G ? M - m0 : G;
            const int8_t* xg = xq.data() + g * nb * KB * G;
            const float* sg = xs.data() + g * nb * G;
            const int32_t* cg = xc.data() + g * nb * G;
            switch (mg) {
                case 8: tile_rows<8>(wt, xg, sg, cg, nb, out); break;
                case 7: tile_rows<7>(wt, xg, sg, cg, nb, out); break;
                case 6: tile_rows<6>(wt, xg, sg, cg, nb, out); break;
                case 5: tile_rows<5>(wt, xg, sg, cg, nb, out); break;
                case 4: tile_rows<4>(wt, xg, sg, cg, nb, out); break;
                case 3: tile_rows<3>(wt, xg, sg, cg, nb, out); break;
                case 2: tile_rows<2>(wt, xg, sg, cg, nb, out); break;
                default: tile_rows<1>(wt, xg, sg, cg, nb, out); break;
            }
            for (int64_t m = 0; m < mg; ++m) {
                __m512 v = _mm512_mul_ps(out[m], sc);
                if (bad[m0 + m]) v = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
                _mm256_mask_storeu_epi16((void*)(y + (m0 + m) * N + t * NT), valid, f2bf16(v));
            }
        }
    }
#else
    if (M < 0) { y[0] = 0; return; }
#endif
}
"""
_Q8_ARGTYPES = ["const int8_t*", "const uint16_t*", "const uint16_t*", "uint16_t*", "int64_t", "int64_t", "int64_t",
                "int64_t"]
Q8_TILE = TILE  # outputs per tile (the bf16 kernel's tiles too)
Q8_BLOCK = 32  # inputs per activation scale
_q8_reason: list[str] = []


@functools.cache
def q8_kernel():
    """The compiled int8 entry (``kernel(tiles, x, scale, y, M, N, K, threads)``), or None where it cannot be used
    here (the reason in :func:`q8_unavailable_reason`); compiled and self-tested once per process."""
    return _compiled(Q8_SOURCE, _Q8_ARGTYPES, lambda p: (p.view(torch.int8), p, p, p, -1, 0, 0, 1), _q8_self_test,
                     _q8_reason, needs="AVX-512 F/BW/VNNI")


def q8_unavailable_reason() -> str | None:
    return _q8_reason[0] if _q8_reason else None


def q8_usable(q: torch.Tensor) -> bool:
    """True where :func:`q8_matmul` runs here and takes the int8 weight ``q`` (N, K) on the CPU (any shape)."""
    return q.dim() == 2 and q.dtype == torch.int8 and q.device.type == "cpu" and q.numel() > 0 and q8_kernel() is not None


def q8_tiles(q: torch.Tensor) -> torch.Tensor:
    """The int8 weight ``q`` (N, K) in :func:`q8_matmul`'s layout: zero-padded to whole tiles and blocks (N up to a
    multiple of 16, K of 32), as tiles (N/16, K/4, 16, 4) of ``q + 128`` in unsigned bytes, held as int8
    (``q ^ 0x80``, the same bits). Shape (N', K'), the padded sizes."""
    return torch.bitwise_xor(_to_tiles(q, 4, Q8_BLOCK), torch.tensor(-128, dtype=torch.int8))


def q8_untile(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The plain int8 weight (``n``, ``k``) back from :func:`q8_tiles`'s layout."""
    return torch.bitwise_xor(_from_tiles(t, n, k, 4), torch.tensor(-128, dtype=torch.int8)).contiguous()


def q8_matmul(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (..., K) @ (q * scale).T`` with ``q`` (N, K) given in :func:`q8_tiles`'s layout and ``scale`` (N,) per
    output; ``x`` is quantized to int8 per block of 32 inputs. Returns bf16 (..., N). The caller checked
    :func:`q8_usable`."""
    k, n = x.shape[-1], scale.numel()
    x2 = _rows_of(x, k)
    if scale.dtype != torch.bfloat16:
        scale = scale.to(torch.bfloat16)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    _call(q8_kernel(), PROFILE_NAME, (tiles, x2, scale.contiguous(), y, x2.shape[0], n, k, torch.get_num_threads()))
    return y


def q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What :func:`q8_matmul` computes, in float64 from the same int8 activation blocks (for tests and the
    self-test): ``sum over blocks of s_b * sum_k q[n, k] * xq[k]``, times ``scale[n]``, before bf16 rounding."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    kp = -(-k // Q8_BLOCK) * Q8_BLOCK
    q = F.pad(q, (0, kp - k))
    xf = F.pad(x.reshape(rows, k).to(torch.bfloat16).float(), (0, kp - k)).reshape(rows, kp // Q8_BLOCK, Q8_BLOCK)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))  # fp32, as the kernel
    xq = torch.round(xf * inv).clamp(-127, 127).double()
    s = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax)).double()  # (rows, blocks, 1)
    per_block = torch.einsum("rbk,nbk->rbn", xq, q.double().reshape(q.shape[0], kp // Q8_BLOCK, Q8_BLOCK))
    y = (per_block * s).sum(1) * scale.double()
    return y.reshape(*x.shape[:-1], q.shape[0])


def _q8_self_test(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    n, k = 3 * Q8_TILE + 5, 3 * Q8_BLOCK + 7  # a partial tile and block too
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) / 50).to(torch.bfloat16)
    for m in (1, 3, 10):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = torch.empty(m, n, dtype=torch.bfloat16)
        fn(q8_tiles(q), x, scale, y, m, n, k, 1)
        ref = q8_reference(x, q, scale)
        if not torch.allclose(y.double(), ref, rtol=2**-7, atol=1e-6 * float(ref.abs().max())):
            return f"{m} rows: max error {float((y.double() - ref).abs().max()):.3g}"
    return None


# ------------------------------------------------------------------------------------------ decode attention
# One decode step's attention on the serving engine's slot cache, in fp32: each row writes its new key and value
# at its position, then attends to its own columns 0..position. torch's scaled_dot_product_attention does this
# through a mask over the batch's widest row, a dozen small ops per layer (measured on the AMD EPYC above,
# SmolLM2-135M, 16 rows of ~100 columns: 9.5 ms of a 56 ms decode step for its 30 layers); here it is one call
# per layer: per row and key/value head, the scores of the query heads sharing it (GQA) 16 columns at a time
# (bf16 keys: ``vdpbf16ps`` pair products, exact, straight from the cache where the head size is a multiple of 32;
# else widened to fp32 once per block for all those heads), softmax with a vectorized exp (degree-6 polynomial after
# range reduction, ~1e-7 relative), and the weighted sum of values, each value vector loaded once for up to four
# heads with two columns in flight; the next row's keys and values are prefetched meanwhile (16 rows x ~100 columns
# x 30 layers of SmolLM2: 7.1 ms -> 5.5 ms per step, most of it waiting for memory). The same kernel attends a step's
# prompt rows (``prefill_attention``), each on its own prompt's buffer: the rows' keys and values written first, then
# each row attends to its columns 0..position (15 prompts of 17 tokens after a 30-token cached prefix, SmolLM2, 30
# layers: 26 ms at 1 thread against 47 ms of per-prompt SDPA calls, plus their masks and copies).
ATTENTION_SOURCE = _CPP_COMMON + r"""

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_KERNEL 1
// four vectors' sums, each 128-bit quarter i holding (sum of a's quarter i, b's, c's, d's)
static inline __m512 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}
// lane c = the sum of v[c]'s 16 lanes, for 16 vectors (a transpose-and-add tree: ~45 ops instead of 16 reductions)
static inline __m512 sum16(const __m512* v) {
    const __m512 p0 = sum4(v[0], v[1], v[2], v[3]), p1 = sum4(v[4], v[5], v[6], v[7]);
    const __m512 p2 = sum4(v[8], v[9], v[10], v[11]), p3 = sum4(v[12], v[13], v[14], v[15]);
    const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(p0, p1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(p2, p3, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(p2, p3, _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The weighted sum of values for HN query heads (HN <= 4) sharing one key/value head: out[h] = sum_j p[h][j] V[j],
// one 16-wide slice of the head at a time. Each value vector is loaded (and widened from bf16) once for the HN heads,
// and two columns run in separate accumulators, so 2 x HN independent FMA chains hide the FMA latency.
template <int HN, typename T>
static inline void weigh_values(const float* p, int64_t ps, const T* V, int64_t n, int64_t D, const float* inv,
                                T* out, int64_t os) {
    for (int64_t d = 0; d < D; d += 16) {
        __m512 a0[HN], a1[HN];
        for (int h = 0; h < HN; ++h) a0[h] = a1[h] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            const __m512 v0 = load16(V + j * D + d), v1 = load16(V + (j + 1) * D + d);
            for (int h = 0; h < HN; ++h) {
                a0[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * ps + j]), v0, a0[h]);
                a1[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * ps + j + 1]), v1, a1[h]);
            }
        }
        if (j < n) {
            const __m512 v0 = load16(V + j * D + d);
            for (int h = 0; h < HN; ++h) a0[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * ps + j]), v0, a0[h]);
        }
        for (int h = 0; h < HN; ++h)
            store16(out + h * os + d, _mm512_mul_ps(_mm512_add_ps(a0[h], a1[h]), _mm512_set1_ps(inv[h])));
    }
}

// Where row b's keys and values live: decode, slot b of the cache kc / vc (S, KV, cap, D); prefill, a prompt's own
// buffer, per row its keys' and values' addresses (KV, cap_b, D) and cap_b (rows[3b], rows[3b+1], rows[3b+2]).
template <typename T> struct Rows {
    T *kc, *vc;
    const int64_t* rows;  // nullptr: decode slots
    int64_t KV, D, cap;
    T* K(int64_t b, int64_t g) const {
        return rows ? (T*)rows[3 * b] + g * rows[3 * b + 2] * D : kc + (b * KV + g) * cap * D;
    }
    T* V(int64_t b, int64_t g) const {
        return rows ? (T*)rows[3 * b + 1] + g * rows[3 * b + 2] * D : vc + (b * KV + g) * cap * D;
    }
    int64_t columns(int64_t b) const { return rows ? rows[3 * b + 2] : cap; }
};

// q (B, H, D), where each row's keys and values live (Rows; the row's own key and value already written at its
// position by write_rows), pos (B,) each row's position; out (B, H, D).
// D % 16 == 0. T: float, or uint16_t for bf16 (q, k, v, the cache and out; the arithmetic is fp32 either way, out
// rounded to bf16 once at the end). Per row and key/value head: the scores of its G query heads, 16 columns at a
// time (a bf16 block of keys widened to fp32 once for the G heads), softmax per head, then the values weighed for
// up to 4 heads per pass over them.
template <typename T>
static void attend(const T* q, const Rows<T>& at, const int64_t* pos, T* out, int64_t B, int64_t H, int64_t KV,
                   int64_t D, float scale, int64_t nt) {
    const int64_t G = H / KV;  // query heads per key/value head
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t bg = 0; bg < B * KV; ++bg) {
        const int64_t b = bg / KV, g = bg % KV, n = pos[b] + 1;
        // outside the cache (or the prompt's buffer): no write; nan outputs, which sampling refuses
        if (pos[b] < 0 || pos[b] >= at.columns(b)) {
            for (int64_t hh = 0; hh < G; ++hh)
                for (int64_t d = 0; d < D; d += 16) store16(out + (b * H + g * G + hh) * D + d, _mm512_set1_ps(NAN));
            continue;
        }
        const T* K = at.K(b, g);
        const T* V = at.V(b, g);
        // the next row's (or head's) keys and values are fetched from memory meanwhile, a block for each of these
        const char *K1 = nullptr, *V1 = nullptr;
        int64_t pf = 0;  // bytes of each to fetch
        if (bg + 1 < B * KV) {
            const int64_t b1 = (bg + 1) / KV, g1 = (bg + 1) % KV;
            K1 = (const char*)at.K(b1, g1);
            V1 = (const char*)at.V(b1, g1);
            pf = (pos[b1] >= 0 && pos[b1] < at.columns(b1) ? pos[b1] + 1 : 0) * D * (int64_t)sizeof(T);
        }
        const int64_t ns = (n + 15) / 16 * 16;
        thread_local std::vector<float> s, kf, inv;  // scores per head; a block of keys in fp32; 1 / softmax sums
        if ((int64_t)s.size() < G * ns) s.resize(G * ns);
        if ((int64_t)kf.size() < 16 * D) kf.resize(16 * D);
        if ((int64_t)inv.size() < G) inv.resize(G);
        for (int64_t j = 0; j < n; j += 16) {
            // columns of this block that count; a block whose 16 columns all lie in the buffer is scored whole (the
            // scores past n are set to -inf before the softmax), else column by column
            const int64_t c16 = n - j < 16 ? n - j : 16;
            const bool whole = j + 16 <= at.columns(b);
            for (int64_t o = j * D * (int64_t)sizeof(T); o < pf && o < (j + 16) * D * (int64_t)sizeof(T); o += 64) {
                _mm_prefetch(K1 + o, _MM_HINT_T0);
                _mm_prefetch(V1 + o, _MM_HINT_T0);
            }
            const float* Kb = nullptr;
            if constexpr (sizeof(T) == 2) {
                if (D % 32 == 0) {  // bf16 keys and queries: pair products straight from the cache (exact products)
                    for (int64_t hh = 0; hh < G; ++hh) {
                        const uint16_t* qh = (const uint16_t*)q + (b * H + g * G + hh) * D;
                        const uint16_t* Kj = (const uint16_t*)K + j * D;
                        float* sh = s.data() + hh * ns;
                        __m512 acc[16];
                        for (int c = 0; c < 16; ++c) acc[c] = _mm512_setzero_ps();
                        if (whole) {
                            for (int64_t d = 0; d < D; d += 32) {
                                const __m512i qv = _mm512_loadu_si512(qh + d);
                                for (int c = 0; c < 16; ++c) acc[c] = dot2(acc[c], _mm512_loadu_si512(Kj + c * D + d), qv);
                            }
                            _mm512_storeu_ps(sh + j, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
                        } else {
                            for (int64_t d = 0; d < D; d += 32) {
                                const __m512i qv = _mm512_loadu_si512(qh + d);
                                for (int c = 0; c < c16; ++c) acc[c] = dot2(acc[c], _mm512_loadu_si512(Kj + c * D + d), qv);
                            }
                            for (int c = 0; c < c16; ++c) sh[j + c] = _mm512_reduce_add_ps(acc[c]) * scale;
                        }
                    }
                    continue;
                }
            }
            if constexpr (sizeof(T) == 4) {
                Kb = (const float*)(K + j * D);
            } else {
                for (int64_t c = 0; c < (whole ? 16 : c16) * D; c += 16)
                    _mm512_storeu_ps(&kf[c], load16(K + j * D + c));
                Kb = kf.data();
            }
            for (int64_t hh = 0; hh < G; ++hh) {
                const T* qh = q + (b * H + g * G + hh) * D;
                float* sh = s.data() + hh * ns;
                if (whole) {  // 16 columns: their 16 partial-sum vectors reduced together
                    __m512 acc[16];
                    for (int c = 0; c < 16; ++c) acc[c] = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += 16) {
                        const __m512 qv = load16(qh + d);
                        for (int c = 0; c < 16; ++c) acc[c] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(Kb + c * D + d), acc[c]);
                    }
                    _mm512_storeu_ps(sh + j, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
                } else {
                    for (int64_t c = 0; c < c16; ++c) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t d = 0; d < D; d += 16)
                            acc = _mm512_fmadd_ps(load16(qh + d), _mm512_loadu_ps(Kb + c * D + d), acc);
                        sh[j + c] = _mm512_reduce_add_ps(acc) * scale;
                    }
                }
            }
        }
        for (int64_t hh = 0; hh < G; ++hh) {
            float* sh = s.data() + hh * ns;
            float m = -INFINITY;
            for (int64_t j = 0; j < n; ++j) m = sh[j] > m ? sh[j] : m;
            for (int64_t j = n; j < ns; ++j) sh[j] = -INFINITY;  // exp -> 0
            const __m512 mv = _mm512_set1_ps(m);
            __m512 lsum = _mm512_setzero_ps();
            for (int64_t j = 0; j < ns; j += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sh + j), mv));
                _mm512_storeu_ps(sh + j, e);
                lsum = _mm512_add_ps(lsum, e);
            }
            inv[hh] = 1.f / _mm512_reduce_add_ps(lsum);
        }
        for (int64_t h0 = 0; h0 < G; h0 += 4) {
            const float* p = s.data() + h0 * ns;
            T* o = out + (b * H + g * G + h0) * D;
            switch (G - h0 < 4 ? G - h0 : 4) {
                case 1: weigh_values<1>(p, ns, V, n, D, &inv[h0], o, D); break;
                case 2: weigh_values<2>(p, ns, V, n, D, &inv[h0], o, D); break;
                case 3: weigh_values<3>(p, ns, V, n, D, &inv[h0], o, D); break;
                default: weigh_values<4>(p, ns, V, n, D, &inv[h0], o, D); break;
            }
        }
    }
}

// Every row's key and value written at its position first (all of them: a prompt's row attends to the columns of the
// rows before it in its prompt, which other threads may be writing), then the attention reads.
template <typename T>
static void write_rows(const T* k, const T* v, const Rows<T>& at, const int64_t* pos, int64_t B, int64_t KV,
                       int64_t D, int64_t nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t bg = 0; bg < B * KV; ++bg) {
        const int64_t b = bg / KV, g = bg % KV;
        if (pos[b] < 0 || pos[b] >= at.columns(b)) continue;
        std::memcpy(at.K(b, g) + pos[b] * D, k + (b * KV + g) * D, D * sizeof(T));
        std::memcpy(at.V(b, g) + pos[b] * D, v + (b * KV + g) * D, D * sizeof(T));
    }
}

template <typename T>
static void write_then_attend(const void* q, const void* k, const void* v, void* kc, void* vc, const int64_t* rows,
                              const int64_t* pos, void* out, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t cap,
                              float scale, int64_t nt) {
    const Rows<T> at{(T*)kc, (T*)vc, rows, KV, D, cap};
    write_rows((const T*)k, (const T*)v, at, pos, B, KV, D, nt);
    attend((const T*)q, at, pos, (T*)out, B, H, KV, D, scale, nt);
}
#endif

// bf16 != 0: q, k, v, kc, vc and out hold bf16, else fp32. B < 0: a capability probe. prefill != 0: the rows are a
// prompt's (or several prompts') tokens, rows (B, 3) gives each one's keys' and values' addresses and columns in its
// prompt's buffer (kc and vc are not read); else the rows are decode slots 0..B-1 of kc / vc. Either way each row's
// k and v (B, KV, D) are written at its position, then q attends to the row's columns 0..position.
extern "C" void kernel(const void* q, const void* k, const void* v, void* kc, void* vc, const int64_t* pos,
                       void* out, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t cap, float scale, int64_t nt,
                       int64_t bf16, const int64_t* rows, int64_t prefill) {
    NoGil nogil;
#ifdef HAVE_KERNEL
    if (B < 0) { ((uint16_t*)out)[0] = 1; return; }
    if (B == 0) return;
    if (bf16) write_then_attend<uint16_t>(q, k, v, kc, vc, prefill ? rows : nullptr, pos, out, B, H, KV, D, cap,
                                          scale, nt);
    else write_then_attend<float>(q, k, v, kc, vc, prefill ? rows : nullptr, pos, out, B, H, KV, D, cap, scale, nt);
#else
    if (B < 0) { ((uint16_t*)out)[0] = 0; return; }
#endif
}
"""
_ATTENTION_ARGTYPES = ["const void*", "const void*", "const void*", "void*", "void*", "const int64_t*", "void*",
                       "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "float", "int64_t", "int64_t",
                       "const int64_t*", "int64_t"]


@functools.cache
def attention_kernel():
    """The compiled decode-attention entry, or None where it cannot be used here (the reason in
    :func:`attention_unavailable_reason`); compiled and self-tested once per process."""
    return _compiled(ATTENTION_SOURCE, _ATTENTION_ARGTYPES,
                     lambda p: (p, p, p, p, p, torch.zeros(1, dtype=torch.long), p, -1, 0, 0, 0, 0, 1.0, 1, 0,
                                torch.zeros(1, dtype=torch.long), 0),
                     _attention_self_test, _attention_reason)


_attention_reason: list[str] = []


def attention_unavailable_reason() -> str | None:
    return _attention_reason[0] if _attention_reason else None


def attention_usable(kc: torch.Tensor, heads: int) -> bool:
    """True where :func:`decode_attention` takes this cache (fp32 or bf16, contiguous, on the CPU, head size a
    multiple of 16, whole query heads per key/value head) and the kernel runs here."""
    return (kc.dtype in (torch.float32, torch.bfloat16) and kc.device.type == "cpu" and kc.dim() == 4
            and kc.is_contiguous() and kc.shape[3] % 16 == 0 and heads % kc.shape[1] == 0
            and attention_kernel() is not None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows 0..B-1 of the slot cache ``kc``/``vc`` (S, KV, cap, D) take ``k``/``v`` (B, KV, 1, D) at ``positions``
    (B,), then ``q`` (B, H, 1, D) attends to each row's columns 0..position: what the engine's
    ``scaled_dot_product_attention`` over the causal mask gives, computed in fp32, as (B, H, 1, D) in the cache's
    dtype (fp32, or bf16: rounded once at the end). ``q``, ``k``, ``v`` are taken in the cache's dtype. The caller
    checked :func:`attention_usable`."""
    b, h, _, d = q.shape
    kv, cap = kc.shape[1], kc.shape[2]
    dt = kc.dtype
    q, k, v = (t.reshape(b, n, d).to(dt).contiguous() for t, n in ((q, h), (k, kv), (v, kv)))
    positions = positions.contiguous()
    out = torch.empty(b, 1, h, d, dtype=dt)  # (B, 1, H, D) memory: the engine's next reshape to (B, 1, H * D) is free
    o = out.transpose(1, 2)
    _call(attention_kernel(), ATTENTION_PROFILE_NAME,
          (q, k, v, kc, vc, positions, out, b, h, kv, d, cap, float(scale), torch.get_num_threads(),
           int(dt == torch.bfloat16), positions, 0))
    return o


ATTENTION_PROFILE_NAME = "lmwright::cpu_kernels.decode_attention"
PREFILL_PROFILE_NAME = "lmwright::cpu_kernels.prefill_attention"


def prefill_rows(buffers: list[torch.Tensor], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For :func:`prefill_attention`: each prompt row's (keys' address, values' address, columns) in layer 0 of its
    prompt's buffer, and what to add per layer. ``buffers[j]`` is a contiguous (layers, 2, KV, columns, D) tensor
    (the engine's ``PrefillBuffer.whole``), ``lengths[j]`` how many rows of the step are that prompt's, in order."""
    base, step = [], []
    for whole, n in zip(buffers, lengths):
        if not whole.is_contiguous() or whole.dim() != 5:
            raise ValueError("prefill buffers must be contiguous (layers, 2, kv heads, columns, head dim) tensors")
        half = whole[0, 0].numel() * whole.element_size()  # the bytes of one layer's keys
        base += [(whole.data_ptr(), whole.data_ptr() + half, whole.shape[3])] * n
        step += [(2 * half, 2 * half, 0)] * n
    return torch.tensor(base, dtype=torch.long), torch.tensor(step, dtype=torch.long)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                      positions: torch.Tensor, scale: float) -> torch.Tensor:
    """The prompt rows of a serving step, several prompts packed: row ``r``'s key and value ``k[r]``, ``v[r]``
    (KV, D) go to column ``positions[r]`` of its prompt's buffer, then its queries ``q[r]`` (H, D) attend to that
    buffer's columns 0..positions[r] (causal within the prompt, over its cached prefix too). ``rows`` (R, 3): the
    buffer's keys' and values' addresses and column count per row (:func:`prefill_rows`, plus a layer's step); the
    buffers must stay alive for the call. q, k, v and the buffers share one dtype (fp32 or bf16); fp32 arithmetic;
    returns (R, H, D). One call per layer instead of a scaled_dot_product_attention (and a mask, and two copies)
    per prompt. The caller checked :func:`attention_usable` for this dtype and head layout."""
    r, h, d = q.shape
    kv = k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(r, h, d, dtype=q.dtype)
    _call(attention_kernel(), PREFILL_PROFILE_NAME,
          (q, k, v, q, q, positions.contiguous(), out, r, h, kv, d, 0, float(scale), torch.get_num_threads(),
           int(q.dtype == torch.bfloat16), rows.contiguous(), 1))
    return out


def _attention_self_test(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    s, kv, h, cap, d = 3, 2, 6, 40, 32
    for dt in (torch.float32, torch.bfloat16):
        kc, vc = torch.randn(s, kv, cap, d, generator=g).to(dt), torch.randn(s, kv, cap, d, generator=g).to(dt)
        q, k, v = (torch.randn(2, n, 1, d, generator=g).to(dt) for n in (h, kv, kv))
        pos = torch.tensor([5, 31])  # 6 columns (one at a time) and 32 (two blocks of 16)
        ref_k, ref_v = kc.clone(), vc.clone()
        ref_k[torch.arange(2), :, pos] = k[:, :, 0]
        ref_v[torch.arange(2), :, pos] = v[:, :, 0]
        mask = (torch.arange(32)[None, :] <= pos[:, None])[:, None, None, :]
        ref = F.scaled_dot_product_attention(q.float(), ref_k[:2, :, :32].float(), ref_v[:2, :, :32].float(),
                                             attn_mask=mask, scale=0.2, enable_gqa=True)
        out = torch.empty(2, 1, h, d, dtype=dt)
        fn(q.reshape(2, h, d).contiguous(), k.reshape(2, kv, d).contiguous(), v.reshape(2, kv, d).contiguous(), kc,
           vc, pos, out, 2, h, kv, d, cap, 0.2, 1, int(dt == torch.bfloat16), pos, 0)
        if not (torch.equal(kc, ref_k) and torch.equal(vc, ref_v)):
            return f"{dt}: cache writes differ"
        tol = 1e-4 if dt == torch.float32 else 2**-7
        if not torch.allclose(out.transpose(1, 2).float(), ref, atol=tol, rtol=tol):
            return f"{dt}: max error {float((out.transpose(1, 2).float() - ref).abs().max()):.3g}"
    return None


# ------------------------------------------------------------------------------------------ cross-entropy
# The training loss over the output head's logits (``objectives.base.token_cross_entropy``): per row, the
# log-sum-exp and the label's negative log-likelihood, and in backward ``softmax - onehot`` times the incoming
# gradient, written straight in the logits' dtype. torch's path casts the (rows x vocabulary) bf16 logits to an
# fp32 copy, writes a log-softmax of the same size, and in backward reads it back and casts the gradient down
# (measured on the AMD EPYC above, a LoRA step of SmolLM2 with ~740 target positions x 49,152 words: ~0.45 s of
# a 4.8 s step); here it is one read of the logits in forward (two passes over a row that stays in cache) and one
# read and one write in backward, nothing of the logits' size saved but the logits themselves.
CROSS_ENTROPY_SOURCE = _CPP_COMMON + r"""

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_KERNEL 1
template <bool BF16> static inline __m512 load(const void* p, int64_t j) {
    if (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                   _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + j))), 16));
    return _mm512_loadu_ps((const float*)p + j);
}
template <bool BF16> static inline float load1(const void* p, int64_t j) {
    return BF16 ? bf2f(((const uint16_t*)p)[j]) : ((const float*)p)[j];
}
template <bool BF16> static inline void store(void* p, int64_t j, __m512 v) {
    if (BF16) {  // round to nearest even, as torch's casts do (values here are finite)
        __m512i u = _mm512_castps_si512(v);
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        _mm256_storeu_si256((__m256i*)((uint16_t*)p + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_storeu_ps((float*)p + j, v);
    }
}
template <bool BF16> static inline void store1(void* p, int64_t j, float v) {
    if (BF16) ((uint16_t*)p)[j] = f2bf(v); else ((float*)p)[j] = v;
}

template <bool BF16>
static void forward(const void* x, const int64_t* labels, float* lse, float* nll, int64_t N, int64_t V, int64_t nt) {
    const int64_t V16 = V - V % 16;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t n = 0; n < N; ++n) {
        const void* row = BF16 ? (const void*)((const uint16_t*)x + n * V) : (const void*)((const float*)x + n * V);
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < V16; j += 16) mv = _mm512_max_ps(mv, load<BF16>(row, j));
        float m = _mm512_reduce_max_ps(mv);
        for (int64_t j = V16; j < V; ++j) m = std::fmax(m, load1<BF16>(row, j));
        const __m512 mb = _mm512_set1_ps(m);
        __m512 sv = _mm512_setzero_ps();
        for (int64_t j = 0; j < V16; j += 16) sv = _mm512_add_ps(sv, exp512(_mm512_sub_ps(load<BF16>(row, j), mb)));
        float s = _mm512_reduce_add_ps(sv);
        for (int64_t j = V16; j < V; ++j) s += std::exp(load1<BF16>(row, j) - m);
        lse[n] = m + std::log(s);
        const int64_t t = labels[n];
        nll[n] = (t >= 0 && t < V) ? lse[n] - load1<BF16>(row, t) : 0.f;
    }
}

template <bool BF16>
static void backward(const void* x, const int64_t* labels, const float* lse, const float* g, void* grad, int64_t N,
                     int64_t V, int64_t nt) {
    const int64_t V16 = V - V % 16;
    #pragma omp parallel for num_threads(nt) schedule(static) if(nt > 1)
    for (int64_t n = 0; n < N; ++n) {
        const void* row = BF16 ? (const void*)((const uint16_t*)x + n * V) : (const void*)((const float*)x + n * V);
        void* out = BF16 ? (void*)((uint16_t*)grad + n * V) : (void*)((float*)grad + n * V);
        const int64_t t = labels[n];
        const float gn = (t >= 0 && t < V) ? g[0] : 0.f;  // ignored rows: no gradient
        const __m512 lb = _mm512_set1_ps(lse[n]), gb = _mm512_set1_ps(gn);
        for (int64_t j = 0; j < V16; j += 16)
            store<BF16>(out, j, _mm512_mul_ps(exp512(_mm512_sub_ps(load<BF16>(row, j), lb)), gb));
        for (int64_t j = V16; j < V; ++j) store1<BF16>(out, j, std::exp(load1<BF16>(row, j) - lse[n]) * gn);
        if (gn != 0.f) store1<BF16>(out, t, (std::exp(load1<BF16>(row, t) - lse[n]) - 1.f) * gn);
    }
}
#endif

// mode 0: forward (lse, nll); mode 1: backward (grad from lse and g, one float: the loss sum's gradient).
// x (N, V) bf16 (kind 0) or fp32 (kind 1); labels (N,), negative = ignored. N < 0: a capability probe.
extern "C" void kernel(const void* x, const int64_t* labels, float* lse, float* nll, const float* g, void* grad,
                       int64_t N, int64_t V, int64_t kind, int64_t mode, int64_t nt) {
    NoGil nogil;
#ifdef HAVE_KERNEL
    if (N < 0) { ((uint16_t*)nll)[0] = 1; return; }
    if (N == 0) return;
    if (mode == 0) { if (kind == 0) forward<true>(x, labels, lse, nll, N, V, nt); else forward<false>(x, labels, lse, nll, N, V, nt); }
    else { if (kind == 0) backward<true>(x, labels, lse, g, grad, N, V, nt); else backward<false>(x, labels, lse, g, grad, N, V, nt); }
#else
    if (N < 0) { ((uint16_t*)nll)[0] = 0; return; }
#endif
}
"""
_CROSS_ENTROPY_ARGTYPES = ["const void*", "const int64_t*", "float*", "float*", "const float*", "void*", "int64_t",
                           "int64_t", "int64_t", "int64_t", "int64_t"]
_cross_entropy_reason: list[str] = []


@functools.cache
def cross_entropy_kernel():
    """The compiled cross-entropy entry, or None where it cannot be used here (the reason in
    :func:`cross_entropy_unavailable_reason`); compiled and self-tested once per process."""
    def probe(p):
        z = torch.zeros(1, dtype=torch.long)
        return p, z, p, p, p, p, -1, 0, 0, 0, 1

    return _compiled(CROSS_ENTROPY_SOURCE, _CROSS_ENTROPY_ARGTYPES, probe, _cross_entropy_self_test,
                     _cross_entropy_reason)


def cross_entropy_unavailable_reason() -> str | None:
    return _cross_entropy_reason[0] if _cross_entropy_reason else None


def cross_entropy_usable(logits: torch.Tensor) -> bool:
    """True where :class:`CrossEntropySum` takes these (N, V) logits: bf16 or fp32, on the CPU, contiguous."""
    return (logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32)
            and logits.is_contiguous() and logits.shape[1] > 0 and cross_entropy_kernel() is not None)


def _kind(x: torch.Tensor) -> int:
    return 0 if x.dtype == torch.bfloat16 else 1


class CrossEntropySum(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), labels, ignore_index=<negative>, reduction="sum")`` for (N, V) logits on a
    CPU (see above); the gradient comes back in the logits' dtype. Callers check :func:`cross_entropy_usable`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, v = logits.shape
        labels = labels.contiguous()
        lse, nll = torch.empty(n), torch.empty(n)
        cross_entropy_kernel()(logits, labels, lse, nll, lse, lse, n, v, _kind(logits), 0, torch.get_num_threads())
        ctx.save_for_backward(logits, labels, lse)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        n, v = logits.shape
        grad = torch.empty_like(logits)
        g = grad_out.detach().float().reshape(1).contiguous()
        cross_entropy_kernel()(logits, labels, lse, lse, g, grad, n, v, _kind(logits), 1, torch.get_num_threads())
        return grad, None


def _cross_entropy_self_test(fn) -> str | None:
    # the first use may come inside a caller's forward (no autograd here: a gradient-checkpointed region counts
    # the tensors its ops save) or under autocast
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return _cross_entropy_check(fn)


def _cross_entropy_check(fn) -> str | None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(5, 70, generator=g) * 4).to(dtype)
        labels = torch.tensor([3, -100, 69, 0, 17])
        lse, nll = torch.empty(5), torch.empty(5)
        fn(x, labels, lse, nll, lse, lse, 5, 70, _kind(x), 0, 1)
        ref = F.cross_entropy(x.float(), labels, ignore_index=-100, reduction="none")
        if not torch.allclose(nll, ref, atol=1e-4, rtol=1e-5):
            return f"{dtype} forward: max error {float((nll - ref).abs().max()):.3g}"
        grad = torch.empty_like(x)
        fn(x, labels, lse, nll, torch.tensor([0.5]), grad, 5, 70, _kind(x), 1, 1)
        valid = labels >= 0  # d(0.5 x sum of NLLs)/dx = 0.5 (softmax - onehot) on the rows with a label
        want = (torch.softmax(x.double(), -1) - F.one_hot(labels.clamp(min=0), 70).double()) * 0.5 * valid[:, None]
        if not torch.allclose(grad.double(), want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2):
            return f"{dtype} backward: max error {float((grad.double() - want).abs().max()):.3g}"
    return None


# ------------------------------------------------------------------------------------------------ sampling
# One token drawn from ``softmax(logits / temperature)`` by inverse CDF on one uniform number, the serving engine's
# plain temperature sampling (``engine.sampling.draw`` does the same through torch: a float32 softmax copy, a float64
# cumulative sum and a search, ~0.13 ms per row over SmolLM2's 49,152 words, ~2 ms of a 16-stream step). Here: the
# row's max, then exp((x - max) / T) summed per chunk of 1024 words (fp32 lanes, chunk totals in float64), the chunk
# where the cumulative total passes u x total, and inside it the first word where the float64 running sum passes
# it; ~20 us per row. A word of probability 0 (exp underflows) is never drawn; a row with nan or +inf gives -1.
SAMPLE_SOURCE = _CPP_COMMON + r"""
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_KERNEL 1
template <typename T>
static int64_t draw_row(const T* x, int64_t V, float inv_t, double u) {
    constexpr int64_t CH = 1024;
    const int64_t V16 = V - V % 16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0;
    for (int64_t i = 0; i < V16; i += 16) {
        const __m512 v = load16(x + i);
        bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
        mx = _mm512_max_ps(mx, v);
    }
    float m = _mm512_reduce_max_ps(mx);
    for (int64_t i = V16; i < V; ++i) {
        const float v = load1(x + i);
        if (std::isnan(v) || v == INFINITY) bad = 1;
        m = v > m ? v : m;
    }
    if (bad || !(m > -INFINITY)) return -1;
    const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(inv_t);
    const int64_t nch = (V + CH - 1) / CH;
    std::vector<double> part(nch);
    double total = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
        const int64_t lo = c * CH, hi = lo + CH < V ? lo + CH : V;
        __m512 acc = _mm512_setzero_ps();
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) acc = _mm512_add_ps(acc, exp512(_mm512_mul_ps(_mm512_sub_ps(load16(x + i), mv), tv)));
        double s = _mm512_reduce_add_ps(acc);
        for (; i < hi; ++i) s += std::exp((load1(x + i) - m) * inv_t);
        part[c] = s;
        total += s;
    }
    const double target = u * total;
    double cum = 0.0;
    int64_t c = 0;
    while (c + 1 < nch && cum + part[c] <= target) cum += part[c++];
    const int64_t lo = c * CH, hi = lo + CH < V ? lo + CH : V;
    int64_t last = -1;  // the chunk's last word of nonzero probability (when rounding leaves the sum short)
    alignas(64) float e[16];
    for (int64_t i = lo; i < hi; i += 16) {
        const int64_t w = hi - i < 16 ? hi - i : 16;
        if (w == 16) _mm512_store_ps(e, exp512(_mm512_mul_ps(_mm512_sub_ps(load16(x + i), mv), tv)));
        else for (int64_t j = 0; j < w; ++j) e[j] = std::exp((load1(x + i + j) - m) * inv_t);
        for (int64_t j = 0; j < w; ++j) {
            if (e[j] > 0.f) {
                cum += e[j];
                last = i + j;
                if (cum > target) return i + j;
            }
        }
    }
    return last;
}
#endif

// out[0] = the word drawn from x (V,) (bf16 when bf16 != 0, else fp32) at 1 / temperature inv_t and the uniform
// number u = u53 / 2^53 in [0, 1); -1 for a row with nan or +inf. V < 0: a capability probe.
extern "C" void kernel(const void* x, float inv_t, int64_t u53, int64_t* out, int64_t V, int64_t bf16) {
#ifdef HAVE_KERNEL
    if (V < 0) { ((uint16_t*)out)[0] = 1; return; }
    const double u = std::ldexp((double)u53, -53);
    out[0] = bf16 ? draw_row((const uint16_t*)x, V, inv_t, u) : draw_row((const float*)x, V, inv_t, u);
#else
    if (V < 0) { ((uint16_t*)out)[0] = 0; return; }
#endif
}
"""
_SAMPLE_ARGTYPES = ["const void*", "float", "int64_t", "int64_t*", "int64_t", "int64_t"]  # (no double arguments)
_sample_reason: list[str] = []


@functools.cache
def sampling_kernel():
    """The compiled sampling entry, or None where it cannot be used here (the reason in
    :func:`sampling_unavailable_reason`); compiled and self-tested once per process."""
    return _compiled(SAMPLE_SOURCE, _SAMPLE_ARGTYPES, lambda p: (p, 1.0, 0, p, -1, 0), _sample_self_test,
                     _sample_reason)


def sampling_unavailable_reason() -> str | None:
    return _sample_reason[0] if _sample_reason else None


def sampling_usable(logits: torch.Tensor) -> bool:
    """True where :func:`sample_row` takes this row of logits (V,): fp32 or bf16 on the CPU."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() == 1
            and logits.shape[0] > 0 and sampling_kernel() is not None)


def sample_row(logits: torch.Tensor, temperature: float, u: float) -> int:
    """One word of ``logits`` (V,) drawn from ``softmax(logits / temperature)`` with the uniform number ``u`` in
    [0, 1) (inverse CDF); -1 where the row has nan or +inf. The caller checked :func:`sampling_usable`."""
    x = logits if logits.is_contiguous() else logits.contiguous()
    out = torch.empty(1, dtype=torch.long)
    sampling_kernel()(x, 1.0 / temperature, int(u * 2**53), out, x.shape[0], int(x.dtype == torch.bfloat16))
    return int(out[0])


def _sample_self_test(fn) -> str | None:
    x = torch.tensor([[0.0, 1.0, float("-inf"), 2.0] * 300 + [0.5] * 5])  # 1205 words: two chunks and a tail
    p = torch.softmax(x[0].double(), 0)
    cdf = torch.cumsum(p, 0)
    for u in (0.0, 0.3, 0.77, 0.999999):
        out = torch.empty(1, dtype=torch.long)
        fn(x[0], 1.0, int(u * 2**53), out, x.shape[1], 0)
        want = int(torch.searchsorted(cdf, torch.tensor(u, dtype=torch.float64), right=True))
        if int(out) != want and not (abs(float(cdf[int(out)]) - u) < 1e-9 or abs(float(cdf[want]) - u) < 1e-9):
            return f"u={u}: drew {int(out)}, the inverse CDF gives {want}"
        if float(p[int(out)]) == 0:
            return f"u={u}: drew a word of probability 0"
    return None
