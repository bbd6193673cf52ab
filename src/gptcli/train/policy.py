"""The policy-gradient loss of reinforcement learning with verifiable rewards, as pure
functions: GRPO (DeepSeekMath, Shao et al. 2024) and its token-level form from DAPO (Yu et
al. 2025).

A prompt q gets G sampled completions o_1..o_G, scored r_1..r_G. Then, for token t of o_i:

- advantage: A_i = (r_i - mean(r)) / (std(r) + 1e-4), the group's own baseline instead of
  a value model (`scale_rewards` off: r_i - mean(r), as Dr. GRPO argues); std is the
  sample standard deviation, as TRL computes it;
- ratio: ρ = π(o_i,t | q, o_i,<t) / π_old(o_i,t | ...), π_old the policy that sampled the
  completions (ρ = 1, with the same gradient as A·log π, when each batch of rollouts
  trains one step);
- loss: -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) + β·KL, with DAPO's asymmetric clip
  (ε_high > ε_low leaves room for unlikely tokens to grow) and KL the k3 estimator
  π_ref/π - log(π_ref/π) - 1 (GRPO's eq. 4), β = 0 by default (no reference needed);
- aggregation: `grpo` averages each completion's tokens, then the completions (GRPO's eq.
  3: a long completion's tokens weigh less); `dapo` averages all tokens of the step
  together (DAPO's eq. 8, token-level). The averaging itself is the training loop's
  (train/loop.py divides the summed loss by the step's count of `targets`): here each
  token's loss, and per completion its sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

AGGREGATIONS = ("dapo", "grpo")
STD_EPS = 1e-4  # added to a group's reward std (TRL's, and DeepSeekMath's implementation)


@dataclass(frozen=True)
class PolicySettings:
    loss: str = "dapo"  # how token losses are averaged: AGGREGATIONS
    clip_low: float = 0.2  # ε_low: the ratio's floor is 1 - clip_low
    clip_high: float = 0.28  # ε_high: its ceiling is 1 + clip_high
    beta: float = 0.0  # weight of the KL to the reference; 0: no reference
    scale_rewards: bool = True  # divide advantages by the group's reward std


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(P, G) rewards, a row per prompt -> (P, G) advantages: each reward less its group's
    mean, over the group's std (+1e-4) when `scale`. A group of equal rewards gives 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)


class TokenLosses(NamedTuple):
    losses: torch.Tensor  # (K,) each token's loss
    clipped: torch.Tensor  # (K,) bool: the clipped term was taken (no gradient through ρ)
    kl: torch.Tensor | None  # (K,) the k3 estimate of KL(π || π_ref); None without a reference


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                 settings: PolicySettings, ref_logps: torch.Tensor | None = None) -> TokenLosses:
    """Each completion token's loss (module docstring), all arguments (K,): the token's
    log-probability under the policy (with gradient), under the policy that sampled it, its
    completion's advantage, and (β > 0) under the reference."""
    ratio = torch.exp(logps - old_logps)
    low, high = 1 - settings.clip_low, 1 + settings.clip_high
    unclipped, clipped = ratio * advantages, ratio.clamp(low, high) * advantages
    losses = -torch.minimum(unclipped, clipped)
    # The clip binds where ρ left the range in the direction the advantage pushes it.
    was_clipped = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
    kl = None
    if settings.beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        log_ratio = ref_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        losses = losses + settings.beta * kl
    return TokenLosses(losses, was_clipped, kl)
