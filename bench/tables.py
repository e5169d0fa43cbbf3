"""Print the markdown tables of bench/results/*.json (what bench/README.md shows).

    python bench/tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TRAIN_COLS = ["contender", "layout", "precision", "tokens_per_s", "rounds_tokens_per_s", "median_step_s", "peak_rss_mb",
              "first_loss", "final_loss", "lmwright_speedup", "rss_vs_lmwright"]
REAL_TRAIN_COLS = ["contender", "layout", "precision", "tokens_per_s", "tokens_per_cpu_s", "median_step_s", "peak_rss_mb",
                   "computed_per_real_token", "first_loss", "final_loss", "lmwright_speedup", "lmwright_speedup_cpu",
                   "rss_vs_lmwright", "model_flops", "vs_sgemm", "vs_sgemm_cpu", "vs_bf16_gemm"]
PRETRAIN_COLS = ["variant", "tokens_per_s", "median_step_s", "first_steps_s", "model_flops", "vs_sgemm",
                 "vs_bf16_gemm", "speedup", "peak_rss_mb"]


def header(d: dict) -> str:
    m, c = d.get("machine", {}), d.get("calibration", {})
    if "sgemm_flops" in c:
        return f"_{d.get('time')}, {common.machine_line(m, c)}_"
    if "cpu" in m:  # common.machine(): name the CPU flags that decide precision
        return (f"_{d.get('time')}, {m.get('cpu')} ({m.get('cpu_count')} cores), CPU flags "
                f"{', '.join(m.get('cpu_flags', [])) or 'none of avx2/avx512'}, torch {m.get('torch')}_")
    return f"_{d.get('time')}, machine {m}, calibration {c}_"


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    name = d.get("bench", path.stem)
    out = [f"### {path.stem}", "", header(d), ""]  # the file: variants of one bench share its name
    if name.startswith("train_throughput"):
        s = d["settings"]
        real = s.get("model")
        out.append(f"{real or s['preset']}, {s['precision']} autocast, {s['threads'] or 'all'} thread(s), {s['steps']} "
                   f"steps ({s['warmup']} warm-up not timed), best of {s.get('rounds', 1)} round(s)"
                   + (f", LoRA r={s['lora_r']} alpha={2 * s['lora_r']} all-linear, micro-batch {s['micro']} padded "
                      f"samples, gradient checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}"
                      if real else "") + f"; data: {d['data']}")
        rows = [{**r, "layout": r.get("layout", r.get("skipped", r.get("error", ""))),
                 "rounds_tokens_per_s": " / ".join(common.fmt(x) for x in r.get("rounds_tokens_per_s", []) if x)}
                for r in d["results"]]
        out += ["", common.markdown_table(rows, REAL_TRAIN_COLS if real else TRAIN_COLS)]
        if d.get("targets"):
            out += ["", "targets (wall time / per CPU second): " + "; ".join(
                f"{k} {common.fmt(v['measured'])} / {common.fmt(v.get('measured_cpu'))} (target {v['target']}: "
                f"{'met' if v['met'] else 'not met'} / {'met' if v.get('met_cpu') else 'not met'})"
                for k, v in d["targets"].items() if v["measured"] is not None)]
    elif name == "pretrain_throughput":
        out.append(f"{d['preset']} ({d['parameters'] / 1e6:.1f}M params), {d['flops_per_token'] / 1e6:.0f} MFLOP/token, "
                   f"seq {d['settings']['seq_len']} x micro {d['settings']['micro']}")
        out += ["", common.markdown_table(d["results"], PRETRAIN_COLS), "", f"target: {d['target']}"]
    elif name == "memory":
        out.append(f"{d['preset']}, batch {d['batch']}, precision {d['precision']}")
        out += ["", common.markdown_table(d["training"], ["method", "trainable", "trainable_pct", "base_weight_mb",
                                                         "rss_model_mb", "peak_rss_mb", "train_overhead_mb",
                                                         "peak_vs_full", "overhead_vs_full"]),
                "", common.markdown_table(d["weights"], ["preset", "load", "base_weight_mb", "vs_fp16",
                                                        "block_linear_mb", "block_linear_vs_fp16"]),
                "", f"targets: {d['targets']}"]
    elif name.startswith("serve_load"):
        b = d["baseline_generate_b1"]
        out.append(f"{d['preset']} ({d.get('dtype', 'float32')}"
                   + (f"; engine weights {d['weights']}" if d.get("weights") else "")
                   + f"), {d['new_tokens_per_request']} new tokens/request, "
                   f"baseline model.generate() batch 1: {b['tokens_per_s']:.1f} tokens/s"
                   + (f" ({b['ms_per_token']:.2f} ms/token; HF forward step {b['hf_forward_step_ms']:.2f} ms)"
                      if "ms_per_token" in b else "")
                   + (f"; with all {d['baseline_generate_b1_all_cores']['threads']} cores "
                      f"{d['baseline_generate_b1_all_cores']['tokens_per_s']:.1f} tokens/s (for the record)"
                      if d.get("baseline_generate_b1_all_cores") else "")
                   + (f"; compile + warm-up at engine start {d['compile_warmup_s']:.1f} s"
                      if d.get("compile_warmup_s") else ""))
        serving = [{**r, "rounds_tokens_per_s": " / ".join(common.fmt(x) for x in r.get("rounds_tokens_per_s", []))
                    if len(r.get("rounds_tokens_per_s", [])) > 1 else ""} for r in d["serving"]]
        out += ["", common.markdown_table(serving, ["variant", "mode", "concurrency", "requests", "tokens_per_s",
                                                   "rounds_tokens_per_s", "ratio_vs_generate_b1", "ttft_p50_s",
                                                   "ttft_p95_s", "server_ttft_mean_s"]),
                "", "Per decode step (ms) and CPU per generated token (ms):", "",
                common.markdown_table(d["serving"], ["variant", "mode", "concurrency", "wall_ms_per_step",
                                                     "forward_ms_per_step", "sample_emit_ms_per_step",
                                                     "prefill_ms_per_step", "outside_scheduler_ms_per_step",
                                                     "cpu_ms_per_token_engine", "cpu_ms_per_token_http",
                                                     "cpu_ms_per_token_client"])]
        if d.get("decode_step_profile"):
            out += ["", common.markdown_table(d["decode_step_profile"], ["variant", "batch", "profiled_ms_per_step",
                                                                        "linear_ms", "attention_ms", "other_ops_ms",
                                                                        "python_ms"])]
        if d.get("llama_cpp"):
            out += ["", "llama.cpp (xllamacpp) one stream on `lmwright export --format gguf` of the same weights:", "",
                    common.markdown_table(d["llama_cpp"], ["gguf_type", "file_mb", "tokens_per_s", "vs_generate_b1",
                                                           "decode_tokens_per_s", "prompt_ms",
                                                           "lmwright_engine_vs_llama_cpp", "lmwright_http_vs_llama_cpp",
                                                           "lmwright_decode_vs_llama_cpp_decode"])]
        if d.get("targets"):
            out += ["", f"targets: {d['targets']}"]
    elif name == "run_all":
        out += [common.markdown_table(d["runs"], ["bench", "seconds", "status"]), "",
                f"all benchmarks: {d['total_min']:.1f} min (budget {d['budget_min']:g} min: "
                f"{'met' if d['within_budget'] else 'NOT met'}); load average {d['loadavg_before'][0]:.1f} -> "
                f"{d['loadavg_after'][0]:.1f}"]
    elif name == "precision" and "rows" in d:
        out += [common.markdown_table(d["rows"], ["preset", "params", "fp32_step_s", "bf16_step_s", "bf16_speedup",
                                                  "tokens"])]
    else:
        out.append("```\n" + json.dumps({k: v for k, v in d.items() if k not in ("machine",)}, indent=1)[:4000]
                   + "\n```")
    return "\n".join(out)


def main() -> None:
    for p in sorted(common.RESULTS.glob("*.json")):
        print(render(p) + "\n")


if __name__ == "__main__":
    main()
