"""The policy-gradient loss against the papers' formulas worked by hand: GRPO's group-
normalised advantages and k3 KL (DeepSeekMath, eqs. 3-4), the clipped surrogate with DAPO's
asymmetric clip (DAPO, eq. 8), and its gradient."""

import math

import pytest
import torch

from gptcli.train.policy import PolicySettings, group_advantages, token_losses


def test_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    advantages = group_advantages(rewards)
    std = math.sqrt((4 * 0.25) / 3)  # the sample std of 1, 0, 0, 1
    a = 0.5 / (std + 1e-4)
    assert advantages[0].tolist() == pytest.approx([a, -a, -a, a])
    assert advantages[1].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing
    std = math.sqrt(2 / 3)  # 3, 1, 2, 2 around 2
    assert advantages[2].tolist() == pytest.approx([1 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 0.0])
    assert group_advantages(rewards, scale=False)[2].tolist() == [1.0, -1.0, 0.0, 0.0]


def test_one_step_per_rollout_is_the_plain_policy_gradient():
    """ρ = 1 when the policy is the one that sampled: the loss is -A per token and its
    gradient with respect to the log-probability -A."""
    logps = torch.tensor([-1.2, -0.3, -2.0], requires_grad=True)
    advantages = torch.tensor([0.7, 0.7, -1.5])
    out = token_losses(logps, logps.detach(), advantages, PolicySettings())
    assert out.losses.tolist() == pytest.approx([-0.7, -0.7, 1.5])
    out.losses.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.7, -0.7, 1.5])
    assert not out.clipped.any() and out.kl is None


def test_the_clip_is_asymmetric_and_binds_only_where_the_advantage_pushes():
    settings = PolicySettings(clip_low=0.2, clip_high=0.28)
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0])
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0])
    logps = (old + ratios.log()).requires_grad_(True)
    out = token_losses(logps, old, advantages, settings)
    # -min(ρA, clip(ρ, 0.8, 1.28)A), worked by hand
    expected = [-1.28 * 2, 1.5 * 2, -0.5 * 2, 0.8 * 2, -1.1 * 2]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.clipped.tolist() == [True, False, False, True, False]
    out.losses.sum().backward()
    # d(-ρA)/d log π = -ρA where the unclipped term is taken, 0 where the clip binds
    assert logps.grad.tolist() == pytest.approx([0.0, 1.5 * 2, -0.5 * 2, 0.0, -1.1 * 2])


def test_kl_is_the_k3_estimator_weighted_by_beta():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    out = token_losses(logps, logps, torch.zeros(2), PolicySettings(beta=0.04), ref)
    by_hand = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # π_ref/π - log(π_ref/π) - 1
    assert out.kl.tolist() == pytest.approx(by_hand)
    assert out.losses.tolist() == pytest.approx([0.04 * k for k in by_hand])
    with pytest.raises(ValueError):
        token_losses(logps, logps, torch.zeros(2), PolicySettings(beta=0.04))
