"""Preference losses over pairs of answers to one prompt, one chosen and one rejected, as
pure functions of the sequences' log-probabilities (the sums over each answer's tokens):

- sigmoid (DPO, Rafailov et al. 2023): -log σ(β·[(π_c - ref_c) - (π_r - ref_r)]), with
  label smoothing ε mixing in the loss of the flipped pair (cDPO): (1-ε)·that + ε·(-log σ(-x));
- ipo (Azar et al. 2023): ((π_c - ref_c) - (π_r - ref_r) - 1/(2β))², on log-probabilities
  averaged over each answer's tokens (as TRL computes it);
- simpo (Meng et al. 2024), reference-free: -log σ(β·(π̄_c - π̄_r) - γ) with π̄ the
  log-probability averaged over the answer's tokens, and the same label smoothing.

Rewards are what the loss compares, named as TRL logs them: `rewards/chosen` is β·(π_c -
ref_c) (simpo: β·π̄_c), `rewards/margins` chosen minus rejected, `rewards/accuracies` the
share of pairs whose chosen reward is the larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass(frozen=True)
class PreferenceSettings:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid and simpo: the chance a pair's labels are flipped
    gamma: float = 0.5  # simpo: the target reward margin

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


@dataclass
class PairLosses:
    losses: torch.Tensor  # (P,) one per pair
    chosen_rewards: torch.Tensor  # (P,)
    rejected_rewards: torch.Tensor  # (P,)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over the positions whose label is not `ignore_index`,
    and how many there are. `logits` (N, T, V) predict `labels` (N, T) at the same position;
    the log-softmax is taken in fp32."""
    mask = labels != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (picked * mask).sum(-1), mask.sum(-1)


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, settings: PreferenceSettings,
                ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None) -> PairLosses:
    """The loss and rewards of each pair from its sequences' summed log-probabilities (P,)
    and token counts (P,); the reference's are needed except for simpo."""
    beta, eps = settings.beta, settings.label_smoothing
    if settings.loss == "simpo":
        chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
        x = beta * (chosen_avg - rejected_avg) - settings.gamma
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
        return PairLosses(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if settings.loss == "ipo":
        margin = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        x = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
