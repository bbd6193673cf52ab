"""Preference losses over pairs of answers to one prompt, one chosen and one rejected, as
pure functions of the sequences' log-probabilities (the sums over each answer's tokens):

- sigmoid (DPO, Rafailov et al. 2023): -log σ(β·[(π_c - ref_c) - (π_r - ref_r)]), with
  label smoothing ε mixing in the loss of the flipped pair (cDPO): (1-ε)·that + ε·(-log σ(-x));
- ipo (Azar et al. 2023): ((π_c - ref_c) - (π_r - ref_r) - 1/(2β))², on log-probabilities
  averaged over each answer's tokens (as TRL computes it);
- simpo (Meng et al. 2024), reference-free: -log σ(β·(π̄_c - π̄_r) - γ) with π̄ the
  log-probability averaged over the answer's tokens, and the same label smoothing.

Any of them may add RPO's term (Pang et al. 2024; TRL's `rpo_alpha`): α times the chosen
answer's negative log-likelihood per token, which keeps the chosen answers likely while
the margin grows (DPO alone lowers both, the rejected faster).

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
    rpo_alpha: float = 0.0  # weight of the chosen answer's NLL per token (RPO); 0: off

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


@dataclass
class PairLosses:
    losses: torch.Tensor  # (P,) one per pair
    chosen_rewards: torch.Tensor  # (P,)
    rejected_rewards: torch.Tensor  # (P,)


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
        return PairLosses(losses + _nll(chosen, chosen_tokens, settings), beta * chosen_avg.detach(),
                          beta * rejected_avg.detach())
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if settings.loss == "ipo":
        margin = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        x = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    return PairLosses(losses + _nll(chosen, chosen_tokens, settings), beta * chosen_ratio.detach(),
                      beta * rejected_ratio.detach())


def _nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor, settings: PreferenceSettings) -> torch.Tensor | float:
    """RPO's term: rpo_alpha times the chosen answer's negative log-likelihood per token (P,)."""
    return -settings.rpo_alpha * chosen / chosen_tokens if settings.rpo_alpha else 0.0
