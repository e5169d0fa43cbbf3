"""``--task lm-eval:<task>``: run a *local* lm-evaluation-harness task definition against any run.

Optional extra (``pip install 'lmwright[eval]'``). ``data`` is a folder of task YAML files (passed to
the harness's ``TaskManager(include_path=...)`` with the built-in task list switched off, so nothing
is looked up online); the model is wrapped in a small ``lm_eval.api.model.LM`` subclass rather than
the harness's ``hf`` model, because ours may be an adapter folder or a run that ``from_pretrained``
alone cannot load. Requests are scored one at a time: these are small local evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def lm_class() -> type:
    """The ``LM`` subclass (built on first use: lm_eval is imported only when this task runs)."""
    import torch
    from lm_eval.api.model import LM

    class LmwrightLM(LM):
        def __init__(self, model: Any, tokenizer: Any, max_length: int | None = None):
            super().__init__()
            self.model, self.tok = model.eval(), tokenizer
            cfg = model.config
            self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 1024

        def _context_ids(self, context: str) -> list[int]:
            ids = list(self.tok(context)["input_ids"]) if context else []
            if not ids:  # an empty context: condition on bos (or eos) so the first token has a prediction
                start = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
                ids = [start]
            return ids

        def _logprobs(self, ids: list[int], n_target: int) -> tuple[float, bool]:
            ids = ids[-self.max_length:]
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()  # (T, V)
            logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
            tgt = x[0, 1:][-n_target:]
            lp = logp[-n_target:]
            total = float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
            return total, bool((lp.argmax(-1) == tgt).all())

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            out = []
            for req in requests:
                context, continuation = req.args
                cont = list(self.tok(continuation, add_special_tokens=False)["input_ids"])
                out.append(self._logprobs(self._context_ids(context) + cont, len(cont)) if cont else (0.0, True))
            return out

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            out = []
            for req in requests:
                ids = self._context_ids("") + list(self.tok(req.args[0], add_special_tokens=False)["input_ids"])
                out.append(self._logprobs(ids, len(ids) - 1)[0] if len(ids) > 1 else 0.0)
            return out

        def generate_until(self, requests: list[Any]) -> list[str]:
            from lmwright.engine.sampling import generate_batch

            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self._context_ids(context)[-self.max_length:]
                [(new, _)] = generate_batch(self.model, self.tok, [ids], int(kwargs.get("max_gen_toks", 64)),
                                            batch_size=1, seed=None)
                text = self.tok.decode(new, skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text)
            return out

    return LmwrightLM


def run_lm_eval(model: str | Path, task: str, data: str | Path | list[str], limit: int | None = None,
                **_: Any) -> dict[str, Any]:
    """Metrics of ``task`` (defined in the YAML folder ``data``) for the model at ``model``."""
    from lmwright.config import ConfigError

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--task lm-eval:<task> needs lm-evaluation-harness: pip install 'lmwright[eval]'") from None
    from lmwright.methods import load_trained

    folder = Path(data[0] if isinstance(data, list) else data)
    if not folder.exists():
        raise ConfigError(f"lm-eval task folder not found: {folder} (pass the folder holding {task}.yaml as --data)")
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    if task not in tm.all_tasks:
        raise ConfigError(f"lm-eval task '{task}' is not defined in {folder}; found: {', '.join(tm.all_tasks) or 'none'}")
    m, tok = load_trained(model, task="causal-lm")
    res = lm_eval.simple_evaluate(model=lm_class()(m, tok), tasks=[task], task_manager=tm, limit=limit,
                                  log_samples=False)
    metrics: dict[str, Any] = {}
    for key, value in (res.get("results", {}).get(task) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key.replace(",none", "")] = float(value)
    return {"task": f"lm-eval:{task}", "model": str(model), "data": str(folder), **metrics}
