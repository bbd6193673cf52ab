"""Causal self-attention: `scaled_dot_product_attention`, except where a faster path was measured.

The exception is training on CPU in bf16 at short contexts. There the CPU flash kernel's
backward pass is slow (at 8 x 6 heads x 256 x 64 its backward took 3x its forward), while
batched matrix products in bf16 run near the machine's matmul peak. So the explicit path
computes the (T, T) scores with `baddbmm`, takes a softmax and multiplies by the values,
and autograd differentiates those three ops. Measured fwd+bwd per layer on a 2-core EPYC
(benchmarks/bench_attention.py, BENCHMARKS.md): 4.5x faster at T=64, 1.6x at T=256, 1.1x
at T=512, but 0.7x at T=1024, where one head's scores (2 MB in bf16) no longer fit in
the cache. In fp32 the explicit path is 0.8x from T=256, so fp32 stays on SDPA.

Precision: the scores leave `baddbmm` rounded to bf16 (CPU has no bf16 product with an fp32
output), as in eager attention implementations under bf16 autocast; flash kernels keep
them in fp32. With unit-scale scores both land within about 0.5% of an fp64 reference;
with sharp attention (scores of std 16) the explicit path is about 1% off where SDPA is 0.1%
(tests/test_attention.py pins both).

Shapes: B batch, nh heads, T time, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPLICIT_MAX_CONTEXT = 512  # longest context at which the explicit path measured faster


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Each position attends to itself and every earlier one. q, k, v: (B, nh, T, hs), the
    same T; returns (B, nh, T, hs)."""
    if use_explicit_attention(q):
        return explicit_causal_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def use_explicit_attention(q: torch.Tensor) -> bool:
    """The measured win: a CPU bf16 pass that will be differentiated, T <= 512. A forward
    pass alone gains less (1.07x and 1.5x at T=256 in two sweeps) and loses from T=512, so
    eval and sampling keep SDPA and its fp32 scores."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and q.requires_grad and q.size(-2) <= EXPLICIT_MAX_CONTEXT)


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v as three differentiable ops. The scale is
    applied inside the product's fp32 accumulator (baddbmm's alpha), not to q in bf16;
    the probabilities go to the second product in q's dtype, as flash kernels feed them."""
    B, nh, T, hs = q.shape
    # 0 on and below the diagonal, -inf above it: a later key gets zero probability.
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(mask, q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs).transpose(1, 2),
                           alpha=hs ** -0.5)  # (B*nh, T, T)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(B * nh, T, hs)).view(B, nh, T, hs)
