"""Peak memory per fine-tuning method, and base-weight memory of 4-bit / 8-bit loads against fp16.

    python bench/memory.py            # llama-20m, micro-batch 8 x 256 tokens, a few steps per method
    python bench/memory.py --smoke    # llama-tiny, 2 steps, in-process (test suite)

Training memory: each method (full, lora, qlora, prefix, adapter, ia3) trains the same model on the
same batch through ``lmwright.engine.train`` in its own fresh process; peak RSS (ru_maxrss) there is
comparable across methods (on a GPU: peak allocated CUDA memory as well). QLoRA loads the saved
float base with ``model.quantize=nf4``. Base-weight memory: bytes held by the base weights
(``lmwright.methods.quantized_base_memory``: packed 4-bit data + absmax/nested scales, int8 + row
scales) for fp16, int8, nf4 loads; the issue's target is 4-bit <= 0.3 x fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ["full", "lora", "qlora", "prefix", "adapter", "ia3"]


def _rows(spec: dict) -> list[dict]:
    return json.loads(Path(spec["data"]).read_text())


def collate(rows: list[dict]) -> dict:
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": torch.tensor([r["labels"] for r in rows]),
            "attention_mask": torch.ones_like(ids)}


def worker_train(spec: dict) -> dict:
    """One method: build/load the model, apply the method, train a few steps; report memory."""
    import torch

    from lmwright.engine import Run, train
    from lmwright.engine.config import TrainConfig
    from lmwright.methods import MethodConfig, apply_method, quantized_base_memory, trainable_report
    from lmwright.methods.base import _is_adapter_param as is_adapter_param
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model
    from lmwright.stages.sft import sft_loss
    from lmwright.utils.logging import quiet_third_party

    quiet_third_party()
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    except Exception:  # noqa: BLE001 - private API; only needed in-process (--smoke)
        pass
    rss_start = common.current_rss_mb()
    method = spec["method"]
    if method == "qlora":
        model = load_model(spec["base"], model_cfg=ModelConfig(name=spec["base"], quantize="nf4", dtype="float32"))
    else:
        model = load_model(spec["base"], model_cfg=ModelConfig(name=spec["base"], dtype="float32"))
    name = "lora" if method == "qlora" else method
    if spec.get("gradient_checkpointing"):  # as the stages do it: before the method, inputs need grads
        model.gradient_checkpointing_enable()
        if name != "full":
            model.enable_input_require_grads()
    model = apply_method(model, MethodConfig(name=name), "causal-lm")
    params = trainable_report(model)
    base_bytes = quantized_base_memory(model)
    rss_model = common.current_rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(output_dir=spec["workdir"], run_name=f"mem-{method}-{time.time_ns()}", max_steps=spec["steps"],
                      micro_batch_size=spec["micro"], log_every=spec["steps"], eval_every=0, save_every=0,
                      load_best_at_end=False, progress=False, mixed_precision=spec["precision"], warmup_steps=1)
    run = Run.create(cfg.output_dir, cfg.run_name, "sft")
    saved = SavedBytes()
    t0 = time.perf_counter()
    res = train(model, _rows(spec), collate, saved.wrap(sft_loss), cfg, run)
    out = {"method": method, "trainable": int(params["trainable"]), "trainable_pct": params["trainable_pct"],
           "base_weight_mb": base_bytes / 2**20, "rss_start_mb": rss_start, "rss_model_mb": rss_model,
           "peak_rss_mb": common.peak_rss_mb(), "train_s": time.perf_counter() - t0,
           "final_loss": res.last_metrics.get("loss")}
    out["train_overhead_mb"] = out["peak_rss_mb"] - rss_model
    # where the memory goes (MB): the process and its libraries (RSS once the model is built, minus the
    # weights: peft, bitsandbytes and the model classes load lazily), the weights, the gradients
    # and AdamW's two moments of the trainable parameters, the tensors autograd saves for backward in
    # one micro-batch (deduplicated by storage, parameters excluded) and one fp32 (B, T, V) logits
    # tensor (transient: the loss's log_softmax output, a saved tensor, is the second copy)
    trainable_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    new_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters()  # beside the base weights
                 if p.requires_grad and is_adapter_param(n)) / 2**20
    vocab = model.get_output_embeddings().weight.shape[0]
    weights_mb = base_bytes / 2**20 + new_mb
    out.update(runtime_mb=rss_model - weights_mb, weights_mb=weights_mb, grads_mb=trainable_mb,
               optimizer_mb=2 * trainable_mb, saved_mb=saved.bytes / 2**20,
               logits_mb=spec["micro"] * spec["seq_len"] * vocab * 4 / 2**20)
    out["accounted_mb"] = sum(out[k] for k in ("runtime_mb", "weights_mb", "grads_mb", "optimizer_mb", "saved_mb",
                                               "logits_mb"))
    out["unaccounted_mb"] = out["peak_rss_mb"] - out["accounted_mb"]
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class SavedBytes:
    """Bytes autograd saves for backward during the first forward (torch saved-tensor hooks)."""

    def __init__(self) -> None:
        self.bytes, self.done, self._seen = 0, False, set()

    def pack(self, t):
        import torch

        key = t.untyped_storage().data_ptr()
        if not isinstance(t, torch.nn.Parameter) and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def wrap(self, objective):
        import torch

        def counted(model, batch):
            if self.done:
                return objective(model, batch)
            self.done = True
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                return objective(model, batch)
        return counted


def worker_weights(spec: dict) -> dict:
    """Base-weight bytes of one load (fp16 / int8 / nf4) of the saved base."""
    from lmwright.methods import quantized_base_memory
    from lmwright.models import ModelConfig
    from lmwright.models.load import load_model
    from lmwright.utils.logging import quiet_third_party

    quiet_third_party()
    q, dtype, qe = spec["quantize"], spec["dtype"], spec.get("quantize_embeddings", False)
    model = load_model(spec["base"], model_cfg=ModelConfig(name=spec["base"], quantize=q, dtype=dtype,
                                                           quantize_embeddings=qe))
    total = quantized_base_memory(model)
    linear = 0
    for n, p in model.named_parameters():
        if "layers." in n and p.ndim >= 1 and "norm" not in n:
            linear += p.numel() * p.element_size()
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                for t in (qs.absmax, getattr(qs, "code", None), getattr(getattr(qs, "state2", None), "absmax", None)):
                    linear += t.numel() * t.element_size() if t is not None else 0
            scb = getattr(p, "SCB", None)
            linear += scb.numel() * scb.element_size() if scb is not None else 0
    what = (q if q != "none" else dtype) + (" + embeddings" if qe else "")
    return {"load": f"{what} (rest {dtype})", "quantize": q, "dtype": dtype, "quantize_embeddings": qe,
            "base_weight_mb": total / 2**20, "block_linear_mb": linear / 2**20, "peak_rss_mb": common.peak_rss_mb()}


LOADS = (("none", "float16", False), ("int8", "float16", False), ("nf4", "float16", False), ("nf4", "float32", False),
         ("nf4", "float16", True))


def worker_weights_all(spec: dict) -> dict:
    """:func:`worker_weights` for every load of ``spec["loads"]`` in one process (the byte counts do not depend on
    the process; starting one per load cost ~5 s each). Their peak RSS is the process's over all of them, so it is
    left out of the rows."""
    import gc

    rows = []
    for q, dtype, qe in spec["loads"]:
        row = worker_weights({"base": spec["base"], "quantize": q, "dtype": dtype, "quantize_embeddings": qe})
        row.pop("peak_rss_mb", None)
        rows.append(row)
        gc.collect()
    return {"rows": rows}


WORKERS = {"train": worker_train, "weights": worker_weights, "weights_all": worker_weights_all}


def main(argv: list[str] | None = None) -> dict:
    spec = common.parse_worker(argv)
    if spec is not None:
        common.emit(WORKERS[spec["kind"]](spec))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--weights-presets", default=None, help="presets for the base-weight table (default: "
                                                            "llama-20m,llama-100m; smoke: llama-tiny)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--precision", default="no", help="autocast for every method (default fp32: the memory "
                                                      "of the weights as stored)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward "
                                                                          "(model.gradient_checkpointing) for every method")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="run each contender with glibc's mmap threshold fixed at this many bytes (e.g. 131072): "
                         "every larger tensor gets its own mapping, returned on free, so peak RSS is the peak of "
                         "live tensors without heap fragmentation (default 0: the allocator as users run it)")
    ap.add_argument("--skip-weights", action="store_true", help="training table only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sm = args.smoke
    preset = args.preset or ("llama-tiny" if sm else "llama-20m")
    steps, micro = args.steps or (2 if sm else 3), args.micro or (2 if sm else 8)
    seq_len, vocab = args.seq_len or (64 if sm else 256), 512 if sm else 8192
    wpresets = (args.weights_presets or ("llama-tiny" if sm else "llama-20m,llama-100m")).split(",")
    info, calib = common.machine(), common.calibrate(sm)
    from lmwright.data.packing import pack_concat, tokenize_documents
    from lmwright.data.synthetic import story_corpus

    train_rows, weight_rows = [], []
    env = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={args.mmap_threshold}"} if args.mmap_threshold else None
    with tempfile.TemporaryDirectory(prefix="lmw-bench-") as tmp:
        tmp = Path(tmp)
        tok = common.bench_tokenizer(tmp, vocab)
        bases = {}
        for p in sorted(set([preset] + wpresets)):
            model = common.build_lm(p, tok, vocab)
            bases[p] = tmp / f"base-{p}"
            model.save_pretrained(bases[p])
            tok.save_pretrained(bases[p])
            del model
        rows = pack_concat(tokenize_documents(tok, story_corpus(steps * micro * seq_len // 30, seed=5)), seq_len)
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows][:steps * micro]
        (tmp / "rows.json").write_text(json.dumps(rows))
        for m in args.methods.split(","):
            spec = {"kind": "train", "method": m, "base": str(bases[preset]), "data": str(tmp / "rows.json"),
                    "steps": steps, "micro": micro, "seq_len": seq_len, "precision": args.precision,
                    "workdir": str(tmp), "gradient_checkpointing": args.gradient_checkpointing}
            res = worker_train(spec) if sm else common.run_worker(__file__, spec, env=env)
            train_rows.append({"method": m, **res})
            print(f"  {m}: {res.get('peak_rss_mb', res.get('error'))}", file=sys.stderr, flush=True)
        for p in ([] if args.skip_weights else wpresets):
            spec = {"kind": "weights_all", "base": str(bases[p]), "loads": LOADS}
            res = worker_weights_all(spec) if sm else common.run_worker(__file__, spec)
            weight_rows += [{"preset": p, **r} for r in res["rows"]] if "rows" in res else [{"preset": p, **res}]
    full = next((r for r in train_rows if r["method"] == "full" and "peak_rss_mb" in r), None)
    for r in train_rows:
        if full and "peak_rss_mb" in r:
            r["peak_vs_full"] = r["peak_rss_mb"] / full["peak_rss_mb"]
            r["overhead_vs_full"] = r["train_overhead_mb"] / max(full["train_overhead_mb"], 1e-9)
    targets = []
    for p in wpresets:
        fp16 = next((r for r in weight_rows if r["preset"] == p and r.get("quantize") == "none"), None)
        for r in weight_rows:
            if r["preset"] == p and fp16 and "base_weight_mb" in r:
                r["vs_fp16"] = r["base_weight_mb"] / fp16["base_weight_mb"]
                r["block_linear_vs_fp16"] = r["block_linear_mb"] / max(fp16["block_linear_mb"], 1e-9)
        nf4, nf4e = (next((r for r in weight_rows if r["preset"] == p and r.get("quantize") == "nf4"
                           and r.get("dtype") == "float16" and r.get("quantize_embeddings") == qe and "vs_fp16" in r),
                          None) for qe in (False, True))
        if nf4:
            targets.append({"preset": p, "target": "4-bit base weights <= 0.3 x fp16",
                            "whole_model": nf4["vs_fp16"], "block_linears": nf4["block_linear_vs_fp16"],
                            "met_whole_model": nf4["vs_fp16"] <= 0.3, "met_block_linears": nf4["block_linear_vs_fp16"] <= 0.3})
            if nf4e:
                targets[-1].update(whole_model_quantize_embeddings=nf4e["vs_fp16"],
                                   met_quantize_embeddings=nf4e["vs_fp16"] <= 0.3)
    payload = {"bench": "memory", "smoke": sm, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": info,
               "calibration": calib, "preset": preset, "batch": {"micro": micro, "seq_len": seq_len, "steps": steps},
               "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
               "mmap_threshold": args.mmap_threshold, "training": train_rows, "weights": weight_rows, "targets": targets}
    t1 = common.markdown_table(train_rows, ["method", "trainable", "trainable_pct", "base_weight_mb", "rss_model_mb",
                                            "peak_rss_mb", "train_overhead_mb", "peak_vs_full", "overhead_vs_full"])
    t3 = common.markdown_table(train_rows, ["method", "runtime_mb", "weights_mb", "grads_mb", "optimizer_mb", "saved_mb",
                                            "logits_mb", "accounted_mb", "peak_rss_mb", "unaccounted_mb"])
    t2 = common.markdown_table(weight_rows, ["preset", "load", "base_weight_mb", "vs_fp16", "block_linear_mb",
                                             "block_linear_vs_fp16"])
    print(f"\n## memory ({preset}, micro {micro} x {seq_len} tokens, {steps} steps, precision {args.precision}, "
          f"gradient checkpointing {args.gradient_checkpointing}, mmap threshold {args.mmap_threshold or 'glibc default'})\n"
          f"{common.machine_line(info, calib)}\n\n{t1}\n\n### where it goes (MB)\n\n{t3}\n\n### base weights\n\n{t2}\n\ntargets: {targets}\n")
    if not sm or args.out:
        common.write_result("memory", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
