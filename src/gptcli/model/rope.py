"""Rotary position embeddings (RoPE, Su et al. 2021).

Each head's query and key vectors are rotated by an angle proportional to their position,
pair of dimensions by pair, at frequencies theta^(-2i/hs). The score q·k then depends on
the two positions only through their difference: attention sees relative positions, and
there are no position weights to learn or to outgrow.

The layout is Hugging Face's Llama one ("rotate half"): dimension i pairs with i + hs/2,
not with its neighbour, so weights move to and from transformers without a permutation.
Angles are computed in fp32 from the positions on every call (a (T, hs/2) outer product):
no table to keep, cast by `.to(dtype)` or outgrown by a longer context.

Shapes: B batch, nh heads, T time, hs head size.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """The cos and sin tables of a set of positions; holds no weights (nothing is saved)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) in `dtype` for integer positions: (T, hs) each for positions (T,)
        shared by the batch, (B, 1, T, hs) for per-row positions (B, T)."""
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.int64).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # (hs/2,)
        angles = positions.float()[..., None] * inv_freq  # (..., T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., T, hs): dimension i and i + hs/2 share an angle
        if positions.dim() == 2:
            angles = angles[:, None]  # broadcast over each row's heads
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated by the angles of its T positions, in x's dtype (the model
    makes the tables in its compute dtype once per pass; q and k must keep theirs for the
    attention kernel)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)  # (x1, x2) -> (-x2, x1) per pair
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)
