"""The KV cache: the keys and values of positions already seen, kept for generation.

Preallocated buffers of fixed shape, written at the positions given as a tensor
(`input_pos`), as in gpt-fast. A layer attends over every slot of the cache it is given,
with a mask that hides the slots its tokens may not see (not yet written, or left from an
earlier window), so a decode step's shapes do not depend on the position and it can be
compiled once. The model holds no cache: whoever generates owns one, and several caches
can share one model.

Positions are shared by the batch, `input_pos` (T,), when every row holds the same
sequence length (`sample`); or one row each, (B, T), when rows are independent requests
at their own positions (the server's continuous batching, infer/engine.py).

Shapes: B batch, nh heads, L cache length (slots), hs head size, T new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for one batch of sequences, in the model's dtype
    (writes are not cast). One tensor per layer, not one stacked tensor, so a layer finds
    its own without an indexing op on every step."""

    k: tuple[torch.Tensor, ...]  # per layer (B, nh, L, hs)
    v: tuple[torch.Tensor, ...]  # per layer (B, nh, L, hs)

    @classmethod
    def empty(cls, n_layer: int, batch_size: int, n_head: int, length: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> KVCache:
        def zeros() -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(batch_size, n_head, length, head_dim, dtype=dtype, device=device)
                         for _ in range(n_layer))

        return cls(zeros(), zeros())

    @property
    def length(self) -> int:
        return self.k[0].size(2)

    def prefix(self, length: int) -> KVCache:
        """The first `length` slots, sharing this cache's memory: writes land in both, and
        attention over it reads only those slots."""
        return KVCache(tuple(t[:, :, :length] for t in self.k), tuple(t[:, :, :length] for t in self.v))

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 (sequences of the batch), sharing this cache's memory."""
        return KVCache(tuple(t[start:stop] for t in self.k), tuple(t[start:stop] for t in self.v))

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` slots of row `source` into row `target` (every layer)."""
        for t in (*self.k, *self.v):
            t[target, :, :length] = t[source, :, :length]

    def visible(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Additive attention mask for tokens at `input_pos`: 0 on the slots up to and
        including each one's own, -inf after; (T, L) for shared positions (T,), (B, 1, T, L)
        for per-row positions (B, T). In the cache's dtype: SDPA would turn a boolean mask
        into this in every layer."""
        hidden = torch.arange(self.length, device=input_pos.device) > input_pos[..., None]
        if input_pos.dim() == 2:
            hidden = hidden[:, None]  # one mask per row, shared by its heads
        return torch.zeros(hidden.shape, dtype=self.k[0].dtype, device=hidden.device).masked_fill(hidden, float("-inf"))

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) of `layer` at slots `input_pos`, (T,) or per row (B, T);
        return all of that layer's keys and values, (B, nh, L, hs) each."""
        keys, values = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
        else:  # row b's tokens go to its own slots: indexing [rows, :, slots] is (B, T, nh, hs)
            rows = torch.arange(k.size(0), device=k.device)[:, None]
            keys[rows, :, input_pos] = k.transpose(1, 2)
            values[rows, :, input_pos] = v.transpose(1, 2)
        return keys, values
