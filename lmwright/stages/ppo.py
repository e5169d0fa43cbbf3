"""``lmwright train ppo``: RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022) against a reward model
or registered reward functions. trl has no PPO trainer any more, so this is ours.

Each rollout: sample completions of a batch of prompts with the policy -> score them -> per-token rewards
``-kl_coef * (log pi - log pi_ref)`` plus the score on the last token -> values from a small scalar head on
the policy's last hidden states -> GAE advantages (whitened) and returns. Then ``rollout.epochs`` passes of
clipped policy + value losses over micro-batches of the rollout, through the engine's one training loop
(the rollout buffer is the engine's batch source; see ``_online.py``). Works with every method: with a peft
adapter the reference is the same model with the adapter disabled; otherwise a frozen copy.

Read top to bottom: config -> prompts -> policy + value head + reference -> rollout -> loss -> engine.train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

log = get_logger("lmwright.ppo")


@dataclass
class PPOConfig:
    stage: str = opt("ppo", "stage id")
    model: ModelConfig = opt(ModelConfig(), "the policy (usually an SFT run)")
    tokenizer: str | None = opt(None, "tokenizer folder (default: the model's)")
    method: MethodConfig = opt(MethodConfig(), "how the policy's weights are adapted (full, lora, ...)")
    data: DataConfig = opt(DataConfig(format="alpaca"), "prompts (+ reference answers): alpaca, messages, preference or text")
    train: TrainConfig = opt(TrainConfig(lr=1e-5, micro_batch_size=8, max_steps=100, metric_for_best="val_reward",
                                         warmup_steps=0, scheduler="constant", eval_every=20), "the training loop")
    rollout: RolloutConfig = opt(RolloutConfig(epochs=2), "sampling of completions (epochs = PPO epochs per rollout)")
    reward: RewardSpec = opt(RewardSpec(), "reward model and/or reward functions")
    kl_coef: float = opt(0.05, "weight of the per-token KL penalty to the reference in the reward")
    max_kl: float = opt(20.0, "stop (TrainingDiverged, last checkpoint kept) if the mean KL per sequence exceeds this (0 = off)")
    clip_eps: float = opt(0.2, "policy ratio clipping")
    clip_value: float = opt(0.2, "value clipping around the rollout's values")
    vf_coef: float = opt(0.1, "weight of the value loss")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_rewards: bool = opt(False, "whiten the scores of each rollout before adding the KL penalty")

    def check(self) -> None:
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ConfigError("kl_coef and vf_coef must be >= 0")


def check(cfg: PPOConfig) -> dict[str, Any]:
    from lmwright.stages._online import check_online

    return check_online(cfg, "ppo", "prompts (alpaca/messages/preference/text records)")


class PolicyWithValue(torch.nn.Module):
    """The policy and a scalar value head on its last hidden states: one module for the engine, so the
    optimizer and checkpoints cover both."""

    def __init__(self, policy: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        # zero init: the first advantages are the (whitened) returns themselves instead of noise from a random
        # baseline, which on small models drowned the reward signal (measured: no learning with a random head)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.float()).squeeze(-1)  # (B, N)


def make_rollout_fn(cfg: PPOConfig, pv: PolicyWithValue, ref, scorer, tokenizer):
    from lmwright.objectives.rl import (
        entropy_from_logits,
        gae_advantages,
        kl_penalty,
        masked_mean,
        masked_whiten,
    )
    from lmwright.stages._align import completion_logprobs, decode_completions, sample
    from lmwright.stages._online import check_divergence

    rc = cfg.rollout

    @torch.no_grad()
    def make_rollout(k: int, prompts: list[dict]) -> dict[str, torch.Tensor]:
        b = sample(pv.policy, tokenizer, [p["ids"] for p in prompts], rc.max_new_tokens, rc.temperature, rc.top_k,
                   rc.top_p)
        texts = decode_completions(tokenizer, b)
        scores = scorer([p["messages"] for p in prompts], texts, [p["reference"] for p in prompts])  # (B,)
        device = b["input_ids"].device
        mask = b["completion_mask"].float()  # (B, N)
        logp, logits, hidden = completion_logprobs(pv.policy, b, rc.temperature, hidden=True)
        values = pv.values(hidden) * mask
        with ref() as ref_model:
            ref_logp, _, _ = completion_logprobs(ref_model, b, rc.temperature)
        kl = kl_penalty(logp, ref_logp, "k1") * mask  # (B, N)
        seq_kl = float(kl.sum(-1).mean())
        check_divergence(seq_kl, float(scores.mean()), cfg.max_kl, f"rollout {k}")
        s = scores.to(device)
        if cfg.whiten_rewards:
            s = masked_whiten(s, torch.ones_like(s), shift_mean=False)
        rewards = -cfg.kl_coef * kl
        last = mask.sum(-1).long().clamp(min=1) - 1  # index of each completion's last token
        rewards[torch.arange(len(s), device=device), last] += s
        adv, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask) * mask
        stats = {"rollout/reward": scores.mean(), "rollout/kl": torch.tensor(seq_kl),
                 "rollout/entropy": masked_mean(entropy_from_logits(logits), mask),
                 "rollout/length": mask.sum(-1).mean()}
        return {**b, "old_logp": logp, "values": values, "advantages": adv, "returns": returns,
                **{k_: v.detach().float().cpu().reshape(()) for k_, v in stats.items()}}

    return make_rollout


def make_objective(cfg: PPOConfig):
    from lmwright.objectives.rl import ppo_policy_loss, ppo_value_loss
    from lmwright.stages._align import completion_logprobs

    def objective(model: PolicyWithValue, batch: dict[str, torch.Tensor]) -> LossOutput:
        mask = batch["completion_mask"].float()
        logp, _, hidden = completion_logprobs(model.policy, batch, cfg.rollout.temperature, hidden=True)
        pg = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip_eps)
        vf = ppo_value_loss(model.values(hidden), batch["values"], batch["returns"], mask, cfg.clip_value)
        means = {k: v for k, v in batch.items() if k.startswith("rollout/")}
        metrics = {**pg.metrics, **vf.metrics, "value_loss": vf.loss_sum.detach()}
        return LossOutput(loss_sum=pg.loss_sum + cfg.vf_coef * vf.loss_sum, n_targets=pg.n_targets,
                          metrics=metrics, means=means)

    return objective


def run(cfg: PPOConfig) -> Path:
    from lmwright.stages._align import Reference, autocast_for
    from lmwright.stages._online import RolloutSource, Scorer, make_eval, start_online, train_online

    s = start_online(cfg, "ppo", check)
    policy, tokenizer = s.policy, s.tokenizer
    pv = PolicyWithValue(policy, policy.config.get_text_config().hidden_size).to(s.device)
    ref = Reference(policy, keep_copy=True)
    scorer = Scorer(cfg.reward, s.device)
    source = RolloutSource(s.prompts, cfg.rollout.batch_size, cfg.rollout.batch_size, cfg.train.micro_batch_size,
                           cfg.rollout.epochs, cfg.train.seed, make_rollout_fn(cfg, pv, ref, scorer, tokenizer),
                           autocast_for(cfg.train, s.device, pv))
    evaluate = make_eval(s.val_prompts, scorer, tokenizer, cfg.rollout, lambda m: m.policy)
    return train_online(cfg, "ppo", s.run, pv, lambda m: m.policy, source, evaluate, make_objective(cfg), tokenizer,
                        len(s.prompts), bool(s.val_prompts), s.skipped)


class _Stage:
    name = "ppo"
    Config = PPOConfig
    check = staticmethod(check)
    run = staticmethod(run)


STAGES.register("ppo", _Stage)
