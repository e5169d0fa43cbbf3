"""``preference``: pairwise accuracy on ``{prompt, chosen, rejected}`` records.

A reward model (one-logit sequence classifier) scores each full text; a policy (causal LM) scores
each response by its summed log-probability given the prompt (``sequence_logprobs``, the quantity
the DPO family optimises). Accuracy is the share of pairs with ``score(chosen) > score(rejected)``;
a tie counts half, so a model that cannot tell the two apart scores 0.5, not 0 or 1.
"""

from __future__ import annotations

from typing import Any

from lmwright.eval import EVAL_TASKS


def preference_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"accuracy": wins / n if n else 0.0, "mean_margin": sum(margins) / n if n else 0.0, "pairs": n}


def encode_pair(tokenizer: Any, prompt: Any, response: Any) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens). Conversations use the chat template."""
    if isinstance(prompt, list):
        from lmwright.data.chat import render_prompt_ids

        p_ids = render_prompt_ids(tokenizer, prompt)
        full = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
        return list(full), len(p_ids)
    p_ids = list(tokenizer(prompt)["input_ids"])
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return p_ids + r_ids + eos, len(p_ids)


def is_reward_model(model: Any) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1


def score(model: Any, ids: list[int], n_prompt: int, reward: bool) -> float:
    import torch

    from lmwright.objectives.base import IGNORE_INDEX, sequence_logprobs

    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x))
    if reward:
        return float(out.logits[0, 0])
    labels = x.clone()
    labels[:, :n_prompt] = IGNORE_INDEX
    logp, _ = sequence_logprobs(out.logits, labels)
    return float(logp[0])


@EVAL_TASKS.register("preference")
class Preference:
    name = "preference"
    formats = ("preference",)
    model_task = None  # a reward model or a policy, as the folder says

    def run(self, model: Any, tokenizer: Any, records: list[dict], **_: Any) -> dict[str, Any]:
        reward = is_reward_model(model)
        model.eval()
        chosen, rejected = [], []
        for r in records:
            chosen.append(score(model, *encode_pair(tokenizer, r["prompt"], r["chosen"]), reward))
            rejected.append(score(model, *encode_pair(tokenizer, r["prompt"], r["rejected"]), reward))
        return {**preference_metrics(chosen, rejected), "scored_by": "reward" if reward else "policy log-prob"}
