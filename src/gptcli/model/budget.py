"""Memory a batch will take, estimated from the model's shape before anything is allocated,
and the one-line refusal when it cannot fit: for the counts that size allocations (samples
generated together, the server's rows, eval batches) what runtime.check_memory is for model
sizes.

Each estimate adds up the tensors that dominate, with the shapes gpt.py and kv_cache.py
give them (the formulas are at each function). Python objects, allocator slack and small
tensors are not counted, so a batch that passes may still not fit; one that fails cannot.
The counts callers check scale these tensors linearly, so a count a thousand times too
large is refused by a wide margin, while the defaults (1 sample, 16 served rows, eval
batches of 8) pass wherever the model itself fits with some room to spare.

Shapes: R rows (sequences), T new tokens per row in one pass, L positions attended (cache
slots), C width, V padded vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptcli import runtime
from gptcli.errors import GptcliError
from gptcli.model.gpt import loss_chunk_rows

# Bytes per logit while a row is sampled (generate.logits_to_probs with top-k and top-p, at
# its peak): the fp32 logits (4) and probabilities (4), the sorted probabilities (4) and
# their int64 order (8), the cumulative sums and their difference (8), the drop mask (1),
# the scattered result (4): 33, rounded up for the temporaries between them. The model's
# own logits (its dtype) come on top.
SAMPLING_BYTES_PER_LOGIT = 36
FP32 = 4


@dataclass(frozen=True)
class Sizes:
    """What the estimates need of a model: its shape and the bytes of one activation."""

    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int
    mlp_hidden: int
    gates: int  # up-projections in the MLP: 2 for SwiGLU, else 1
    vocab_rows: int  # the head's output width (the padded vocabulary; sliced after the product)
    elem: int  # bytes per activation: the widest floating dtype among the weights

    @classmethod
    def of(cls, model: torch.nn.Module) -> Sizes:
        widest = max((p.element_size() for p in model.parameters() if p.is_floating_point()), default=FP32)
        return cls.of_config(model.config, widest)

    @classmethod
    def of_config(cls, cfg, elem: int = FP32) -> Sizes:
        """From a model config (ModelConfig) alone, without building the model."""
        cfg = cfg.resolved()
        return cls(cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd, cfg.mlp_hidden,
                   2 if cfg.mlp == "swiglu" else 1, cfg.padded_vocab_size, elem)


def kv_cache_bytes(sizes: Sizes, rows: int, slots: int) -> int:
    """KVCache.empty: keys and values of every layer, each (R, n_kv_head, L, head_dim):
    2 * n_layer * R * n_kv_head * L * head_dim * elem."""
    return 2 * sizes.n_layer * rows * sizes.n_kv_head * slots * sizes.head_dim * sizes.elem


def pass_bytes(sizes: Sizes, rows: int, tokens: int, attended: int, masked: bool) -> int:
    """One forward pass without gradients of `tokens` new tokens in each of `rows` rows,
    attending over `attended` positions. Blocks run one after another and nothing of an
    earlier block is kept, so the peak is one block's working set:

    - per token: the residual stream and its norm (2C), queries, keys and values
      (n_head + 2 n_kv_head) * head_dim, attention's output and projection
      (n_head * head_dim + C), the MLP's up-projection(s) and activation
      ((gates + 1) * mlp_hidden): times R * T * elem;
    - keys and values widened to every query head under grouped-query attention
      (2 * R * n_head * L * head_dim * elem);
    - with a mask (generation: `masked`), the scores SDPA's math kernel materialises,
      R * n_head * T * L in fp32. Without one (a causal pass) the flash kernels keep none.
    """
    q_width, kv_width = sizes.n_head * sizes.head_dim, sizes.n_kv_head * sizes.head_dim
    per_token = (2 * sizes.n_embd + q_width + 2 * kv_width + q_width + sizes.n_embd
                 + (sizes.gates + 1) * sizes.mlp_hidden)
    total = rows * tokens * per_token * sizes.elem
    if sizes.n_kv_head != sizes.n_head:
        total += 2 * rows * q_width * attended * sizes.elem
    if masked:
        total += rows * sizes.n_head * tokens * attended * FP32
    return total


def logit_bytes(sizes: Sizes, rows: int, extra_per_logit: int) -> int:
    """`rows` rows of logits in the model's dtype, plus `extra_per_logit` bytes of working
    copies per logit (SAMPLING_BYTES_PER_LOGIT to sample; fp32 log-probabilities to score)."""
    return rows * sizes.vocab_rows * (sizes.elem + extra_per_logit)


def scoring_bytes_per_logit(sizes: Sizes) -> int:
    """Working bytes per logit of a log-softmax or cross-entropy in fp32: an fp32 copy
    (none when the logits already are fp32) and the log-probabilities."""
    return (FP32 if sizes.elem != FP32 else 0) + FP32


def loss_bytes(sizes: Sizes, rows: int) -> int:
    """The summed loss of `rows` positions (GPT.loss): one chunk of logits at a time,
    at most loss_chunk_rows of them, scored in fp32."""
    chunk = min(rows, loss_chunk_rows(sizes.vocab_rows))
    return logit_bytes(sizes, chunk, scoring_bytes_per_logit(sizes))


def check_batch_fits(option: str, count: int, bytes_for: Callable[[int], int], what: str, fix: str,
                     device: torch.device) -> None:
    """Refuse a batch of `count` (set by `option`, as the user typed it) whose estimated
    bytes, `bytes_for(count)`, exceed the memory `device` has free, before it is allocated:
    one line with both numbers, `fix`, and the largest count that would fit. `bytes_for`
    must grow with the count. Memory that cannot be found out is not checked."""
    available = usable_memory(device)
    needed = bytes_for(count)
    if available is None or needed <= available:
        return
    fits = _largest_fitting(bytes_for, count, available)
    room = f"at most about {fits:,} fit" if fits else "not even 1 fits: free memory or use a smaller model"
    raise GptcliError(f"{option}: {what} need about {runtime.human_bytes(needed)}; "
                      f"{_where(device, available)}; {fix} ({room})")


def usable_memory(device: torch.device) -> int | None:
    """Bytes a new batch can take: what runtime.available_memory finds free, plus, on CUDA,
    the blocks torch's caching allocator holds but no tensor uses (freed by an earlier
    batch, reused before the driver is asked for more)."""
    available = runtime.available_memory(device)
    if available is not None and device.type == "cuda":
        available += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available


def _where(device: torch.device, available: int) -> str:
    if device.type == "cuda":
        return f"{device} has {runtime.human_bytes(available)} free"
    return f"this machine has {runtime.human_bytes(available)} available"


def _largest_fitting(bytes_for: Callable[[int], int], count: int, available: int) -> int:
    """The largest n in 0..count-1 with bytes_for(n) <= available (bisection: the estimate
    grows with n), 0 when not even 1 fits."""
    low, high = 0, count - 1
    while low < high:
        middle = (low + high + 1) // 2
        if bytes_for(middle) <= available:
            low = middle
        else:
            high = middle - 1
    return low
