"""The KV cache: the keys and values of positions already seen, kept for generation.

Preallocated buffers of fixed shape, written at the positions given as a tensor
(`input_pos`), as in gpt-fast. Every layer attends over the whole buffer through a mask
that hides the slots not yet written (or left over from an earlier window), so a decode
step has the same shapes at every position and can be compiled once. The model holds no
cache: whoever generates owns one, and several caches can share one model.

Shapes: n_layer layers, B batch, nh heads, L cache length (slots), hs head size, T new tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for one batch of sequences: (n_layer, B, nh, L, hs) each."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, batch_size, n_head, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def length(self) -> int:
        return self.k.size(3)

    def visible(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(T, L) attention mask for tokens at positions `input_pos` (T,): each sees the slots
        up to and including its own; later ones hold nothing of this sequence yet."""
        slots = torch.arange(self.length, device=input_pos.device)
        return slots <= input_pos[:, None]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) of `layer` at slots `input_pos` (T,); return all of that
        layer's keys and values, (B, nh, L, hs) each."""
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, input_pos, k.to(keys.dtype))
        values.index_copy_(2, input_pos, v.to(values.dtype))
        return keys, values
