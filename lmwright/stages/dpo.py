"""``lmwright train dpo``: preference optimisation of a policy on ``preference`` records, without a reward
model. ``loss`` picks the objective: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, ``label_smoothed``
(reference-based), ``simpo``, ``orpo`` (reference-free) or ``kto``.

KTO trains on unpaired good/bad replies, one loss term per reply (desirable or undesirable, each on its own).
They come from ``kto`` records (``data.format=kto``: a prompt, one reply and its boolean label, e.g.
LLaMA-Factory's kto data), or from ``preference`` records, each giving two: ``(prompt, chosen)`` desirable
and ``(prompt, rejected)`` undesirable. KTO's reference point z0 (the policy's KL from the reference) is
estimated, as in trl's KTOTrainer, on mismatched pairs ``(prompt_i, reply_j)``: the batch mean of their
log-ratios, clamped at 0 and without gradient (those rows are scored under no_grad). The pairs are fixed
when the data is built (so their reference log-probs can be precomputed): ``j`` is the next record whose
prompt differs (a record with the same prompt would give a matched pair).

The reference is the frozen starting policy. By default (``precompute_ref``) its log-probs are computed
once before training, from the policy itself (adapter disabled for peft methods): no second model in
memory and one forward per pair per step instead of two. ``precompute_ref=false`` computes them every
step (peft: adapter disabled; otherwise a frozen copy).

At the start the reference equals the policy exactly (log-probs under the training precision, dropout off), so
the sigmoid loss starts at log 2 and every implicit reward at 0. ``judge`` scores answers generated for held-out
prompts with a registered rule reward (the rule behind the preferences, e.g. ``exact_answer``) before, during and
after training: ``val_judge`` (sampled answers), ``val_judge_greedy``.

Read top to bottom: config -> tokenizer -> pairs -> policy -> reference log-probs -> engine.train -> final/.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.objectives.base import LossOutput, sequence_logprobs
from lmwright.stages.common import STAGES, resolve_tokenizer, save_final
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.dpo")

REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class JudgeConfig:
    functions: list = opt([], "registered rule rewards that judge generations, e.g. [exact_answer] or [{name: format, "
                              "pattern: '...'}] (lmwright/objectives/rewards.py); empty and no model: no judging")
    model: str | None = opt(None, "or a reward model run that judges them (same tokenizer as the policy)")
    prompts: int = opt(64, "held-out prompts (the validation split's) answered before, during and after training")
    samples: int = opt(4, "answers sampled per prompt for val_judge (val_judge_greedy: one greedy answer each)")
    max_new_tokens: int = opt(32, "tokens generated per answer")
    temperature: float = opt(1.0, "sampling temperature of val_judge")

    def enabled(self) -> bool:
        return bool(self.functions or self.model)


@dataclass
class DPOConfig:
    stage: str = opt("dpo", "stage id")
    model: ModelConfig = opt(ModelConfig(), "the policy to align (usually an SFT run)")
    tokenizer: str | None = opt(None, "tokenizer folder (default: the model's)")
    method: MethodConfig = opt(MethodConfig(), "how the weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="preference"), "preference records: prompt, chosen, rejected (or, "
                                                            "for loss=kto, kto records: prompt, completion, label)")
    train: TrainConfig = opt(TrainConfig(lr=5e-5, metric_for_best="val_win"), "the training loop")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "label_smoothed", "simpo", "orpo", "kto"] = opt(
        "sigmoid", "preference loss (see docs/objectives.md)")
    beta: float = opt(0.1, "strength of the KL-like regularisation (simpo: reward scale, e.g. 2.0)")
    rpo_alpha: float = opt(0.0, "reference-based losses: + rpo_alpha x the chosen reply's mean token NLL (RPO, "
                                "Pang et al. 2024; trl's rpo_alpha): keeps the chosen replies likely, not only preferred")
    label_smoothing: float = opt(0.0, "robust / label_smoothed / simpo: assumed label-flip rate")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin")
    kto_desirable_weight: float = opt(1.0, "kto: weight of desirable replies")
    kto_undesirable_weight: float = opt(1.0, "kto: weight of undesirable replies")
    precompute_ref: bool = opt(True, "compute the reference log-probs once before training (saves a forward per step)")
    max_length: int = opt(512, "tokens of prompt + reply; longer replies are truncated")
    max_prompt_tokens: int = opt(384, "prompts longer than this are skipped (and counted), or an error if skip_long=false")
    skip_long: bool = opt(True, "skip records whose prompt exceeds max_prompt_tokens (false: stop with an error)")
    judge: JudgeConfig = opt(JudgeConfig(), "judge generations for held-out prompts by a rule (the one behind the "
                                            "preferences): val_judge = mean score of sampled answers")

    def check(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")


def check(cfg: DPOConfig) -> dict[str, Any]:
    from lmwright.methods import check_compat

    if cfg.data.format not in ("preference", "kto"):
        raise ConfigError(f"data.format={cfg.data.format}: dpo trains on preference records (prompt, chosen, "
                          "rejected; kto splits them into unpaired good/bad replies) or, with loss=kto, on kto records "
                          "(prompt, completion, label); set data.format=preference or data.format=kto")
    if cfg.data.format == "kto" and cfg.loss != "kto":
        raise ConfigError(f"data.format=kto with loss={cfg.loss}: kto records are unpaired (one reply and a label), "
                          f"and only loss=kto trains on them; set loss=kto, or give preference records")
    if not cfg.data.path:
        raise ConfigError(f"data.path is empty: point it at {cfg.data.format} records")
    check_compat(cfg.method, cfg.model, "causal-lm", cfg.model.gradient_checkpointing)
    tokenizer = resolve_tokenizer(cfg.model, cfg.tokenizer or cfg.model.tokenizer)
    if cfg.judge.enabled():
        from lmwright.stages._online import RewardSpec, check_reward

        try:
            check_reward(RewardSpec(model=cfg.judge.model, functions=cfg.judge.functions), tokenizer, "dpo judge")
        except ConfigError as e:  # the same checks as ppo/grpo's reward; name our options
            raise ConfigError(str(e).replace("reward.", "judge.")) from None
    return {"tokenizer": tokenizer}


# ------------------------------------------------------------------------------------ data
def build_items(records: list[dict], tokenizer, cfg: DPOConfig) -> tuple[list[dict], int]:
    """Paired items {chosen, rejected} or, for kto, unpaired {reply, mismatch, desirable}; (items, skipped)."""
    from lmwright.stages._align import encode_pairs

    if cfg.data.format == "kto":
        return unpaired_items(records, tokenizer, cfg)
    pairs, skipped = encode_pairs(records, tokenizer, cfg)
    if cfg.loss != "kto":
        return pairs, skipped
    from lmwright.stages._align import as_messages, encode_reply

    kept = [r for r in records if encode_reply(tokenizer, as_messages(r["prompt"], "user"), r["chosen"],
                                               cfg.max_prompt_tokens, cfg.max_length) is not None]
    unpaired = []
    for i, (p, r) in enumerate(zip(pairs, kept)):
        nxt = kept[(i + 1) % len(kept)]  # mismatched reply for the z0 estimate
        mismatch = encode_reply(tokenizer, as_messages(r["prompt"], "user"), nxt["chosen"], cfg.max_prompt_tokens,
                                cfg.max_length) or p["chosen"]
        unpaired.append({"reply": p["chosen"], "mismatch": mismatch, "desirable": 1.0})
        unpaired.append({"reply": p["rejected"], "mismatch": mismatch, "desirable": 0.0})
    return unpaired, skipped


def unpaired_items(records: list[dict], tokenizer, cfg: DPOConfig) -> tuple[list[dict], int]:
    """``kto`` records as {reply, mismatch, desirable}: the reply to its prompt, and the reply of the next record
    with another prompt to this prompt (for z0); (items, skipped: prompt over budget or reply cut away)."""
    from lmwright.stages._align import encode_reply

    kept, skipped = [], 0
    for i, r in enumerate(records):
        item = encode_reply(tokenizer, r["prompt"], r["completion"], cfg.max_prompt_tokens, cfg.max_length)
        if item is None:
            if not cfg.skip_long:
                raise ConfigError(f"record {i}: the prompt is longer than max_prompt_tokens={cfg.max_prompt_tokens} "
                                  "(or max_length leaves no reply token); raise them or set skip_long=true")
            skipped += 1
            continue
        kept.append((r, item))
    items = []
    for i, (r, item) in enumerate(kept):
        j = next((j % len(kept) for j in range(i + 1, i + len(kept)) if kept[j % len(kept)][0]["prompt"] != r["prompt"]),
                 (i + 1) % len(kept))
        mismatch = encode_reply(tokenizer, r["prompt"], kept[j][0]["completion"], cfg.max_prompt_tokens,
                                cfg.max_length) or item
        items.append({"reply": item, "mismatch": mismatch, "desirable": float(r["label"])})
    return items, skipped


def kto_balance_note(items: list[dict], cfg: DPOConfig) -> str | None:
    """trl's advice (KTO paper, Eq. 8): with unequal counts, w_D * n_D / (w_U * n_U) should lie in [1, 4/3]."""
    n_d = sum(it["desirable"] == 1.0 for it in items)
    n_u = len(items) - n_d
    if not n_d or not n_u:
        return f"the training data has no {'undesirable' if n_u == 0 else 'desirable'} reply: KTO learns from both"
    ratio = cfg.kto_desirable_weight * n_d / (cfg.kto_undesirable_weight * n_u)
    if n_d == n_u or 1.0 <= ratio <= 4 / 3:
        return None
    lo, hi = cfg.kto_undesirable_weight * n_u / n_d, cfg.kto_undesirable_weight * n_u / n_d * 4 / 3
    return (f"{n_d} desirable and {n_u} undesirable replies with weights {cfg.kto_desirable_weight}/"
            f"{cfg.kto_undesirable_weight}: w_D*n_D / (w_U*n_U) = {ratio:.2f}, outside [1, 4/3] (KTO paper, Eq. 8); "
            f"e.g. kto_desirable_weight in [{lo:.2f}, {hi:.2f}]")


def keys_of(cfg: DPOConfig) -> tuple[str, str]:
    return ("reply", "mismatch") if cfg.loss == "kto" else ("chosen", "rejected")


@torch.no_grad()
def precompute_reference(items: list[dict], collate, ref, batch_size: int, device) -> None:
    """Store the reference's summed log-probs in each item (``ref_a`` for the first row, ``ref_b`` the second)."""
    from lmwright.engine.loop import batch_to

    with ref() as model:
        was_training = model.training
        model.eval()
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            b = batch_to(collate(chunk), device)
            logps, _ = sequence_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                         b["labels"])  # (2b,)
            a, c = logps.chunk(2)
            for it, x, y in zip(chunk, a.tolist(), c.tolist()):
                it["ref_a"], it["ref_b"] = float(x), float(y)
        model.train(was_training)


# ------------------------------------------------------------------------------------ objective
def make_objective(cfg: DPOConfig, ref, autocast=None):
    """``autocast()``: the training precision, for reference forwards outside the engine's autocast (evaluation)."""
    from lmwright.objectives.preference import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss

    def reference_logps(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_a" in batch:
            return batch["ref_a"], batch["ref_b"]
        with torch.no_grad(), autocast() if autocast else contextlib.nullcontext(), ref() as m:
            logps, _ = sequence_logprobs(m(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits, batch["labels"])
        return logps.chunk(2)

    def kto_objective(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        B = ids.shape[0] // 2  # replies first, then their mismatched pairs
        a, _ = sequence_logprobs(model(input_ids=ids[:B], attention_mask=mask[:B]).logits, labels[:B])  # (B,)
        with torch.no_grad():  # z0 carries no gradient (trl scores these rows under no_grad too)
            b, _ = sequence_logprobs(model(input_ids=ids[B:], attention_mask=mask[B:]).logits, labels[B:])
        ref_a, ref_b = reference_logps(batch)
        return kto_loss(a, ref_a, batch["desirable"].bool(), kto_kl_estimate(b, ref_b), cfg.beta,
                        cfg.kto_desirable_weight, cfg.kto_undesirable_weight)

    def objective(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        if cfg.loss == "kto":
            return kto_objective(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        logps, counts = sequence_logprobs(logits, batch["labels"])  # (2B,), (2B,)
        a, b = logps.chunk(2)
        na, nb = counts.float().chunk(2)
        if cfg.loss == "simpo":
            out = simpo_loss(a / na, b / nb, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        elif cfg.loss == "orpo":
            out = orpo_loss(-a / na, a / na, b / nb, cfg.beta)
        else:
            ref_a, ref_b = reference_logps(batch)
            out = dpo_loss(a, b, ref_a, ref_b, cfg.beta, cfg.loss, cfg.label_smoothing, na, nb)
            if cfg.rpo_alpha:  # RPO: + alpha x the chosen reply's mean token NLL, per pair
                nll = -a / na.clamp(min=1)
                out.loss_sum = out.loss_sum + cfg.rpo_alpha * nll.sum()
                out.metrics["nll_loss"] = nll.detach().sum()
        out.metrics["logps/chosen"] = a.detach().sum()
        out.metrics["logps/rejected"] = b.detach().sum()
        out.metrics["win"] = (a > b).float().sum()  # the policy prefers the chosen reply
        return out

    return objective


# ------------------------------------------------------------------------------------ judge
def make_judge(cfg: DPOConfig, val_recs: list[dict], tokenizer, device):
    """``judge(model) -> {val_judge, val_judge_greedy, val_judge_length}``: the mean rule score of sampled and
    greedy answers to held-out prompts (the reference answer a rule sees is the record's ``chosen``); None
    when no judge is configured or there is no validation split."""
    if not cfg.judge.enabled() or not val_recs:
        return None
    from lmwright.stages._online import RewardSpec, RolloutConfig, Scorer, build_prompts, make_eval

    j = cfg.judge
    rc = RolloutConfig(max_new_tokens=j.max_new_tokens, temperature=j.temperature, eval_prompts=j.prompts,
                       max_prompt_tokens=cfg.max_prompt_tokens)
    if cfg.data.format == "kto":  # the judge's reference answer is a desirable reply
        val_recs = [{"prompt": r["prompt"], "chosen": r["completion"]} for r in val_recs if r["label"]]
        if not val_recs:
            return None
    prompts, _ = build_prompts(val_recs, "preference", tokenizer, rc)
    scorer = Scorer(RewardSpec(model=j.model, functions=j.functions), device)
    evaluate = make_eval(prompts[:j.prompts], scorer, tokenizer, rc, lambda m: m, samples=j.samples)
    names = {"val_reward": "val_judge", "val_reward_greedy": "val_judge_greedy", "val_length": "val_judge_length"}
    return lambda model: {names.get(k, k): v for k, v in evaluate(model).items()}


# ------------------------------------------------------------------------------------ run
def run(cfg: DPOConfig) -> Path:
    from lmwright.data import load_records
    from lmwright.engine import Run, train
    from lmwright.engine.loop import evaluate_loss
    from lmwright.engine.report import write_report
    from lmwright.models import count_parameters
    from lmwright.stages._align import (
        Reference,
        autocast_for,
        base_path_of,
        collate_pairs,
        disable_dropout,
        load_policy,
    )

    tokenizer = check(cfg)["tokenizer"]
    train_recs, val_recs, manifest = load_records(cfg.data)
    train_ds, skipped = build_items(train_recs, tokenizer, cfg)
    val_ds, val_skipped = build_items(val_recs, tokenizer, cfg)
    log.info("data: %d train / %d validation items (%s), %d records skipped", len(train_ds), len(val_ds), cfg.loss,
             skipped + val_skipped)
    if cfg.loss == "kto" and (note := kto_balance_note(train_ds, cfg)):
        log.warning("kto: %s", note)
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id, keys=keys_of(cfg))

    run_ = Run.start(cfg, "dpo", manifest)
    # an adapter run as the start with an adapter method: the merged start is the new adapter's base
    model = load_policy(cfg.model, cfg.method, tokenizer, cfg.train.seed, merged_base=run_.dir / "base")
    disable_dropout(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    autocast = partial(autocast_for, cfg.train, device, model)  # the precision of the engine's training forward
    needs_ref = cfg.loss not in REFERENCE_FREE
    ref = Reference(model, keep_copy=needs_ref and not cfg.precompute_ref)
    if needs_ref and cfg.precompute_ref:
        with autocast():  # train and validation apart: evaluation batches are then the precompute's batches
            for items in (train_ds, val_ds):
                precompute_reference(items, collate, ref, cfg.train.micro_batch_size, device)
    trainable, total = count_parameters(model)

    run_.write_info(model=cfg.model.name, method=cfg.method.name, loss=cfg.loss, parameters=total,
                    trainable=trainable, train_items=len(train_ds),
                    val_items=len(val_ds), skipped_records=skipped + val_skipped)
    objective = make_objective(cfg, ref, autocast)
    judge = make_judge(cfg, val_recs, tokenizer, device)

    def evaluate(m) -> dict[str, float]:
        """Everything measured before and after (the engine's evaluations add the judge to the val_ losses)."""
        with autocast():
            out = evaluate_loss(m, objective, val_ds, collate, cfg.train.micro_batch_size, device) if val_ds else {}
            return {**out, **(judge(m) if judge else {})}

    before = evaluate(model)
    base = base_path_of(cfg.model, run_.dir / "base")

    def save_model(m, d: Path) -> None:
        save_final(m, tokenizer, d, "causal-lm", method_cfg=cfg.method, base_path=base)

    # the judge during training only at train.eval_every (the final evaluation is `after`)
    result = train(model, train_ds, collate, objective, cfg.train, run_, val_data=val_ds or None, save_model=save_model,
                   evaluate=judge if cfg.train.eval_every else None)
    if result.interrupted:
        return run_.dir
    after = evaluate(model)
    save_final(model, tokenizer, run_.final, "causal-lm", method_cfg=cfg.method, base_path=base,
               extra={"stage": "dpo", "loss": cfg.loss})
    summary = {"model": cfg.model.name, "method": cfg.method.name, "loss": cfg.loss, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1), "skipped records": skipped + val_skipped}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    run_.write_info(before=before, after=after)
    write_report(run_.dir, f"lmwright dpo ({cfg.loss}) - {run_.dir.name}", [], summary)
    return run_.dir


# ------------------------------------------------------------------------------------ demo hook
def alignment_demo_step(sft_run_dir: str | Path, workdir: str | Path, n_pairs: int = 400, steps: int = 60,
                        rule: str = "polite", eval_prompts: int = 60, overrides: tuple[str, ...] = (),
                        task=None) -> dict[str, Any]:
    """The demo's alignment step (well under a minute on a laptop CPU): DPO of an SFT run on preference pairs
    generated by ``rule`` (see ``lmwright.data.synthetic.RULES``; ``polite``: the chosen reply opens politely)
    from the task the SFT run learned, with an NLL term on the chosen replies (``rpo_alpha``: without it the
    small policies of the demo and the tests lose answer accuracy while they become polite).

    Returns before/after figures for the demo report: the share of sampled and greedy answers to held-out
    prompts that follow the rule (judged by the rule's registered reward), the policy's preference for the
    chosen reply of held-out pairs, and greedy answer accuracy on held-out instructions (answer in the reply)."""
    import json

    from lmwright.config import load_config
    from lmwright.data.synthetic import RULES, instruction_task, preference_task

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "preference.jsonl"
    task = task or instruction_task  # the alpaca task the pairs and the held-out questions come from
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_task(n_pairs, seed=5, source=task, rule=rule)),
                    encoding="utf-8")
    held_out = task(eval_prompts, seed=1234)
    acc_before = answer_accuracy(sft_run_dir, held_out)
    out_dir = work / "runs" if (work / "runs").is_dir() else work
    cfg = load_config(DPOConfig, [], [f"model.name={sft_run_dir}", f"data.path=[{data}]", "data.val_fraction=0.2",
                                      f"train.output_dir={out_dir}", "train.run_name=dpo", f"train.max_steps={steps}",
                                      "train.micro_batch_size=8", "train.lr=1e-4", "train.warmup_steps=5",
                                      "train.eval_every=0", "train.save_every=0", "train.progress=false",
                                      "beta=0.1", "rpo_alpha=5", f"judge.functions=[{json.dumps(RULES[rule])}]",
                                      "judge.max_new_tokens=16", "judge.temperature=0.5", *overrides])
    run_dir = run(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    acc_after = answer_accuracy(run_dir, held_out)
    b, a = info["before"], info["after"]
    return {"run": str(run_dir), "rule": rule, "steps": steps, "train_seconds": info.get("train_seconds"),
            f"sampled answers {rule} before": b.get("val_judge"), f"sampled answers {rule} after": a.get("val_judge"),
            f"greedy answers {rule} before": b.get("val_judge_greedy"),
            f"greedy answers {rule} after": a.get("val_judge_greedy"),
            "held-out preference accuracy before": b.get("val_win"),
            "held-out preference accuracy after": a.get("val_win"),
            "answer accuracy before": acc_before, "answer accuracy after": acc_after}


def answer_accuracy(model_dir: str | Path, records: list[dict], max_new_tokens: int = 16) -> float:
    """Share of alpaca records whose reference answer is in the greedy reply of a chat model (whole words: a
    polite opener does not count against it); the demo's and the tests' yardstick."""
    from lmwright.data.chat import render_prompt_ids
    from lmwright.methods import load_trained
    from lmwright.objectives.rewards import contains_answer
    from lmwright.stages._align import decode_completions, prompt_and_reference, sample

    model, tok = load_trained(model_dir, task="causal-lm")
    pr = [prompt_and_reference({**r, "system": r.get("system", "")}, "alpaca") for r in records]
    b = sample(model, tok, [render_prompt_ids(tok, p) for p, _ in pr], max_new_tokens, temperature=0.0)
    outs = decode_completions(tok, b)
    return sum(contains_answer(o, ref) for o, (_, ref) in zip(outs, pr)) / max(len(pr), 1)


class _Stage:
    name = "dpo"
    Config = DPOConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("dpo", _Stage)
