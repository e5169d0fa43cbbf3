"""LLaMA-Factory contender of bench/train_throughput.py, run by the interpreter that has llamafactory
installed (it pins its own transformers/peft/trl, so it lives in a separate virtual environment).

Uses LLaMA-Factory's usual SFT path: sharegpt-format chats, the ``chatml`` template (the same ChatML
layout as lmwright's template), loss on assistant turns, padding to the longest in the batch.
Real tokens are counted by wrapping its data collator; step times come from a Trainer callback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    spec = common.parse_worker(None)
    if spec is None:
        raise SystemExit("run by bench/train_throughput.py")
    import importlib.machinery
    import types

    import torch

    # llamafactory imports torchaudio at module level for audio inputs only; PyPI has no torchaudio for
    # torch 2.13, so a stub stands in (text-only SFT never touches it)
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules.setdefault("torchaudio", stub)
    from llamafactory.data import collator as lf_collator
    from llamafactory.train.tuner import run_exp

    common.set_threads(spec.get("threads"))
    ddir = Path(spec["workdir"]) / "lf-data"
    ddir.mkdir(exist_ok=True)
    convs = json.loads(Path(spec["convs"]).read_text())
    (ddir / "chats.json").write_text(json.dumps(convs))
    (ddir / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    clock = common.StepClock(spec["accum"])

    cls = lf_collator.SFTDataCollatorWith4DAttentionMask
    orig = cls.__call__

    def counting_call(self, features):
        b = orig(self, features)
        clock.count(int(b["attention_mask"].sum()) if b["attention_mask"].dim() == 2
                    else int((b["labels"] != -100).sum()))
        return b

    cls.__call__ = counting_call

    bf16 = spec["precision"] == "bf16"
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": spec["model_dir"], "dataset": "bench",
        "dataset_dir": str(ddir), "template": "chatml", "finetuning_type": spec["method"], "cutoff_len": spec["seq_len"],
        "output_dir": str(Path(spec["workdir"]) / f"lf-out-{time.time_ns()}"), "overwrite_output_dir": True,
        "per_device_train_batch_size": spec["micro"], "gradient_accumulation_steps": spec["accum"],
        "max_steps": spec["steps"], "learning_rate": spec["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 2,
        "weight_decay": 0.01, "adam_beta2": 0.95, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "bf16": bf16, "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True,
        "overwrite_cache": True, "plot_loss": False,
    }
    if spec["method"] == "lora":
        r = spec.get("lora_r") or 8  # the same adapter as the other contenders: rank r, alpha 2r, dropout 0
        args.update(lora_target="all", lora_rank=r, lora_alpha=2 * r, lora_dropout=0.0)
    clock.start()
    run_exp(args, callbacks=[common.trainer_clock_callback(clock)])
    r = clock.rate(spec["warmup"])
    last = clock.losses[-5:]
    r.update(peak_rss_mb=common.peak_rss_mb(), precision="bf16" if bf16 else "no", steps=len(clock.stamps),
             final_loss=sum(last) / len(last) if last else float("nan"),
             first_loss=clock.losses[0] if clock.losses else float("nan"), micro=spec["micro"],
             layout="padded to longest", versions={"torch": torch.__version__, "llamafactory": _version()})
    common.emit(r)


def _version() -> str:
    from importlib.metadata import version

    return version("llamafactory")


if __name__ == "__main__":
    main()
