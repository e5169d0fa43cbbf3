"""What the machine can do: device, native bf16, peak FLOP/s (table for GPUs, measured on CPUs)."""

from __future__ import annotations

import functools
import os
import platform
import time
from typing import Any

# Dense peak FLOP/s per GPU (bf16 tensor cores, no sparsity), from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them bf16 autocast on CPU is ~3x slower than fp32."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_bf16_pays() -> bool:
    """Whether ``mixed_precision: auto`` trains in bf16 on this CPU: only with AMX tiles.

    Measured by bench/precision.py (bench/README.md, CPU flags beside each figure): with AMX, bf16 is ~1.6x
    faster than fp32. With avx512_bf16 alone the answer depends on the model's size: one training step of
    llama-tiny (0.2M) 0.78x, llama-demo (2M) 1.15x, llama-20m 1.56x (AMD EPYC, 2 cores, 2026-12-01), and its
    numerics are coarser; without either, ~3x slower. So without AMX 'auto' stays fp32 (set
    ``train.mixed_precision=bf16`` for models of ~20M parameters and up); choosing per model size is open.
    """
    return "amx_bf16" in cpu_flags()


def device_type() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def bf16_native() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def bf16_faster() -> bool:
    """What ``mixed_precision: auto`` goes by: a CUDA GPU with bf16, or a CPU with AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_pays()


def preferred_dtype():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def choose_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 where it trains faster than fp32 (CUDA with bf16, a CPU with AMX), else 'no' (fp32).

    Not merely where bf16 is native: on a CPU with avx512_bf16 and no AMX it is not faster (see
    :func:`cpu_bf16_pays`)."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_faster() else "no"


def autocast_for(mixed_precision: str, device: str):
    """The autocast context of a run's training forward ('bf16'/'fp16'), or a no-op for 'no'/'fp32'. The
    engine's accelerator wraps ``model.forward`` in it, but ``PeftModel.generate`` calls the inner model's
    forward, so code that must measure what training measured enters it explicitly."""
    import contextlib

    import torch

    if mixed_precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def measure_matmul_flops(n: int = 1024, seconds: float = 0.5, dtype_name: str = "float32") -> float:
    """Sustained FLOP/s of a square matmul on the current default device (sgemm calibration)."""
    import torch

    dev = device_type()
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=dev).manual_seed(0)  # a private generator: a probe never shifts training's RNG
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= seconds and iters >= 3:
            break
    return 2 * n**3 * iters / dt


def peak_flops(precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                scale = 1.0 if precision in ("bf16", "fp16") else 0.5  # tf32 is about half
                return val * scale, f"data sheet ({name}, {precision})"
        return measure_matmul_flops(4096, 1.0, "bfloat16"), f"measured bf16 matmul ({name})"
    return measure_matmul_flops(), "measured fp32 sgemm on this CPU (1024^3, 0.5 s)"


def describe() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": bf16_native(),
        "cpu_flags": sorted({"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"} & cpu_flags()),
        "device": device_type(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def peak_memory_mb() -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU, in MiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
