"""Our losses against trl 1.16 on the same tensors.

trl computes most losses inside trainer methods that also run the model. We call those methods unbound
with a minimal stub ``self`` (a SimpleNamespace holding only the attributes the method reads) and a
fake model whose per-token log-probs are built so that they sum to the sequence log-probs we want.
Only GRPO's group-normalised advantages (inline in ``GRPOTrainer._generate_and_score_completions``)
are reproduced line by line instead. trl has no PPO trainer any more, so PPO has no reference here.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.gkd import GKDTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import nanstd

from lmwright.objectives.distill import distill_loss
from lmwright.objectives.preference import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss
from lmwright.objectives.reward import pairwise_reward_loss
from lmwright.objectives.rl import grpo_advantages, grpo_loss

CPU = torch.device("cpu")


def accelerator() -> SimpleNamespace:
    ident = lambda x, **_: x
    return SimpleNamespace(device=CPU, gather=ident, gather_for_metrics=ident, reduce=ident, num_processes=1)


def trainer_stub(**attrs) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attrs)


def fake_batch(seq_logps: torch.Tensor, lengths: list[int]) -> tuple[dict, torch.Tensor]:
    """input_ids / completion_mask of width 1 + max(lengths) (one prompt token, then the completion) and the
    (B, T-1) shifted per-token log-probs that a fused LM head would return: each completion token carries
    ``logp / length``, so the row sums to ``logp``."""
    B, width = len(lengths), 1 + max(lengths)
    completion_mask = torch.zeros(B, width, dtype=torch.long)
    per_token = torch.zeros(B, width - 1, dtype=seq_logps.dtype)
    for i, n in enumerate(lengths):
        completion_mask[i, 1:1 + n] = 1
        per_token[i, :n] = seq_logps[i] / n
    batch = {"input_ids": torch.ones(B, width, dtype=torch.long), "attention_mask": torch.ones(B, width),
             "completion_mask": completion_mask}
    return batch, per_token


def fused_outputs(per_token: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(per_token)
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


PC = torch.tensor([-4.0, -7.5, -3.0, -12.0], dtype=torch.float64)
PR = torch.tensor([-5.0, -6.0, -3.0, -20.0], dtype=torch.float64)
RC = torch.tensor([-4.5, -7.0, -3.0, -11.0], dtype=torch.float64)
RR = torch.tensor([-4.5, -6.5, -3.0, -19.0], dtype=torch.float64)
LC, LR = [2, 5, 3, 4], [3, 1, 3, 6]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_matches_trl(loss_type):
    batch, per_token = fake_batch(torch.cat([PC, PR]), LC + LR)  # trl's batch is [chosen..., rejected...]
    batch.update(ref_chosen_logps=RC, ref_rejected_logps=RR)
    stub = trainer_stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                        loss_types=[loss_type], loss_weights=[1.0], beta=0.3, label_smoothing=0.2,
                        use_weighting=False)
    expected = DPOTrainer._compute_loss(stub, lambda **kw: fused_outputs(per_token), batch, return_outputs=False)
    ours = dpo_loss(PC, PR, RC, RR, beta=0.3, loss_type=loss_type, label_smoothing=0.2,
                    chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))
    n = ours.n_targets
    assert (ours.loss_sum / n).item() == pytest.approx(expected.item(), rel=1e-10)
    m = stub._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert (ours.metrics[key] / n).item() == pytest.approx(m[key][-1], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.25), ("simpo", 0.0), ("simpo", 0.1)])
def test_label_smoothed_dpo_and_simpo_match_trl_cpo(loss_type, smoothing):
    """trl 1.16's DPO 'sigmoid' dropped label smoothing; CPO's reference-free 'sigmoid' keeps the cDPO form,
    so feeding it the log-ratios gives label-smoothed DPO. Its 'simpo' is SimPO on average log-probs."""
    stub = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=0.3, simpo_gamma=0.4, label_smoothing=smoothing,
                           accelerator=accelerator())
    if loss_type == "sigmoid":
        expected, *_ = CPOTrainer.cpo_loss(stub, PC - RC, PR - RR)
        ours = dpo_loss(PC, PR, RC, RR, beta=0.3, loss_type="label_smoothed", label_smoothing=smoothing)
    else:
        avg_c, avg_r = PC / torch.tensor(LC), PR / torch.tensor(LR)
        expected, *_ = CPOTrainer.cpo_loss(stub, avg_c, avg_r)
        ours = simpo_loss(avg_c, avg_r, beta=0.3, gamma=0.4, label_smoothing=smoothing)
    assert ours.loss_sum.item() == pytest.approx(expected.sum().item(), rel=1e-10)


def test_orpo_matches_trl():
    avg_c = torch.tensor([-0.2, -1.5, -1e-4, -3.0])
    avg_r = torch.tensor([-0.9, -1.0, -2.0, -3.0])
    nll = torch.tensor(1.37)
    stub = SimpleNamespace(beta=0.25, accelerator=accelerator())
    losses, chosen_rewards, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, avg_c, avg_r)
    expected = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    ours = orpo_loss(nll, avg_c, avg_r, beta=0.25)
    assert (ours.loss_sum / 4).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (ours.metrics["log_odds_ratio"] / 4).item() == pytest.approx(ratio.item(), rel=1e-6)
    assert (ours.metrics["log_odds_chosen"] / 4).item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert (ours.metrics["rewards/chosen"] / 4).item() == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)


@pytest.mark.parametrize("kl_shift", [0.7, -0.7])  # a negative KL estimate is clamped to 0 by both
def test_kto_matches_trl(kl_shift):
    logps = torch.tensor([-4.0, -7.5, -3.0, -12.0, -6.0], dtype=torch.float64)
    ref = torch.tensor([-4.5, -7.0, -3.5, -11.0, -6.0], dtype=torch.float64)
    label = torch.tensor([True, False, True, False, False])
    kl_logps = torch.tensor([-9.0, -8.0, -10.0, -7.0, -9.5], dtype=torch.float64)
    ref_kl = kl_logps - kl_shift
    batch, per_token = fake_batch(logps, [1] * 5)  # width 2
    kl_batch, kl_per_token = fake_batch(kl_logps, [2] * 5)  # width 3 tells the fake model which one it is
    batch.update(label=label, ref_logps=ref, ref_KL_logps=ref_kl, KL_input_ids=kl_batch["input_ids"],
                 KL_attention_mask=kl_batch["attention_mask"], KL_completion_mask=kl_batch["completion_mask"])

    def model(input_ids, **_):
        return fused_outputs(kl_per_token if input_ids.shape[1] == 3 else per_token)

    stub = trainer_stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2,
                        desirable_weight=1.3, undesirable_weight=0.8)
    stub._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, stub)
    expected = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    z0 = kto_kl_estimate(kl_logps, ref_kl)
    ours = kto_loss(logps, ref, label, z0, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    assert (ours.loss_sum / ours.n_targets).item() == pytest.approx(expected.item(), rel=1e-10)
    m = stub._metrics["train"]
    assert z0.item() == pytest.approx(m["kl"][-1])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours.means[key].item() == pytest.approx(m[key][-1], rel=1e-6), key


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_matches_trl(with_margin):
    rewards = torch.tensor([[1.5], [-0.3], [0.2], [0.9], [0.4], [0.2]])  # (2B, 1): chosen then rejected
    inputs = {"input_ids": torch.ones(6, 2, dtype=torch.long), "attention_mask": torch.ones(6, 2)}
    margin = torch.tensor([0.5, 0.0, 1.0])
    if with_margin:
        inputs["margin"] = margin
    stub = trainer_stub(args=SimpleNamespace(center_rewards_coefficient=0.01))
    expected = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=rewards), inputs)
    ours = pairwise_reward_loss(rewards[:3], rewards[3:], margin if with_margin else None,
                                center_rewards_coefficient=0.01)
    assert (ours.loss_sum / 3).item() == pytest.approx(expected.item(), rel=1e-6)
    m = stub._metrics["train"]
    assert (ours.metrics["accuracy"] / 3).item() == pytest.approx(m["accuracy"][-1])
    assert (ours.metrics["margin"] / 3).item() == pytest.approx(m["margin"][-1], rel=1e-6)


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.3, 2.0)])
def test_gkd_jsd_matches_trl(beta, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    labels[1, 4] = -100
    # GKDTrainer.compute_loss shifts, then calls generalized_jsd_loss (reduction batchmean = mean over tokens)
    expected = GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=beta,
                                               temperature=temperature)
    ours = distill_loss(student, teacher, labels, kind="jsd", beta=beta, temperature=temperature,
                        scale_by_t2=False)
    assert (ours.loss_sum / ours.n_targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_grpo_advantages_match_trl_formula():
    """Line by line from trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions
    (multi_objective_aggregation='sum_then_normalize', one reward function)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 3.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    G = 4
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    for scale in ("group", "batch", "none"):
        if scale in ("group", "none"):
            std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale != "none":
            advantages = advantages / (std_rewards + 1e-4)
        assert torch.allclose(grpo_advantages(rewards, G, scale), advantages, atol=1e-6), scale


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    torch.manual_seed(1)
    B, T = 4, 6
    old = -torch.rand(B, T) * 3
    logp_ours = (old + 0.4 * torch.randn(B, T)).requires_grad_()  # ratios beyond 1 +- eps: clipping is active
    logp_trl = logp_ours.detach().clone().requires_grad_()
    ref = old + 0.2 * torch.randn(B, T)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5])
    inputs = {"prompt_ids": torch.ones(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    stub = trainer_stub(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
                        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
                        max_completion_length=8,
                        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logp_trl, torch.zeros(B, T), None)
    expected = GRPOTrainer._compute_loss(stub, None, inputs)
    ours = grpo_loss(logp_ours, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=beta, clip_eps=0.2,
                     clip_eps_high=0.28, loss_type=loss_type, max_completion_length=8)
    mean = ours.loss_sum / ours.n_targets
    assert mean.item() == pytest.approx(expected.item(), rel=1e-5)
    mean.backward()
    expected.backward()
    assert torch.allclose(logp_ours.grad, logp_trl.grad, atol=1e-7)
    if loss_type in ("dapo", "bnpo"):  # token units: our metric means are trl's global masked means
        m = stub._metrics["train"]
        for ours_key, trl_key in [("clip_ratio/low", "clip_ratio/low_mean"), ("clip_ratio/high", "clip_ratio/high_mean"),
                                  ("clip_ratio/region", "clip_ratio/region_mean")] + ([("kl", "kl")] if beta else []):
            assert (ours.metrics[ours_key] / ours.n_targets).item() == pytest.approx(m[trl_key][-1], rel=1e-5)
