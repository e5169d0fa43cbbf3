"""fp32 vs bf16 autocast: one training step (forward + backward) of each preset, side by side, on this CPU.

What ``mixed_precision: auto`` should pick is a measurement, not an assumption: this script times the
training step of the presets the demo and the tests use in both precisions (best of interleaved trials, so
other load slows both alike), prints the ratio and the CPU flags that decide it, and writes
``bench/results/precision.json``. ``lmwright.utils.hardware.cpu_bf16_pays`` encodes the result.

    python bench/precision.py [--presets llama-tiny,llama-demo,llama-20m] [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse

from common import calibrate, machine, machine_line, markdown_table, set_threads, write_result


def step_times(preset: str, repeats: int, batch: int = 16, seq: int = 128, vocab: int = 2000) -> dict[str, float]:
    import time

    import torch

    from lmwright.models.presets import ModelConfig, build_model

    model = build_model(ModelConfig(name=preset, dtype="float32"), vocab_size=vocab, seed=0)
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up: kernels chosen and cached
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], step(bf16))
    n = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "params": n, "fp32_step_s": best[False], "bf16_step_s": best[True],
            "bf16_speedup": best[False] / best[True], "tokens": batch * seq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="llama-tiny,llama-demo,llama-20m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    from lmwright.utils.hardware import choose_mixed_precision

    info, calib = machine(), calibrate()
    rows = [step_times(p, args.repeats) for p in args.presets.split(",")]
    print(machine_line(info, calib), "| cpu flags:", ", ".join(info.get("cpu_flags", [])) or "none")
    print(markdown_table(rows))
    print(f"mixed_precision=auto picks: {choose_mixed_precision('auto')}")
    path = write_result("precision", {"machine": info, "calibration": calib, "rows": rows,
                                      "auto_picks": choose_mixed_precision("auto")})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
