"""PPO and GRPO maths on per-token tensors (B, T) with a response ``mask`` (1 = generated token).

PPO: Schulman et al. 2017 (clipped surrogate, Eq. 7), GAE: Schulman et al. 2016 (Eq. 16), value
clipping and whitening as in the RLHF PPO of Ziegler et al. 2019 / trl's former ``PPOTrainer``.
GRPO: Shao et al. 2024 (DeepSeekMath, Eqs. 3-4) as implemented by trl 1.16 ``GRPOTrainer._compute_loss``;
KL estimators: Schulman, "Approximating KL divergence" (2020).

Losses return :class:`LossOutput` with token units (``n_targets`` = masked tokens) except GRPO's
``loss_type='grpo'`` and ``'dr_grpo'``, whose unit is a sequence.
"""

from __future__ import annotations

import torch

from lmwright.objectives.base import LossOutput


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all dims, or along ``dim``); 0 where the mask is empty."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over masked entries; ``shift_mean=False`` adds the mean back (used for
    rewards, where the sign matters). Entries outside the mask are transformed too: callers mask them."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16) on (B, T) token rewards and values.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the
    episode ends at the last masked token (V and A after it are 0); masked-out positions get A = 0.
    Returns (advantages, returns = advantages + values), both detached and zero outside the mask.
    Whiten the advantages with :func:`masked_whiten` if wanted (PPO usually does).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def _token_output(per_token_loss: torch.Tensor, mask: torch.Tensor, metrics: dict[str, torch.Tensor]) -> LossOutput:
    mask = mask.to(per_token_loss.dtype)
    return LossOutput(loss_sum=masked_sum(per_token_loss, mask), n_targets=mask.sum().long(),
                      metrics={k: masked_sum(v.detach().to(mask.dtype), mask) for k, v in metrics.items()})


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None) -> LossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), per token:
    ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high))``, ``rho = exp(logp - logp_old)``.

    ``advantages`` is (B, T) or (B,) (one per sequence, broadcast). Metrics (token sums): ``clipfrac``
    (tokens where the clipped term is the active one), ``approx_kl`` (``0.5 * (logp - logp_old)^2``, as in
    trl's former PPO trainer), ``ratio``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    per_token = torch.max(loss1, loss2)
    return _token_output(per_token, mask, {"clipfrac": (loss2 > loss1).float(),
                                           "approx_kl": 0.5 * log_ratio ** 2, "ratio": ratio})


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float | None = 0.2) -> LossOutput:
    """Clipped value loss, per token: ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``
    (PPO2 baselines / trl's former ``PPOTrainer``). ``clip_range_value=None`` gives ``0.5 * (V - R)^2``.
    Metric ``vf_clipfrac``: tokens where the clipped error is the larger one."""
    err = (values - returns) ** 2
    if clip_range_value is None:
        return _token_output(0.5 * err, mask, {})
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err_clipped = (clipped - returns) ** 2
    return _token_output(0.5 * torch.max(err, err_clipped), mask, {"vf_clipfrac": (err_clipped > err).float()})


KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020):

    - ``k1 = logp - logp_ref`` (unbiased, high variance, can be negative);
    - ``k2 = 0.5 * (logp - logp_ref)^2`` (biased, low variance);
    - ``k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1`` (unbiased, >= 0; used by GRPO, Eq. 4).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        d = ref_logprobs - logprobs
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator '{kind}'; choose one of {', '.join(KL_KINDS)}")


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool | str = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, Sec. 4.1.2): ``(r - mean_group) / (std_group + eps)``.

    ``rewards`` (B,) holds consecutive groups of ``group_size`` completions of the same prompt.
    ``scale_rewards``: ``True`` / ``"group"`` divides by the group std (Bessel-corrected, like trl's
    default), ``"batch"`` by the std of the whole batch, ``False`` / ``"none"`` does not scale (Dr. GRPO).
    Matches trl's ``GRPOTrainer._generate_and_score_completions`` for a single reward function.
    """
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore[call-overload]
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be True/'group', 'batch' or False/'none', got {scale_rewards!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (n_prompts, G)
    adv = (grouped - grouped.mean(1, keepdim=True)).view(-1)  # (B,)
    if mode == "group":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        adv = adv / (std.expand_as(grouped).reshape(-1) + eps)
    elif mode == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        adv = adv / (std + eps)
    return adv


GRPO_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")


def grpo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
              beta: float = 0.0, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              loss_type: str = "dapo", max_completion_length: int | None = None) -> LossOutput:
    """GRPO objective (Shao et al. 2024, Eq. 3): per token
    ``-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3(pi, pi_ref)``.

    ``logprobs``/``old_logprobs``/``ref_logprobs``/``mask`` are (B, T), ``advantages`` (B,) or (B, T).
    ``old_logprobs=None`` means one update per generation: ``rho = exp(logp - logp.detach())`` = 1 with the
    policy-gradient derivative. ``beta=0`` (trl's default) skips the reference model.

    Aggregation (trl ``GRPOConfig.loss_type``), expressed through ``n_targets``:

    - ``dapo`` (trl's default) / ``bnpo``: sum over tokens / number of response tokens. trl's ``dapo``
      divides by the tokens of the whole accumulated batch, ``bnpo`` by the local ones; here the engine
      divides ``loss_sum`` by the tokens of the whole optimizer step, i.e. ``dapo``.
    - ``grpo``: mean over each sequence's tokens, then mean over sequences (unit = sequence).
    - ``dr_grpo``: sum over tokens / (sequences * ``max_completion_length``) (unit = sequence, each
      contributing its token sum / ``max_completion_length``).

    Metrics (sums over the same units): ``kl`` (k3, if beta != 0), ``clip_ratio/low``, ``clip_ratio/high``,
    ``clip_ratio/region`` (as trl: low = rho < 1 - eps with A < 0, high = rho > 1 + eps_high with A > 0).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type '{loss_type}'; choose one of {', '.join(GRPO_LOSS_TYPES)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)
    low = ((ratio < 1 - clip_eps) & (advantages < 0)).float()
    high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
    metrics = {"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": torch.max(low, high)}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = kl
    if loss_type in ("dapo", "bnpo"):
        return _token_output(per_token, mask, metrics)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        denom = mask.sum(-1).clamp(min=1)  # (B,)
    else:
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        denom = torch.full_like(mask[:, 0], float(max_completion_length))
    per_seq = masked_sum(per_token, mask, -1) / denom  # (B,)
    seq_metrics = {k: (masked_sum(v.detach().to(mask.dtype), mask, -1) / mask.sum(-1).clamp(min=1)).sum()
                   for k, v in metrics.items()}
    return LossOutput(loss_sum=per_seq.sum(), n_targets=torch.tensor(per_seq.shape[0], device=per_seq.device),
                      metrics=seq_metrics)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum p log p`` of softmax(logits) over the last dim, in float32. Entries with p = 0 (e.g.
    -inf logits of masked vocabulary) contribute 0, in value and gradient, instead of ``0 * -inf = NaN``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
