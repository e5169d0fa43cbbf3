"""``mixed_precision: auto`` on a CPU with avx512_bf16 but no AMX: measure, on the model itself, whether bf16
autocast trains faster than fp32 here.

Whether bf16 pays on such a CPU depends on the model's size: bf16 GEMMs run ~2x sgemm's FLOP/s, but autocast
adds casts and the elementwise work stays the same, so a 1M-parameter model trains ~1.6x *slower* in bf16 and
SmolLM2-135M ~1.6x faster (bench/README.md). :func:`bf16_probe` times a forward + backward of the model on
``tokens`` random tokens in rows of ``ROW_TOKENS`` (a micro-batch's shape; one long row would be dominated by its
attention square) in fp32 and under bf16 autocast (two warm-ups each, then the two alternated, the faster of three
runs each) and keeps bf16 only when it is at least ``MIN_SPEEDUP`` faster: its numerics are coarser, so it has to
pay clearly. On an AMD EPYC with avx512_bf16 (2026-12-01) it measured llama-tiny 0.77x, gpt-tiny 0.95-1.0x,
llama-demo 1.17x (all fp32; whole training steps in bench/precision.py: 0.78x, -, 1.14x) and SmolLM2-135M
with LoRA 1.54-1.60x (bf16; its LoRA training step: 1.67x). A model it cannot drive trains in fp32. The figures
are logged and cached (``<lmwright cache>/precision.json``, keyed by CPU,
torch, threads and the model's shape and trainable parameters), so the next run of the same model on the same
machine decides at once, and every caller in a run (the engine, exact-match evaluation, rollouts) gets the
same answer. The probe runs in eval mode under a forked RNG and leaves gradients as it found them.
``LMWRIGHT_PRECISION_PROBE=off`` skips it (``auto`` stays fp32 there: the same numerics on every such machine;
the test suite runs so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("lmwright")

MIN_SPEEDUP = 1.25  # bf16 must be this much faster than fp32 to be chosen
PROBE_TOKENS = 512
ROW_TOKENS = 128
PROBE_VERSION = 2  # part of the cache key: bump when the probe measures something else

_memo: dict[str, dict[str, Any]] = {}


def probe_target(model):
    """The language model inside what the engine trains: DDP's ``.module``; a wrapper without its own embeddings
    that holds the model as ``.policy`` (PPO's policy + value head) is probed through it."""
    bare = getattr(model, "module", model)
    if not hasattr(bare, "get_input_embeddings") and hasattr(bare, "policy"):
        bare = bare.policy
    return bare


def model_signature(model, tokens: int) -> str:
    """What the probe's result depends on besides the machine: the architecture, its sizes and which
    parameters train (LoRA and full fine-tuning of one model differ)."""
    import torch

    bare = probe_target(model)
    config = getattr(bare, "config", None)
    cfg = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    trainable = sum(p.numel() for p in bare.parameters() if p.requires_grad)
    total = sum(p.numel() for p in bare.parameters())
    return hashlib.sha256(f"{type(bare).__name__}|{cfg}|{trainable}|{total}|{tokens}|{torch.get_num_threads()}|"
                          f"v{PROBE_VERSION}".encode()).hexdigest()[:24]


def machine_key() -> str:
    import platform

    import torch

    from lmwright.utils.hardware import cpu_flags, describe

    flags = sorted({"amx_bf16", "avx512_bf16", "avx512f", "avx2"} & cpu_flags())
    return f"{describe().get('cpu', platform.machine())}|{','.join(flags)}|torch {torch.__version__}"


def _cache_file():
    from lmwright.utils.files import cache_dir

    return cache_dir("precision.json")


def read_cache() -> dict[str, Any]:
    """Every probe's cached figures by key (this module's training probe, ``models.weights``' serving probe)."""
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_cache(key: str, result: dict[str, Any]) -> None:
    """Best effort: a read-only home only costs the next run another probe."""
    path = _cache_file()
    try:
        data = read_cache()
        data[key] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.debug("precision probe: cannot cache its result in %s: %s", path, e)


def _probe_inputs(bare, tokens: int) -> dict[str, Any]:
    import torch

    config = getattr(bare, "config", None)
    emb = bare.get_input_embeddings() if hasattr(bare, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(config, "vocab_size", 256)
    g = torch.Generator().manual_seed(0)
    device = next(bare.parameters()).device
    # rows of ROW_TOKENS (a training micro-batch's shape, not one long row whose attention square would dominate),
    # never longer than the model's context
    limit = min([v for k in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(v := getattr(config, k, None), int) and v > 0] or [ROW_TOKENS])
    row = max(1, min(ROW_TOKENS, limit, tokens))
    ids = torch.randint(min(3, vocab - 1), vocab, (max(1, tokens // row), row), generator=g).to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :max(1, tokens // 4)]
    elif getattr(config, "use_cache", False):
        kwargs["use_cache"] = False
    return kwargs


def _time_step(model, kwargs: dict[str, Any], bf16: bool) -> float:
    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        out = model(**kwargs)
    first = out.logits if getattr(out, "logits", None) is not None else out[0]
    if first.dim() == 3 and first.shape[-1] > 1:  # per-token logits: a real cross-entropy, as training computes
        target = kwargs.get("decoder_input_ids", kwargs["input_ids"])[:, :first.shape[1]]
        loss = torch.nn.functional.cross_entropy(first.float().flatten(0, 1), target.flatten())
    else:
        loss = first.float().mean()
    if loss.requires_grad:
        loss.backward()
    return time.perf_counter() - t0


def measure(model, tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """Seconds of one forward + backward on ``tokens`` tokens in fp32 and in bf16 autocast, and the choice."""
    import torch

    bare = probe_target(model)
    params = list(bare.parameters())
    saved_grads = [p.grad for p in params]  # set aside: backward would accumulate into them in place
    for p in params:
        p.grad = None
    was_training = bare.training
    kwargs = _probe_inputs(bare, tokens)
    bare.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):  # warm-up: allocations, and oneDNN primitives made on first use of each shape
                _time_step(bare, kwargs, False), _time_step(bare, kwargs, True)
            fp32, bf16 = [], []
            for _ in range(3):
                fp32.append(_time_step(bare, kwargs, False))
                bf16.append(_time_step(bare, kwargs, True))
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        bare.train(was_training)
    f, b = min(fp32), min(bf16)
    speedup = f / b if b > 0 else 0.0
    return {"fp32_s": round(f, 5), "bf16_s": round(b, 5), "speedup": round(speedup, 3), "tokens": tokens,
            "min_speedup": MIN_SPEEDUP, "choice": "bf16" if speedup >= MIN_SPEEDUP else "no"}


def probe_enabled() -> bool:
    """False under ``LMWRIGHT_PRECISION_PROBE=off`` (every probe then keeps fp32: the same numerics on every machine)."""
    return os.environ.get("LMWRIGHT_PRECISION_PROBE", "on").lower() not in ("off", "0", "false", "no")


def bf16_probe(model, tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """The probe's result for ``model`` on this machine: from this process, the cache file, or measured now."""
    if not probe_enabled():
        return {"choice": "no", "source": "LMWRIGHT_PRECISION_PROBE=off", "tokens": tokens}
    key = f"{machine_key()}|{model_signature(model, tokens)}"
    if key in _memo:
        return _memo[key]
    cached = read_cache().get(key)
    if isinstance(cached, dict) and cached.get("choice") in ("bf16", "no"):
        result = dict(cached, source="cache")
    else:
        try:
            result = dict(measure(model, tokens), source="measured")
        except Exception as e:  # noqa: BLE001 - a model the probe cannot drive trains in fp32, it does not fail
            log.warning("mixed_precision auto: the bf16 probe could not run this model (%s: %s); training in fp32",
                        type(e).__name__, e)
            _memo[key] = {"choice": "no", "source": f"probe failed: {type(e).__name__}", "tokens": tokens}
            return _memo[key]
        write_cache(key, {k: v for k, v in result.items() if k != "source"})
    _memo[key] = result
    log.info("mixed_precision auto: %s on this CPU (avx512_bf16, no AMX): a forward+backward of %d tokens (rows of "
             "%d) took %.3f s in fp32 and %.3f s in bf16 autocast (%.2fx; bf16 needs >= %.2fx) [%s]",
             "bf16" if result["choice"] == "bf16" else "fp32", result["tokens"], ROW_TOKENS, result["fp32_s"],
             result["bf16_s"],
             result["speedup"], MIN_SPEEDUP, result["source"])
    return result
