"""``perplexity``: exp(mean next-token loss) of a causal LM on a text set, packed like pretraining.

Documents are tokenised and packed by the ``clm`` objective's ``build_dataset`` (rows of ``seq_len``,
per-document positions, no attention across documents) and scored by ``engine.loop.evaluate_loss``
with the objective's loss, so the number is the one the pretraining stage reports as ``val_loss``,
not a re-implementation. Without data, on a run folder, the run's own validation rows are built and
measured by the stage (``on_run``): the result is run.json's ``val_loss``/``val_ppl``.
"""

from __future__ import annotations

import math
from typing import Any

from lmwright.eval import EVAL_TASKS


@EVAL_TASKS.register("perplexity")
class Perplexity:
    name = "perplexity"
    formats = ("text", "alpaca", "messages", "classification", "preference", "pairs")
    model_task = "causal-lm"
    run_stages = ("pretrain", "sft")  # runs whose validation data is the default (on_run)

    def run(self, model: Any, tokenizer: Any, records: list[dict], seq_len: int | None = None,
            batch_size: int = 8, fmt: str = "text", **_: Any) -> dict[str, Any]:
        import torch

        from lmwright.data import FORMATS
        from lmwright.engine.loop import evaluate_loss
        from lmwright.objectives.clm import CausalLM

        clm = CausalLM()
        text_of = FORMATS.get(fmt).text_of
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
        seq_len = min(seq_len or 512, limit)
        rows = clm.build_dataset([text_of(r) for r in records], tokenizer, seq_len, packing=True)
        targets = 0

        def loss(m, batch):  # the objective's loss; counts the scored tokens on the way
            nonlocal targets
            out = clm.loss(m, batch)
            targets += int(out.n_targets)
            return out

        device = "cuda" if torch.cuda.is_available() else "cpu"
        val = evaluate_loss(model.to(device), loss, rows, clm.collate(tokenizer), batch_size, device)
        return {"loss": val["val_loss"], "perplexity": math.exp(val["val_loss"]) if targets else float("nan"),
                "tokens": targets, "documents": len(records), "seq_len": seq_len}

    def on_run(self, model: str, run: Any, device: str, limit: int | None = None) -> dict[str, Any]:
        """run.json's ``val_loss``/``val_ppl`` of the model at ``model`` on the run's validation rows."""
        from lmwright.config import ConfigError
        from lmwright.eval.run_data import capped
        from lmwright.methods import load_trained

        cfg = run.cfg
        if run.stage == "pretrain":
            from lmwright.stages import pretrain

            obj = pretrain.objective_for(cfg)
            m, tok = load_trained(model, task=obj.task)
            rows = pretrain.validation_set(cfg, tok, obj)
            if not rows:
                raise ConfigError(f"{run.dir} has no validation split (data.val_fraction=0, no data.val_path): "
                                  f"pass --data")
            rows = capped(rows, limit)
            metrics = pretrain.validation_metrics(cfg, m.to(device), tok, obj, rows, device)
        else:  # sft
            from lmwright.stages import sft

            m, tok = load_trained(model, task="causal-lm")
            rows, collate, _ = sft.validation_data(cfg, tok)
            if not rows:
                raise ConfigError(f"{run.dir} has no validation rows: pass --data")
            rows = capped(rows, limit)
            metrics, _ = sft.validation_metrics(cfg, m.to(device), tok, rows, collate, [], device)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        return {**metrics, "rows": len(rows), "seq_len": cfg.seq_len}

