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


@functools.lru_cache(maxsize=1)
def usable_cores() -> int:
    """Physical cores this process may run on: the CPUs of its affinity mask, hyper-threads of one core counted
    once (torch's own default thread count is one per physical core). Falls back to the CPU count."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list", encoding="utf-8") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them bf16 autocast on CPU is ~3x slower than fp32."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def probe_decides() -> bool:
    """Whether ``auto`` asks :mod:`lmwright.utils.precision`'s probe: a CPU run with avx512_bf16 and no AMX."""
    import torch

    flags = cpu_flags()
    return not torch.cuda.is_available() and "avx512_bf16" in flags and "amx_bf16" not in flags


def cpu_bf16_pays(model=None) -> bool:
    """Whether ``mixed_precision: auto`` trains in bf16 on this CPU.

    With AMX tiles, yes (~1.6x faster than fp32, bench/precision.py); without avx512_bf16 or AMX, no (~3x
    slower). With avx512_bf16 alone it depends on the model's size (a 1M-parameter model 0.6x, SmolLM2-135M
    ~1.6x with LoRA on the same CPU): a short probe on ``model`` decides (:func:`lmwright.utils.precision.bf16_probe`,
    logged and cached). Without a model to probe, fp32.
    """
    if "amx_bf16" in cpu_flags():
        return True
    if model is None or not probe_decides():
        return False
    from lmwright.utils.precision import bf16_probe

    return bf16_probe(model)["choice"] == "bf16"


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


def bf16_faster(model=None) -> bool:
    """What ``mixed_precision: auto`` goes by: a CUDA GPU with bf16, or a CPU where bf16 trains ``model`` faster."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_pays(model)


def preferred_dtype():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def choose_mixed_precision(requested: str, model=None) -> str:
    """'auto' -> bf16 where it trains ``model`` faster than fp32 (CUDA with bf16, a CPU with AMX, a CPU with
    avx512_bf16 where the probe measured it faster), else 'no' (fp32).

    Not merely where bf16 is native: on a CPU with avx512_bf16 and no AMX, small models train slower in bf16
    (see :func:`cpu_bf16_pays`). Every caller in a run passes the model it trains, so all get one answer."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_faster(model) else "no"


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
