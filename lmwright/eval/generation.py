"""``generation``: exact match and contains-match of greedy answers on a Q/A set.

Prompts are rendered with the tokenizer's chat template (``render_prompt_ids``: the same tokens the
server feeds) and decoding stops at ``stop_token_ids`` (``<|im_end|>``/eos), so the score is that of
the model as it is served. Answers are scored by ``lmwright.engine.metrics`` (the rule SFT's held-out
``val_exact_match`` uses: equal after stripping surrounding whitespace; case and inner whitespace count).

Without data, on an SFT run folder (``on_run``), the run's held-out prompts are answered and scored by
the stage itself (``sft.validation_data``/``validation_metrics``: the same ``held_out`` choice, batched
greedy decoding and exact comparison): the result is run.json's ``val_exact_match``.
"""

from __future__ import annotations

from typing import Any

from lmwright.engine.metrics import contains_match, exact_match
from lmwright.eval import EVAL_TASKS


def qa_pair(record: dict, fmt: str) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of an alpaca or messages record."""
    if fmt == "alpaca":  # the conversation SFT trains on (one home: alpaca_to_messages), minus the answer
        from lmwright.data.chat import alpaca_to_messages

        return alpaca_to_messages({**record, "output": ""}), record["output"]
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations of each prompt, stopped at the chat stop tokens (``engine.sampling.generate_batch``,
    one prompt at a time: no padding, so every answer is exactly what a single request would get)."""
    from lmwright.engine.sampling import generate_batch

    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids, _ in generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size=1, seed=None)]


@EVAL_TASKS.register("generation")
class Generation:
    name = "generation"
    formats = ("alpaca", "messages")
    model_task = "causal-lm"
    run_stages = ("sft",)  # runs whose held-out prompts are the default (on_run)

    def run(self, model: Any, tokenizer: Any, records: list[dict], fmt: str = "alpaca", max_new_tokens: int = 64,
            **_: Any) -> dict[str, Any]:
        from lmwright.data.chat import render_prompt_ids

        pairs = [qa_pair(r, fmt) for r in records]
        preds = generate_answers(model, tokenizer, [render_prompt_ids(tokenizer, m) for m, _ in pairs],
                                 max_new_tokens)
        refs = [ref for _, ref in pairs]
        n = len(refs)
        em = sum(exact_match(p, r) for p, r in zip(preds, refs, strict=True))
        cm = sum(contains_match(p, r) for p, r in zip(preds, refs, strict=True))
        return {"exact_match": em / n if n else 0.0, "contains_match": cm / n if n else 0.0, "examples": n,
                "samples": [{"prompt": m[-1]["content"], "reference": r, "prediction": p}
                            for (m, r), p in list(zip(pairs, preds))[:5]]}

    def on_run(self, model: str, run: Any, device: str, limit: int | None = None) -> dict[str, Any]:
        """run.json's ``val_exact_match`` of the model at ``model`` on the run's held-out prompts."""
        from lmwright.config import ConfigError
        from lmwright.eval.run_data import capped
        from lmwright.methods import load_trained
        from lmwright.stages import sft

        cfg = run.cfg
        m, tok = load_trained(model, task="causal-lm")
        _, collate, convs = sft.validation_data(cfg, tok)
        if not convs:
            raise ConfigError(f"{run.dir} has no held-out prompts (eval_generate=0 or no validation split): "
                              f"pass --data")
        convs = capped(convs, limit)
        metrics, answers = sft.validation_metrics(cfg, m.to(device), tok, None, collate, convs, device)
        return {**metrics, "examples": len(convs), "max_new_tokens": cfg.max_new_tokens,
                "samples": [{"prompt": c[-2]["content"], "reference": c[-1]["content"], "prediction": a}
                            for c, a in zip(convs, answers, strict=True)]}
