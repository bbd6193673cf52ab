"""The decode step compiled: `torch.compile` of generate.decode_one_token for one shape.

A decode step writes one token per row into a preallocated KV cache at a position given as a
tensor, so with the whole cache passed (never a prefix that grows) and a fixed batch its
shapes never change: it compiles once (`dynamic=False`, `fullgraph=True`: a graph break
would fall back to Python for part of every step) and is reused for every token, and
Inductor's on-disk cache makes the next process's compile quick. Prefill runs eagerly
(its length changes with every prompt).

On CUDA the mode is "reduce-overhead": the step is captured as a CUDA graph and replayed,
one launch instead of one per kernel, which at batch 1 is most of the time a small model's
step takes. Elsewhere the mode is "default" (the same code path minus CUDA graphs; what the
tests compare with eager on CPU).

If compiling fails (no C++ compiler for Inductor's CPU code, an unsupported op), the step
runs eagerly from then on and `fallback` says why; generation goes on either way.
"""

from __future__ import annotations

import logging

import torch

from gptcli.infer.generate import decode_one_token
from gptcli.model import Model
from gptcli.model.kv_cache import KVCache

log = logging.getLogger(__name__)


def wants_compiled_decode(choice: str, device: torch.device) -> bool:
    """`--compile` auto: on for CUDA (CUDA graphs remove the launch overhead that dominates
    small-batch decode); off on CPU, where it measured no faster for a typical request once
    compile time counts (BENCHMARKS.md, "Compiled decode")."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


class CompiledDecode:
    """Callable as decode_one_token(model, cache, token, input_pos) -> logits (B, V)."""

    def __init__(self, cuda_graphs: bool):
        self.cuda_graphs = cuda_graphs
        self.fallback: str | None = None  # why the step runs eagerly, once it does
        self._step = torch.compile(decode_one_token, mode="reduce-overhead" if cuda_graphs else "default",
                                   fullgraph=True, dynamic=False)

    def __call__(self, model: Model, cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.fallback is None:
            try:
                if self.cuda_graphs:
                    # The graph's outputs are overwritten by its next replay: the caller has
                    # used the last logits (sampled from them) before asking for new ones.
                    torch.compiler.cudagraph_mark_step_begin()
                return self._step(model, cache, token, input_pos)
            except Exception as exc:  # noqa: BLE001 - any failure to compile means: run eagerly
                self.fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                log.warning("compiled decode failed (%s); decoding eagerly", self.fallback)
        return decode_one_token(model, cache, token, input_pos)
