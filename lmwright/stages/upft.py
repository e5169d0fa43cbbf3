"""``lmwright train upft``: Unsupervised Prefix Fine-Tuning (Ji et al., 2025, arXiv:2503.02875).

From unlabeled prompts only: the model samples one response per prompt, and training uses only the
first ``prefix_tokens`` tokens of each response (the "prefix self-consistency" of reasoning paths),
plus a small share (``full_share``) of whole responses so the model keeps knowing how to finish. No
labels, no rejection sampling. Sampling a prefix costs k tokens, not a whole answer: that is where
the time goes down compared with SFT.

Read top to bottom: config -> prompts -> sample (prefixes + a few full responses) -> the SFT data
path (sampled responses become messages records, the loss stops after k response tokens) -> the SFT
loss -> engine.train -> final/ -> report (optionally beside an ``sft`` run on the same prompts).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.stages import _sft as sft  # the SFT data path (shared helpers), not the sft stage
from lmwright.stages.common import STAGES, flops_per_token, save_final
from lmwright.utils.hardware import choose_mixed_precision
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.upft")


@dataclass
class UPFTConfig:
    stage: str = opt("upft", "stage id (lets `lmwright validate` know what the file configures)")
    model: ModelConfig = opt(ModelConfig(), "the model that samples and is trained: a local folder or run")
    tokenizer: str | None = opt(None, "tokenizer folder; default: the model folder's (or its run's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="alpaca", val_fraction=0.1),
                           "prompts: text records, or alpaca/messages records whose answers are ignored "
                           "for training (validation answers, if any, give exact match)")
    train: TrainConfig = opt(TrainConfig(lr=2e-4, eval_every=50), "the training loop")
    seq_len: int = opt(512, "tokens per row")
    packing: bool | None = opt(None, "pack samples (bfd); default: on, off for prefix/ptuning/prompt")
    system_prompt: str | None = opt(None, "system message added to prompts that have none")
    prefix_tokens: int = opt(16, "k: response tokens trained on (8..32 in the paper)")
    full_share: float = opt(0.1, "share of prompts whose whole sampled response is trained on")
    temperature: float = opt(0.7, "sampling temperature of the responses (0 = greedy)")
    max_new_tokens: int = opt(128, "length cap of the full responses (and of exact-match answers)")
    sample_batch_size: int = opt(16, "prompts per generate call")
    eval_generate: int = opt(32, "held-out prompts with reference answers scored by exact match (0 = off)")
    compare_sft: bool = opt(False, "also train `sft` on the same prompts with their reference answers (same "
                                   "model, method and budget) and write both times into run.json")

    def check(self) -> None:
        if not 8 <= self.prefix_tokens <= 32:
            raise ConfigError(f"prefix_tokens={self.prefix_tokens}: UPFT trains on the first 8..32 response tokens; "
                              f"set prefix_tokens between 8 and 32")
        if not 0.0 <= self.full_share <= 1.0:
            raise ConfigError(f"full_share={self.full_share} must be in [0, 1]")
        if self.temperature < 0 or self.sample_batch_size < 1 or self.max_new_tokens < self.prefix_tokens:
            raise ConfigError("temperature must be >= 0, sample_batch_size >= 1 and max_new_tokens >= prefix_tokens")


def check(cfg: UPFTConfig) -> dict[str, Any]:
    if cfg.data.format not in ("text", "alpaca", "messages"):
        raise ConfigError(f"data.format={cfg.data.format}: upft needs prompts; set data.format=text, alpaca or "
                          f"messages")
    if cfg.compare_sft and cfg.data.format == "text":
        raise ConfigError("compare_sft=true trains sft on reference answers, which text records do not have: "
                          "set data.format=alpaca or messages, or compare_sft=false")
    return sft.check_causal(cfg, "upft")


def prompt_conversations(records: list[dict], fmt: str, system_prompt: str | None) -> list[list[dict]]:
    """Each record as the conversation up to (not including) its final assistant turn."""
    if fmt == "text":
        convs = [[{"role": "user", "content": r["text"]}] for r in records]
        if system_prompt:
            convs = [[{"role": "system", "content": system_prompt}] + c for c in convs]
        return convs
    out = []
    for c in sft.conversations(records, fmt, system_prompt):
        while c and c[-1]["role"] == "assistant":
            c = c[:-1]
        out.append(c)
    return out


def sample_responses(model, tokenizer, prompts: list[list[dict]], cfg: UPFTConfig) -> list[dict]:
    """One sampled response per prompt: k tokens for most, a whole one for a ``full_share`` of them."""
    from lmwright.data.chat import render_prompt_ids
    from lmwright.engine.sampling import generate_batch

    rng = random.Random(cfg.train.seed)
    full = set(rng.sample(range(len(prompts)), round(cfg.full_share * len(prompts))))
    out: list[dict] = [{} for _ in prompts]
    for is_full, budget in ((False, cfg.prefix_tokens), (True, cfg.max_new_tokens)):
        idx = [i for i in range(len(prompts)) if (i in full) == is_full]
        ids = [render_prompt_ids(tokenizer, prompts[i]) for i in idx]
        gen = generate_batch(model, tokenizer, ids, budget, cfg.temperature, batch_size=cfg.sample_batch_size,
                             seed=cfg.train.seed)
        for i, (toks, finished) in zip(idx, gen):
            text = tokenizer.decode(toks, skip_special_tokens=True)
            out[i] = {"messages": prompts[i] + [{"role": "assistant", "content": text}], "full": is_full,
                      "finished": finished, "response_tokens": len(toks)}
    return out


def run(cfg: UPFTConfig) -> Path:
    import torch

    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.report import table, write_report
    from lmwright.methods import trainable_report

    tokenizer = check(cfg)["tokenizer"]
    packing = sft.use_packing(cfg)
    pad_id = sft.pad_id_of(tokenizer)
    train_recs, val_recs, manifest = load_records(cfg.data)
    prompts = prompt_conversations(train_recs, cfg.data.format, cfg.system_prompt)
    val_convs = [] if cfg.data.format == "text" else sft.conversations(val_recs, cfg.data.format, cfg.system_prompt)
    em_convs = sft.held_out(val_convs, cfg.eval_generate, cfg.data.split_seed)

    run_ = Run.start(cfg, "upft", manifest)
    model, base_path = sft.build_causal_model(cfg, tokenizer, run_.dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    # 1. sample: the model answers its own prompts (the method is untrained: lora starts at the base)
    t0 = time.perf_counter()
    sampled = sample_responses(model, tokenizer, prompts, cfg)
    sample_seconds = time.perf_counter() - t0
    with open(run_.dir / "samples.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in sampled)
    n_full = sum(s["full"] for s in sampled)
    log.info("sampled %d prefixes of <= %d tokens and %d full responses in %.1f s", len(sampled) - n_full,
             cfg.prefix_tokens, n_full, sample_seconds)

    # 2. the SFT data path on the sampled records; the loss stops after k response tokens
    # a response that ended within k tokens is complete (end-of-turn included); the others are cut at k
    keep = [None if s["full"] or s["finished"] else cfg.prefix_tokens for s in sampled]
    samples, stats = sft.encode(tokenizer, [s["messages"] for s in sampled], "last", cfg.seq_len, keep)
    train_ds, collate = sft.make_rows(samples, cfg.seq_len, packing, pad_id)
    val_samples, _ = sft.encode(tokenizer, val_convs, "last", cfg.seq_len)
    val_ds = sft.make_rows(val_samples, cfg.seq_len, packing, pad_id)[0] if val_samples else None
    params = trainable_report(model)
    run_.write_info(model=cfg.model.name, base=base_path, method=cfg.method.name, quantize=cfg.model.quantize,
                    trainable=params["trainable"], total_parameters=params["total"],
                    trainable_pct=params["trainable_pct"], packing=packing, data=stats, prompts=len(prompts),
                    full_responses=n_full, prefix_tokens=cfg.prefix_tokens, sample_seconds=sample_seconds,
                    train_rows=len(train_ds))
    tokenizer.save_pretrained(str(run_.dir / "tokenizer"))

    precision = choose_mixed_precision(cfg.train.mixed_precision, model)
    before = sft.validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)[0]

    def evaluate(m) -> dict[str, float]:
        return {"val_exact_match": sft.exact_match(m, tokenizer, em_convs, cfg.max_new_tokens,
                                                   precision)[0]} if em_convs else {}

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "causal-lm", method_cfg=cfg.method, base_path=base_path)

    result = train(model, train_ds, collate, sft.sft_loss, cfg.train, run_, val_data=val_ds,
                   evaluate=evaluate if em_convs else None, save_model=save_model,
                   flops_per_token=flops_per_token(model, cfg.seq_len))
    if result.interrupted:
        return run_.dir
    after = sft.validation_metrics(cfg, model, tokenizer, val_ds, collate, em_convs, device)[0]
    save_final(model, tokenizer, run_.final, "causal-lm", extra={"stage": "upft", "prefix_tokens": cfg.prefix_tokens},
               method_cfg=cfg.method, base_path=base_path)
    timing = {"upft": {"sample_seconds": round(sample_seconds, 2), "train_seconds": round(result.train_seconds, 2),
                       "total_seconds": round(sample_seconds + result.train_seconds, 2),
                       "trained_tokens": sum(sum(lab != -100 for lab in s[1]) for s in samples)}}

    # 3. optionally: sft on the same prompts with their reference answers, same model/method/budget
    if cfg.compare_sft:
        del model
        sft_stage = STAGES.get("sft")  # through the registry: a stage never imports another
        sft_cfg = sft_stage.Config(
            model=cfg.model, tokenizer=cfg.tokenizer, method=cfg.method, data=cfg.data,
            train=replace(cfg.train, run_name=f"{run_.dir.name}-sft", output_dir=str(run_.dir.parent)),
            seq_len=cfg.seq_len, packing=cfg.packing, train_on="last", system_prompt=cfg.system_prompt,
            eval_generate=cfg.eval_generate, max_new_tokens=cfg.max_new_tokens)
        sft_dir = sft_stage.run(sft_cfg)
        info = json.loads((sft_dir / "run.json").read_text())
        trained = sum(sum(lab != -100 for lab in s[1]) for s in sft.encode(
            tokenizer, sft.conversations(train_recs, cfg.data.format, cfg.system_prompt), "last", cfg.seq_len)[0])
        timing["sft"] = {"run": str(sft_dir), "sample_seconds": 0.0, "train_seconds": round(info["train_seconds"], 2),
                         "total_seconds": round(info["train_seconds"], 2), "trained_tokens": trained,
                         "after": info.get("after", {})}
    run_.write_info(before=before, after=after, timing=timing)

    summary: dict[str, Any] = {"model": cfg.model.name, "method": cfg.method.name, "prompts": len(prompts),
                               "prefix tokens": cfg.prefix_tokens, "full responses": n_full, "steps": result.step,
                               "sample_seconds": round(sample_seconds, 1),
                               "train_seconds": round(result.train_seconds, 1)}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    sections = [("Time: upft vs sft", table([{"run": k, **{n: v for n, v in t.items() if n != "after"}}
                                             for k, t in timing.items()]))]
    shown = [{"prompt": s["messages"][-2]["content"], "sampled response": s["messages"][-1]["content"],
              "full": s["full"]} for s in sampled[:6]]
    sections.append(("Sampled responses", table(shown)))
    write_report(run_.dir, f"lmwright upft ({cfg.method.name}) - {run_.dir.name}", sections, summary)
    return run_.dir


class _Stage:
    name = "upft"
    Config = UPFTConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("upft", _Stage)
