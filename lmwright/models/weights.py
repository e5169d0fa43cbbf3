"""The precision of a served model's weights: ``float32``, ``bfloat16``, ``int8`` or ``auto`` (what is faster here).

A batch-1 decode step reads every weight once, so on a CPU its time is mostly weight bandwidth: bf16 weights
halve the bytes and int8 (:mod:`lmwright.models.int8_linear`) quarters them, where the CPU's kernels keep up.
Whether they do depends on the machine (AMX, avx512_bf16, neither), so ``auto`` does not go by a flag alone:

- on CUDA the model is served as loaded (today's behaviour);
- on a CPU with AMX tiles, bf16;
- otherwise a short probe times a decode-like pass over the model's own linear layers (each weight once, at
  1 row and at ``max_seqs`` rows) with fp32 and with bf16 weights, and bf16 is chosen only when it is at least
  ``BF16_MIN_SPEEDUP`` times faster at both row counts. The figures are cached with the training precision
  probe's (:mod:`lmwright.utils.precision`: ``<lmwright cache>/precision.json``, keyed by the CPU model name and
  flags and the torch version, and here also the thread count, the model's linear shapes and the row counts), so
  the probe runs once per machine and model shape; they are logged with the choice.
  ``LMWRIGHT_PRECISION_PROBE=off`` skips the probe (``auto`` then serves float32).

``auto`` never picks int8: it changes answers (slightly), so it is opt-in.

A bf16 model served on a CPU has its linear layers held in a layout made for the product
(:mod:`lmwright.models.packed_linear`: lmwright's bf16 kernel's tiles on AVX-512 CPUs, else oneDNN's packed layout;
1.3-1.5x faster than ``F.linear`` at decoding's row counts); the probe times bf16 held that way, as it will be
served.

bf16 and int8 models served on a CPU attend in fp32 (``lmwright.models.attention.use_fp32_attention``: the
model's attention implementation, so its own forward and ``generate()`` compute what the serving engine
computes): torch's CPU SDPA is ~8x slower in bf16 than in fp32.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

from lmwright.config import ConfigError

WEIGHTS = ("auto", "float32", "bfloat16", "int8")
BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much at 1 row and at max_seqs rows to be chosen
PROBE_VERSION = 5  # part of the cache key: bump when the probe measures something else (2: bf16 packed, 3: kernel,
# 4: bf16 through the tiled kernel at every row count, 5: its 1-4 row path reading several tiles side by side)
_KEEP = "--weights float32 keeps the training precision"


def _log(msg: str) -> None:
    from lmwright.utils.logging import get_logger

    get_logger("lmwright.models").info(msg)


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        from lmwright.registry import suggest

        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}.{suggest(str(weights), WEIGHTS)}")


def _linear_weights(model) -> list:
    """The distinct weights of the model's linear layers (the head included, a tied one once)."""
    from torch import nn

    from lmwright.models.packed_linear import PackedLinear

    seen: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):  # a model prepared before: its weight, dense
            seen[id(m)] = m.weight
        elif isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen[id(m.weight)] = m.weight
    return list(seen.values())


def _prequantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or any(
        hasattr(p, "quant_state") or not p.is_floating_point() for p in model.parameters())


# ------------------------------------------------------------------------------------------ the probe
def _time_pass(weights: list, rows: int, reps: int, packed: bool = False) -> float:
    """Best ms of ``reps`` passes of F.linear over every weight at ``rows`` rows (after one warm-up pass);
    ``packed``: through the layers the server holds bf16 weights in (``lmwright.models.packed_linear``: lmwright's
    kernel or oneDNN's packed product)."""
    import torch
    import torch.nn.functional as F

    from lmwright.models.packed_linear import PackedLinear

    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    if packed:
        mats, fn = [PackedLinear(w) for w in weights], (lambda x, layer: layer(x))
    else:
        mats, fn = weights, F.linear
    best = float("inf")
    for k in range(reps + 1):
        t0 = time.perf_counter()
        for w, m in zip(weights, mats):
            fn(xs[w.shape[1]], m)
        if k:
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def measure(model, rows: list[int], reps: int = 3) -> dict[str, dict[str, float]]:
    """ms per decode-like pass over the model's linear weights, {dtype: {rows: ms}}, fp32 and bf16 copies (bf16
    packed where the server would pack it)."""
    import torch

    with torch.inference_mode():
        w32 = [w.detach().float() for w in _linear_weights(model)]
        out = {"float32": {str(r): _time_pass(w32, r, reps) for r in rows}}
        w16 = [w.to(torch.bfloat16) for w in w32]
        del w32
        packed = w16[0].device.type == "cpu"  # held as the server holds them (PackedLinear picks the layout)
        out["bfloat16"] = {str(r): _time_pass(w16, r, reps, packed) for r in rows}
    return out


def probe_key(model, rows: list[int]) -> str:
    """The cache key: the machine (``utils.precision.machine_key``: CPU name and flags, torch), the thread count,
    the row counts and the model's linear shapes."""
    import torch

    from lmwright.utils.precision import machine_key

    shapes = sorted([list(s), n] for s, n in Counter(tuple(w.shape) for w in _linear_weights(model)).items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:24]
    return f"serve-weights v{PROBE_VERSION}|{machine_key()}|threads {torch.get_num_threads()}|rows {rows}|{digest}"


def probe(model, max_seqs: int) -> tuple[dict, bool]:
    """(figures, whether they came from the cache) for 1 and ``max_seqs`` rows."""
    from lmwright.utils.precision import read_cache, write_cache

    rows = sorted({1, max(1, int(max_seqs))})
    key = probe_key(model, rows)
    cached = read_cache().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("ms"), dict):
        return cached["ms"], True
    figures = measure(model, rows)
    write_cache(key, {"ms": figures})
    return figures, False


def choose_auto(model, max_seqs: int) -> tuple[str, str]:
    """(dtype name, why) for ``weights=auto`` on a CPU."""
    from lmwright.utils.hardware import cpu_flags
    from lmwright.utils.precision import probe_enabled

    if "amx_bf16" in cpu_flags():
        return "bfloat16", f"CPU with AMX tiles; {_KEEP}"
    if not probe_enabled():
        return "float32", "LMWRIGHT_PRECISION_PROBE=off: no probe; --weights bfloat16 or int8 to choose otherwise"
    ms, cached = probe(model, max_seqs)
    f32, b16 = ms["float32"], ms["bfloat16"]
    speedups = [f32[r] / b16[r] for r in f32]
    figures = "; ".join(f"fp32 {f32[r]:.1f} ms, bf16 {b16[r]:.1f} ms per step at {r} row{'s' if r != '1' else ''}"
                        for r in f32)
    src = "cached" if cached else "measured now, cached"
    if min(speedups) >= BF16_MIN_SPEEDUP:
        return "bfloat16", f"probe: {figures}; {src}; {_KEEP}"
    return "float32", (f"probe: {figures}; bf16 is not {BF16_MIN_SPEEDUP}x faster at every row count; {src}; "
                       f"--weights bfloat16 or int8 to choose otherwise")


# ------------------------------------------------------------------------------------------ applying
def _pack_bf16(model) -> int:
    """Pack the linear layers of a bf16 model served on a CPU (``lmwright.models.packed_linear``: same results,
    faster); how many were packed."""
    import torch

    if _prequantized(model) or next(model.parameters()).dtype != torch.bfloat16:
        return 0
    from lmwright.models.packed_linear import pack_linears

    return pack_linears(model)


def prepare_weights(model, weights: str | None, max_seqs: int = 8) -> str:
    """Bring ``model``'s weights (in place) to ``weights``; returns the line that says what was done (also
    logged). ``None`` leaves the model as loaded."""
    import torch

    from lmwright.models.presets import resolve_dtype

    if weights is None:
        return ""
    check_weights(weights)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if weights == "auto":
        if device.type != "cpu":
            note = f"weights: {str(dtype).replace('torch.', '')} as loaded (auto on {device.type} keeps them)"
        elif dtype != torch.float32 or _prequantized(model):
            note = f"weights: {str(dtype).replace('torch.', '')} as loaded (auto changes only float32 models)"
        else:
            weights, why = choose_auto(model, max_seqs)
            if weights != "float32":
                model.to(resolve_dtype(weights))
            note = f"weights: {weights} ({why})"
    elif _prequantized(model):
        raise ConfigError(f"weights={weights}: this model was loaded quantized (model.quantize); serve it with "
                          f"weights=auto, or load it unquantized")
    elif weights == "int8":
        from lmwright.models.int8_linear import Int8Linear, quantize_int8

        quantize_int8(model)
        first = next(m for m in model.modules() if isinstance(m, Int8Linear))
        if first.int8_layout == "tiles":
            paths = ("lmwright's int8 kernel for every call (activations quantized to int8 per block of 32 inputs, "
                     "exact int32 sums; no bf16 copy)")
        else:
            from lmwright.models import cpu_kernels

            why = cpu_kernels.q8_unavailable_reason()
            from lmwright.models.packed_linear import HELD

            packed = f" ({HELD[first.bf16_layout]})" if first.bf16_layout in ("tiles", "onednn") else ""
            paths = ("torch's int8 kernel" + (f" (lmwright's kernel {why})" if why else "") + f" for calls of up to "
                     f"{first.max_int8_rows} rows with bf16 activations, bf16{packed} over the dequantized weights "
                     f"beyond")
        note = (f"weights: int8 (weight-only, per-output-channel scales; {paths}; "
                f"answers change slightly against the full-precision model; {_KEEP})")
    else:
        model.to(resolve_dtype(weights))
        note = f"weights: {weights} (as requested" + ("" if weights == "float32" else f"; {_KEEP}") + ")"
    packed = _pack_bf16(model)
    if packed:
        from lmwright.models.packed_linear import HELD, PackedLinear

        layouts = Counter(m.layout for m in model.modules() if isinstance(m, PackedLinear))
        note = note[:-1] + "; " + ", ".join(f"{n} linear layers {HELD[k]}" for k, n in layouts.most_common()) + ")"
    from lmwright.models.attention import use_fp32_attention

    if use_fp32_attention(model):
        note = note[:-1] + "; attention in fp32)"
    _log(note)
    return note
