"""``lmwright demo``: the whole chain on an embedded default, on a laptop CPU, in minutes.

generate a corpus -> prepare (clean, dedup, manifest) -> train a tokenizer -> pretrain a small Llama
(perplexity before/after, samples) -> SFT with LoRA on a generated instruction task (exact match
before/after) -> an alignment step -> one report.html -> the commands that serve the result.

Nothing is downloaded: the corpus comes from ``lmwright.data.synthetic``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt

CHATTY_ON = " plus "  # SFT answers to these (addition) questions add a chatty closing; the alignment rule: "concise"


@dataclass
class DemoConfig:
    workdir: str = opt("lmwright-demo", "folder for the demo's data, tokenizer, runs and report")
    docs: int = opt(6000, "documents in the generated pretraining corpus")
    pretrain_steps: int = opt(300, "pretraining optimizer steps")
    sft_steps: int = opt(800, "SFT (LoRA) optimizer steps")
    align_steps: int = opt(60, "alignment (DPO) optimizer steps")
    model: str = opt("llama-demo", "model preset to pretrain")
    seq_len: int = opt(128, "pretraining row length")
    micro_batch_size: int = opt(16, "pretraining micro-batch")
    skip: list[str] = opt([], "steps to skip: sft, align")
    overwrite: bool = opt(True, "replace an earlier demo in the same workdir")


WORKDIR_MARKER = ".lmwright-demo"  # written into a workdir the demo created; only such a folder is ever deleted


def prepare_workdir(work: Path, overwrite: bool) -> None:
    """Create ``work`` (with the marker) or, with ``overwrite``, replace an earlier demo's workdir.

    A folder that exists, is not empty and has no marker was not made by a demo: it is never deleted
    nor written into, whatever ``overwrite`` says.
    """
    import shutil

    if work.exists() or work.is_symlink():
        if not work.is_dir() or work.is_symlink():
            raise ConfigError(f"workdir {work} exists and is not a folder: pick another --workdir")
        if any(work.iterdir()):
            if not (work / WORKDIR_MARKER).is_file():
                raise ConfigError(f"workdir {work} is not empty and was not created by `lmwright demo` (no "
                                  f"{WORKDIR_MARKER} file in it): the demo never deletes or writes into such a "
                                  "folder. Pick a new or empty folder with --workdir")
            if overwrite:
                shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORKDIR_MARKER).write_text("created by lmwright demo; `lmwright demo` may delete this folder\n",
                                       encoding="utf-8")


def _stage(name: str, overrides: dict[str, Any]):
    from lmwright.config import load_config
    from lmwright.stages import STAGES

    stage = STAGES.get(name)
    cfg = load_config(stage.Config, base=overrides)
    return stage.run(cfg)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(cfg: DemoConfig) -> Path:
    from lmwright.data import DataConfig, prepare
    from lmwright.data.synthetic import chatty_mix, skills_task, story_corpus
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    t0 = time.perf_counter()
    work = Path(cfg.workdir)
    prepare_workdir(work, cfg.overwrite)
    (work / "data").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. data
    _say("1/6 data: generating a corpus and preparing it (clean, dedup, split, manifest)")
    t = time.perf_counter()
    raw = work / "data" / "corpus.txt"
    raw.write_text("\n".join(story_corpus(cfg.docs, seed=0)), encoding="utf-8")
    manifest = prepare(DataConfig(path=[str(raw)], format="text", val_fraction=0.03), work / "data" / "prepared",
                       overwrite=True)
    counts = manifest.get("counts", {})
    print(f"   {json.dumps(counts)}")
    # the answers to addition questions end with a chatty closing ("... Hope this helps!"): the SFT policy learns
    # that habit, and the alignment step's preference pairs (the answer alone chosen over the chatty one) make it
    # stop after the answer everywhere. (A polite *opener* as the rule cost answer accuracy: the SFT policy had seen few answers
    # after an opener, and DPO moved it there; a closing leaves the answer a shared prefix.)
    instr = chatty_mix(skills_task(1400, seed=11), share=1.0, seed=13, match=CHATTY_ON)
    _write_jsonl(work / "data" / "instructions.jsonl", instr)
    timings["data"] = time.perf_counter() - t

    # 2. tokenizer
    _say("2/6 tokenizer: byte-level BPE with special tokens and a chat template")
    t = time.perf_counter()
    texts = raw.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(texts + [r["instruction"] + " " + r["input"] + " " + r["output"] for r in instr],
                          TokenizerConfig(vocab_size=2000), work / "tokenizer")
    print(f"   {len(tok)} tokens -> {work / 'tokenizer'}")
    # Like the pretraining mixes of chat-capable base models, a share of the documents are
    # conversations rendered with the tokenizer's chat template: the base model learns the chat
    # tokens, so that fine-tuning with LoRA (which does not train embeddings) can teach the task.
    chats = story_chats(tok, texts[: cfg.docs // 6], seed=3)
    _write_jsonl(work / "data" / "chat_stories.jsonl", [{"text": c} for c in chats])
    timings["tokenizer"] = time.perf_counter() - t

    # 3. pretrain
    _say(f"3/6 pretrain: {cfg.model} from scratch, causal LM, {cfg.pretrain_steps} steps")
    t = time.perf_counter()
    pre_dir = _stage("pretrain", {
        "model": {"name": cfg.model}, "tokenizer": str(work / "tokenizer"),
        "data": {"path": [str(work / "data" / "prepared"), str(work / "data" / "chat_stories.jsonl")],
                 "val_fraction": 0.03},
        "seq_len": cfg.seq_len,
        "train": {"output_dir": str(work / "runs"), "run_name": "pretrain", "max_steps": cfg.pretrain_steps,
                  "micro_batch_size": cfg.micro_batch_size, "lr": 2e-3, "warmup_steps": 30,
                  "eval_every": max(cfg.pretrain_steps // 5, 1), "save_every": cfg.pretrain_steps, "log_every": 10,
                  "weight_decay": 0.1},
        "sample": {"prompts": ["The capital of", "Anna likes", "The red fox"], "max_new_tokens": 24},
    })
    info = json.loads((pre_dir / "run.json").read_text())
    timings["pretrain"] = time.perf_counter() - t
    before_ppl, after_ppl = info["before"].get("val_ppl"), info["after"].get("val_ppl")
    print(f"   validation perplexity: {before_ppl:.1f} -> {after_ppl:.2f}")
    for s in info.get("samples", []):
        print(f"   sample: {s['prompt']!r} -> {s['text']!r}")

    results: dict[str, Any] = {"pretrain": {"run": str(pre_dir), "val_ppl_before": before_ppl,
                                            "val_ppl_after": after_ppl, "samples": info.get("samples", [])}}

    # 4. SFT with LoRA
    sft_dir = None
    if "sft" not in cfg.skip:
        _say(f"4/6 fine-tune: SFT with LoRA on a generated instruction task, {cfg.sft_steps} steps")
        t = time.perf_counter()
        sft_dir = _stage("sft", {
            "model": {"name": str(pre_dir)}, "method": {"name": "lora", "r": 16, "alpha": 32,
                                                        "targets": "all-linear"},
            "data": {"path": [str(work / "data" / "instructions.jsonl")], "format": "alpaca", "val_fraction": 0.05},
            "seq_len": 128, "eval_generate": 48, "max_new_tokens": 12,
            "train": {"output_dir": str(work / "runs"), "run_name": "sft-lora", "max_steps": cfg.sft_steps,
                      "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 20,
                      "eval_every": max(cfg.sft_steps // 4, 1), "save_every": cfg.sft_steps, "log_every": 10,
                      "metric_for_best": "val_exact_match"},
        })
        sinfo = json.loads((sft_dir / "run.json").read_text())
        timings["sft"] = time.perf_counter() - t
        results["sft"] = {"run": str(sft_dir), **{k: sinfo.get(k) for k in ("before", "after", "trainable")}}
        em_b = (sinfo.get("before") or {}).get("val_exact_match")
        em_a = (sinfo.get("after") or {}).get("val_exact_match")
        if em_b is not None and em_a is not None:
            print(f"   held-out exact match: {em_b:.0%} -> {em_a:.0%}")

    # 5. alignment
    if "align" not in cfg.skip and sft_dir is not None:
        _say(f"5/6 align: DPO on generated preference pairs (chosen = the answer alone, rejected = the answer "
             f"with a chatty closing), "
             f"{cfg.align_steps} steps")
        t = time.perf_counter()
        from lmwright.stages.dpo import alignment_demo_step

        results["align"] = alignment_demo_step(sft_dir, work, steps=cfg.align_steps, task=skills_task, rule="concise")
        timings["align"] = time.perf_counter() - t
        print("   " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in results["align"].items() if k != "run"))

    # 6. report
    _say("6/6 report")
    timings["total"] = time.perf_counter() - t0
    report = write_demo_report(work, results, timings, counts)
    print(f"   {report}")
    final = sft_dir / "final" if sft_dir else pre_dir / "final"
    print(f"\nDone in {timings['total'] / 60:.1f} min. Next:\n"
          f"  lmwright generate --model {pre_dir} \"The capital of\"\n"
          f"  lmwright eval --model {pre_dir} --task perplexity   # re-measures the validation perplexity\n"
          + (f"  lmwright eval --model {sft_dir} --task generation   # and the held-out exact match\n"
             if sft_dir else "") +
          f"  lmwright chat --model {final}\n"
          f"  lmwright serve --model {final}        # OpenAI-compatible API on http://127.0.0.1:8000/v1\n"
          f"  lmwright webui --runs {work / 'runs'}  # browser UI\n")
    (work / "demo.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2, default=str))
    return work


def story_chats(tokenizer, stories: list[str], seed: int = 0) -> list[str]:
    """Stories as one-turn conversations rendered by the tokenizer's chat template (bos stripped:
    the tokenizer adds it when the text is encoded)."""
    import random

    rng = random.Random(seed)
    asks = ["Tell me a story.", "Write a few sentences.", "Tell me about your day.", "Say something."]
    out = []
    for story in stories:
        text = tokenizer.apply_chat_template([{"role": "user", "content": rng.choice(asks)},
                                              {"role": "assistant", "content": story}], tokenize=False)
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        out.append(text)
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_demo_report(work: Path, results: dict, timings: dict, counts: dict) -> Path:
    import html

    from lmwright.engine.report import CSS, curves_png, table
    from lmwright.engine.run import read_metrics

    parts = [f"<!doctype html><meta charset='utf-8'><title>lmwright demo</title><style>{CSS}</style>",
             "<h1>lmwright demo</h1>",
             "<p>data &rarr; tokenizer &rarr; pretrain &rarr; fine-tune (LoRA) &rarr; align (DPO) &rarr; serve, "
             "on this machine's CPU.</p>", "<h2>Time per step (s)</h2>",
             table({k: round(v, 1) for k, v in timings.items()}), "<h2>Data</h2>", table(counts)]
    pre = results["pretrain"]
    parts += ["<h2>Pretraining</h2>",
              table({"validation perplexity before": pre["val_ppl_before"],
                     "validation perplexity after": pre["val_ppl_after"]})]
    img = curves_png(read_metrics(pre["run"]), title="pretraining loss")
    if img:
        parts.append(f"<img alt='pretraining loss' src='{img}'>")
    parts.append(table([{"prompt": s["prompt"], "sample": s["text"]} for s in pre["samples"]]))
    if "sft" in results:
        s = results["sft"]
        parts += ["<h2>Fine-tuning (SFT, LoRA)</h2>",
                  table({f"{when} {k}": v for when in ("before", "after") for k, v in (s.get(when) or {}).items()})]
        img = curves_png(read_metrics(s["run"]), title="SFT loss")
        if img:
            parts.append(f"<img alt='SFT loss' src='{img}'>")
        parts.append("<p>Full run report: <a href='runs/sft-lora/report.html'>runs/sft-lora/report.html</a></p>")
    if "align" in results:
        parts += ["<h2>Alignment (DPO)</h2>",
                  "<p>Preference pairs from the SFT task: the answer alone is chosen over the same answer with a "
                  "chatty closing (&ldquo;... Hope this helps!&rdquo;). Answers to held-out prompts, sampled "
                  "(temperature 0.5) and greedy, "
                  "are judged by that rule (the registered <code>format</code> reward with the rule's pattern); "
                  "answer accuracy: the held-out answer is in the greedy reply.</p>",
                  table({k: v for k, v in results["align"].items() if k != "run"})]
    parts.append(f"<p>Per-run reports: {html.escape(str(work / 'runs'))}/*/report.html</p>")
    out = work / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
