"""Glue shared by the online stages (``ppo``, ``grpo``): prompts from records, the reward (a reward model or
registered reward functions), and :class:`RolloutSource`, the batch source the engine's ``train()`` reads
(``get(position)``) in place of a dataset. It generates a rollout buffer with the current policy whenever
the previous one has been used for its ``epochs`` passes, so the engine's optimizer, schedule, gradient
clipping, NaN stop, logging and checkpointing are reused unchanged.

Resume continues at the checkpoint's step with a fresh rollout from the restored policy (sampling is
on-policy, so an exact replay of the interrupted rollout is not needed for correctness).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from lmwright.config import ConfigError, opt
from lmwright.stages._align import Messages
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.online")


@dataclass
class RolloutConfig:
    batch_size: int = opt(32, "completions generated per rollout (grpo: prompts x group_size)")
    max_new_tokens: int = opt(32, "tokens generated per completion")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (log-probs use the same)")
    top_k: int = opt(0, "sample from the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling (1 = off)")
    epochs: int = opt(1, "optimisation passes over each rollout (ppo epochs / grpo iterations)")
    max_prompt_tokens: int = opt(256, "prompts longer than this are skipped (and counted), or an error if skip_long=false")
    skip_long: bool = opt(True, "skip prompts over max_prompt_tokens (false: stop with an error)")
    eval_prompts: int = opt(64, "validation prompts answered at each evaluation: val_reward (sampled at the "
                                       "rollout temperature, fixed seed) and val_reward_greedy")

    def check(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.epochs < 1:
            raise ConfigError("rollout.batch_size, rollout.max_new_tokens and rollout.epochs must be >= 1")


@dataclass
class RewardSpec:
    model: str | None = opt(None, "reward model: a `lmwright train reward` run or folder (same tokenizer as the policy)")
    functions: list = opt([], "registered reward functions, e.g. [exact_answer] or [{name: format, pattern: '^[A-Z]+$', "
                              "weight: 0.5}]; see lmwright/objectives/rewards.py")


def check_online(cfg: Any, stage: str, data_hint: str) -> dict[str, Any]:
    """Validate-time checks of ppo and grpo: data, method compatibility, the reward, one process.
    ``data_hint`` says what ``data.path`` should point at."""
    from lmwright.methods import check_compat
    from lmwright.stages.common import resolve_tokenizer

    if not cfg.data.path:
        raise ConfigError(f"data.path is empty: point it at {data_hint}")
    check_compat(cfg.method, cfg.model, "causal-lm", cfg.model.gradient_checkpointing)
    tokenizer = resolve_tokenizer(cfg.model, cfg.tokenizer or cfg.model.tokenizer)
    check_reward(cfg.reward, tokenizer, stage)
    if cfg.train.nproc > 1:
        raise ConfigError(f"{stage} runs in one process (train.nproc=1); use a GPU for speed")
    return {"tokenizer": tokenizer}


def check_reward(spec: RewardSpec, tokenizer, stage: str) -> None:
    """Validate-time checks: one reward source, known function names, a reward model with our tokenizer."""
    from lmwright.objectives.rewards import resolve
    from lmwright.stages._align import same_tokenizer

    if not spec.model and not spec.functions:
        raise ConfigError(f"{stage} needs a reward: set reward.model=<reward run> or reward.functions=[exact_answer]")
    try:
        resolve(spec.functions)
    except KeyError as e:
        raise ConfigError(f"reward.functions: {e}") from None
    if spec.model:
        from lmwright.models.load import load_tokenizer, resolve_model_path

        p = resolve_model_path(spec.model)
        tok_dir = p if (p / "tokenizer_config.json").exists() else p.parent / "tokenizer"
        why = same_tokenizer(tokenizer, load_tokenizer(tok_dir))
        if why:
            raise ConfigError(f"reward.model={spec.model} uses a different tokenizer from the policy ({why}); train "
                              f"the reward model from the policy's base (reward stage model.name=<the SFT run>)")


class Scorer:
    """Rewards of completions: the sum of the reward model's score and the weighted reward functions."""

    def __init__(self, spec: RewardSpec, device):
        from lmwright.objectives.rewards import resolve
        from lmwright.stages._align import RewardModel

        self.fns = resolve(spec.functions)
        self.rm = RewardModel(spec.model, device) if spec.model else None

    def __call__(self, prompts: list[Messages], completions: list[str], refs: list[str | None]) -> torch.Tensor:
        from lmwright.objectives.rewards import total_reward

        r = torch.tensor([total_reward(self.fns, c, ref) for c, ref in zip(completions, refs)], dtype=torch.float32)
        if self.rm is not None:
            r = r + self.rm.score(prompts, completions)
        return r  # (B,)


def build_prompts(records: list[dict], fmt: str, tokenizer, rc: RolloutConfig) -> tuple[list[dict], int]:
    """[{ids, messages, reference}] from canonical records; (prompts, skipped-too-long)."""
    from lmwright.data.chat import render_prompt_ids
    from lmwright.stages._align import prompt_and_reference

    out, skipped = [], 0
    for i, r in enumerate(records):
        msgs, ref = prompt_and_reference(r, fmt)
        ids = render_prompt_ids(tokenizer, msgs)
        if len(ids) > rc.max_prompt_tokens:
            if not rc.skip_long:
                raise ConfigError(f"record {i}: prompt of {len(ids)} tokens exceeds rollout.max_prompt_tokens="
                                  f"{rc.max_prompt_tokens}; raise it or set rollout.skip_long=true")
            skipped += 1
            continue
        out.append({"ids": ids, "messages": msgs, "reference": ref})
    if not out:
        raise ConfigError("no usable prompts (all empty or over rollout.max_prompt_tokens)")
    return out, skipped


class RolloutSource:
    """The engine's batch source for an online stage. ``make_rollout(k, prompts)`` (the stage's) returns a
    dict of (B, ...) tensors; ``get(position)`` serves micro-batches of it, ``epochs`` shuffled passes each."""

    def __init__(self, prompts: list[dict], prompts_per_rollout: int, completions_per_rollout: int, micro: int,
                 epochs: int, seed: int, make_rollout, autocast=None):
        if completions_per_rollout % micro:
            raise ConfigError(f"rollout.batch_size={completions_per_rollout} must be a multiple of "
                              f"train.micro_batch_size={micro}")
        self.prompts, self.per_rollout, self.micro, self.epochs, self.seed = (
            prompts, prompts_per_rollout, micro, epochs, seed)
        self.micro_per_pass = completions_per_rollout // micro
        self.make_rollout = make_rollout
        self.autocast = autocast  # the engine's precision, so old log-probs match the training forward
        self.k, self.buffer = -1, None

    def __len__(self) -> int:
        return len(self.prompts)

    def rollout_prompts(self, k: int) -> list[dict]:
        per_epoch = max(1, len(self.prompts) // self.per_rollout)
        epoch, j = divmod(k, per_epoch)
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return [self.prompts[i] for i in perm[j * self.per_rollout:(j + 1) * self.per_rollout].tolist()] \
            if len(self.prompts) >= self.per_rollout else \
            [self.prompts[i % len(self.prompts)] for i in range(j * self.per_rollout, (j + 1) * self.per_rollout)]

    def get(self, position: int) -> dict[str, Any]:
        from lmwright.stages._align import index_batch

        k, j = divmod(position, self.micro_per_pass * self.epochs)
        if k != self.k:
            with self.autocast or contextlib.nullcontext():
                self.buffer, self.k = self.make_rollout(k, self.rollout_prompts(k)), k
        epoch, m = divmod(j, self.micro_per_pass)
        n = self.micro_per_pass * self.micro
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 104_729 + k * 31 + epoch))
        return index_batch(self.buffer, perm[m * self.micro:(m + 1) * self.micro].tolist())


def check_divergence(kl: float, reward_mean: float, max_kl: float, where: str) -> None:
    """Stop (the engine keeps the last good checkpoint) when the reward is NaN or the KL exploded."""
    from lmwright.engine import TrainingDiverged

    if not math.isfinite(reward_mean):
        raise TrainingDiverged(f"{where}: the mean reward is {reward_mean}; check the reward model/functions")
    if max_kl > 0 and (not math.isfinite(kl) or kl > max_kl):
        raise TrainingDiverged(f"{where}: KL to the reference = {kl:.3g} per sequence exceeds max_kl={max_kl}; the "
                               f"policy drifted. Lower train.lr, raise kl_coef/beta, or raise max_kl")


def make_eval(prompts: list[dict], scorer: Scorer, tokenizer, rc: RolloutConfig, get_policy, samples: int = 1):
    """``evaluate(model)`` for the engine: mean reward of answers to held-out prompts, ``samples`` sampled at the
    rollout temperature per prompt (``val_reward``) and one greedy (``val_reward_greedy``)."""
    from lmwright.stages._align import decode_completions, sample

    def evaluate(model) -> dict[str, float]:
        if not prompts:
            return {}
        policy, out = get_policy(model), {}
        for name, temperature, reps in (("val_reward", rc.temperature, samples), ("val_reward_greedy", 0.0, 1)):
            ps = prompts * reps
            with torch.random.fork_rng(devices=[]):  # the same draws at every evaluation; training RNG untouched
                torch.manual_seed(1234)
                b = sample(policy, tokenizer, [p["ids"] for p in ps], rc.max_new_tokens, temperature, rc.top_k,
                           rc.top_p)
            texts = decode_completions(tokenizer, b)
            out[name] = float(scorer([p["messages"] for p in ps], texts, [p["reference"] for p in ps]).mean())
            if name == "val_reward":
                out["val_length"] = float(b["completion_mask"].sum(-1).float().mean())
        return out

    return evaluate


def load_prompts(cfg: Any, tokenizer) -> tuple[list[dict], list[dict], int, dict]:
    """(train prompts, validation prompts, prompts skipped as too long, data manifest) of an online stage."""
    from lmwright.data import load_records

    train_recs, val_recs, manifest = load_records(cfg.data)
    prompts, skipped = build_prompts(train_recs, cfg.data.format, tokenizer, cfg.rollout)
    val_prompts, _ = build_prompts(val_recs, cfg.data.format, tokenizer, cfg.rollout) if val_recs else ([], 0)
    val_prompts = val_prompts[:cfg.rollout.eval_prompts]
    log.info("prompts: %d train, %d validation, %d skipped (over rollout.max_prompt_tokens)", len(prompts),
             len(val_prompts), skipped)
    return prompts, val_prompts, skipped, manifest


@dataclass
class OnlineStart:
    """What ppo and grpo have before they build their own model around the policy."""

    tokenizer: Any
    device: str
    prompts: list[dict]
    val_prompts: list[dict]
    skipped: int
    run: Any
    policy: torch.nn.Module


def start_online(cfg: Any, stage: str, check) -> OnlineStart:
    """Check the config, read the prompts, open the run folder (``engine.Run.start``) and load the policy."""
    from lmwright.engine import Run
    from lmwright.stages._align import load_policy

    tokenizer = check(cfg)["tokenizer"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts, val_prompts, skipped, manifest = load_prompts(cfg, tokenizer)
    run_ = Run.start(cfg, stage, manifest)
    # an adapter run as the start with an adapter method: the merged start is the new adapter's base
    policy = load_policy(cfg.model, cfg.method, tokenizer, cfg.train.seed, merged_base=run_.dir / "base")
    return OnlineStart(tokenizer, device, prompts, val_prompts, skipped, run_, policy)


def finish_report(run_: Any, cfg: Any, stage: str, result: Any, before: dict, after: dict, skipped: int) -> None:
    """Before/after figures into run.json and report.html (shared by ppo and grpo)."""
    from lmwright.engine.report import write_report

    summary = {"model": cfg.model.name, "method": cfg.method.name, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1), "skipped prompts": skipped}
    summary.update({f"before {k}": v for k, v in before.items()})
    summary.update({f"after {k}": v for k, v in after.items()})
    run_.write_info(before=before, after=after)
    write_report(run_.dir, f"lmwright {stage} - {run_.dir.name}", [], summary)


def train_online(cfg: Any, stage: str, run_: Any, model: torch.nn.Module, policy_of, source: Any, evaluate,
                 objective, tokenizer, n_prompts: int, has_val: bool, skipped: int):
    """The part ppo and grpo share once their rollout source is built: record the run, evaluate before,
    train with the engine (checkpoints save ``policy_of(model)``), evaluate after, write final/ and the
    report. Returns the run folder."""
    from lmwright.engine import train
    from lmwright.models import count_parameters
    from lmwright.stages._align import base_path_of
    from lmwright.stages.common import save_final

    trainable, total = count_parameters(model)
    run_.write_info(model=cfg.model.name, method=cfg.method.name, parameters=total, trainable=trainable,
                    prompts=n_prompts, skipped_prompts=skipped)
    before = evaluate(model)
    log.info("%s before training: %s", stage, before)
    base = base_path_of(cfg.model, run_.dir / "base")

    def save_model(m, d) -> None:
        save_final(policy_of(m), tokenizer, d, "causal-lm", method_cfg=cfg.method, base_path=base)

    result = train(model, source, None, objective, cfg.train, run_, evaluate=evaluate if has_val else None,
                   save_model=save_model)
    if result.interrupted:
        return run_.dir
    after = evaluate(model)
    save_final(policy_of(model), tokenizer, run_.final, "causal-lm", method_cfg=cfg.method, base_path=base,
               extra={"stage": stage})
    finish_report(run_, cfg, stage, result, before, after, skipped)
    return run_.dir
