"""``lmwright train grpo``: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath) with
verifiable rewards: registered reward functions (``exact_answer``, ``format``, ``length``, ...) and/or a
reward model. No value model: each prompt is answered ``group_size`` times and each completion's advantage
is its reward relative to its group's mean (and std).

Each rollout: ``rollout.batch_size / group_size`` prompts, ``group_size`` samples each -> rewards -> group
advantages -> ``rollout.epochs`` passes of the clipped GRPO loss (+ ``beta`` x k3 KL to the reference) over
micro-batches, through the engine's one training loop (the rollout buffer is the engine's batch source).

Read top to bottom: config -> prompts -> policy + reference -> rollout -> loss -> engine.train -> final/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmwright.config import ConfigError, opt
from lmwright.data.config import DataConfig
from lmwright.engine.config import TrainConfig
from lmwright.methods import MethodConfig
from lmwright.models.presets import ModelConfig
from lmwright.objectives.base import LossOutput
from lmwright.stages._online import RewardSpec, RolloutConfig
from lmwright.stages.common import STAGES
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.grpo")


@dataclass
class GRPOConfig:
    stage: str = opt("grpo", "stage id")
    model: ModelConfig = opt(ModelConfig(), "the policy (usually an SFT run)")
    tokenizer: str | None = opt(None, "tokenizer folder (default: the model's)")
    method: MethodConfig = opt(MethodConfig(), "how the policy's weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="alpaca"), "prompts + reference answers: alpaca, messages, preference or text")
    train: TrainConfig = opt(TrainConfig(lr=1e-5, micro_batch_size=8, max_steps=100, metric_for_best="val_reward",
                                         warmup_steps=0, scheduler="constant", eval_every=20), "the training loop")
    rollout: RolloutConfig = opt(RolloutConfig(), "sampling of completions (epochs = GRPO iterations per rollout)")
    reward: RewardSpec = opt(RewardSpec(functions=["exact_answer"]), "reward functions and/or a reward model")
    group_size: int = opt(8, "completions per prompt")
    beta: float = opt(0.04, "weight of the k3 KL to the reference (0 = no reference model)")
    max_kl: float = opt(20.0, "stop (TrainingDiverged, last checkpoint kept) if the mean KL per sequence exceeds this (0 = off)")
    clip_eps: float = opt(0.2, "lower ratio clipping")
    clip_eps_high: float | None = opt(None, "upper ratio clipping (DAPO clip-higher); default clip_eps")
    scale_rewards: Literal["group", "batch", "none"] = opt("group", "divide advantages by the group std, the batch std, or not (Dr. GRPO)")
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = opt("dapo", "token aggregation of the loss (as trl)")

    def check(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.rollout.batch_size % self.group_size:
            raise ConfigError(f"rollout.batch_size={self.rollout.batch_size} must be a multiple of "
                              f"group_size={self.group_size}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")


def check(cfg: GRPOConfig) -> dict[str, Any]:
    from lmwright.stages._online import check_online

    return check_online(cfg, "grpo", "prompts with reference answers (e.g. alpaca records)")


def make_rollout_fn(cfg: GRPOConfig, policy, ref, scorer, tokenizer):
    from lmwright.objectives.rl import entropy_from_logits, grpo_advantages, kl_penalty, masked_mean
    from lmwright.stages._align import completion_logprobs, decode_completions, sample
    from lmwright.stages._online import check_divergence

    rc, G = cfg.rollout, cfg.group_size
    monitor_kl = cfg.beta > 0 or cfg.max_kl > 0

    @torch.no_grad()
    def make_rollout(k: int, prompts: list[dict]) -> dict[str, torch.Tensor]:
        group = [p for p in prompts for _ in range(G)]  # consecutive groups of G samples of one prompt
        b = sample(policy, tokenizer, [p["ids"] for p in group], rc.max_new_tokens, rc.temperature, rc.top_k, rc.top_p)
        texts = decode_completions(tokenizer, b)
        rewards = scorer([p["messages"] for p in group], texts, [p["reference"] for p in group])  # (B,)
        mask = b["completion_mask"].float()
        logp, logits, _ = completion_logprobs(policy, b, rc.temperature)
        out = {**b, "advantages": grpo_advantages(rewards, G, cfg.scale_rewards).to(logp.device)}
        if rc.epochs > 1:
            out["old_logp"] = logp
        seq_kl = 0.0
        if monitor_kl:
            with ref() as ref_model:
                ref_logp, _, _ = completion_logprobs(ref_model, b, rc.temperature)
            out["ref_logp"] = ref_logp
            seq_kl = float((kl_penalty(logp, ref_logp, "k3") * mask).sum(-1).mean())
        check_divergence(seq_kl, float(rewards.mean()), cfg.max_kl, f"rollout {k}")
        solved = (rewards.view(-1, G).std(1) == 0).float().mean()  # groups with no learning signal
        stats = {"rollout/reward": rewards.mean(), "rollout/reward_std": rewards.view(-1, G).std(1).mean(),
                 "rollout/kl": torch.tensor(seq_kl), "rollout/entropy": masked_mean(entropy_from_logits(logits), mask),
                 "rollout/length": mask.sum(-1).mean(), "rollout/zero_std_groups": solved}
        return {**out, **{k_: v.detach().float().cpu().reshape(()) for k_, v in stats.items()}}

    return make_rollout


def make_objective(cfg: GRPOConfig):
    from lmwright.objectives.rl import grpo_loss
    from lmwright.stages._align import completion_logprobs

    def objective(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        logp, _, _ = completion_logprobs(model, batch, cfg.rollout.temperature)
        out = grpo_loss(logp, batch["advantages"], batch["completion_mask"].float(), batch.get("old_logp"),
                        batch.get("ref_logp"), cfg.beta, cfg.clip_eps, cfg.clip_eps_high, cfg.loss_type,
                        cfg.rollout.max_new_tokens)
        out.means.update({k: v for k, v in batch.items() if k.startswith("rollout/")})
        return out

    return objective


def run(cfg: GRPOConfig) -> Path:
    from lmwright.stages._align import Reference, autocast_for
    from lmwright.stages._online import RolloutSource, Scorer, make_eval, start_online, train_online

    s = start_online(cfg, "grpo", check)
    policy, tokenizer = s.policy.to(s.device), s.tokenizer
    ref = Reference(policy, keep_copy=cfg.beta > 0 or cfg.max_kl > 0)
    scorer = Scorer(cfg.reward, s.device)
    source = RolloutSource(s.prompts, cfg.rollout.batch_size // cfg.group_size, cfg.rollout.batch_size,
                           cfg.train.micro_batch_size, cfg.rollout.epochs, cfg.train.seed,
                           make_rollout_fn(cfg, policy, ref, scorer, tokenizer),
                           autocast_for(cfg.train, s.device, policy))
    evaluate = make_eval(s.val_prompts, scorer, tokenizer, cfg.rollout, lambda m: m)
    return train_online(cfg, "grpo", s.run, policy, lambda m: m, source, evaluate, make_objective(cfg), tokenizer,
                        len(s.prompts), bool(s.val_prompts), s.skipped)


class _Stage:
    name = "grpo"
    Config = GRPOConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("grpo", _Stage)
