"""A trained model rewritten for generation: weights in the dtype asked for and, on CPU, in
the layout that one-token decode steps read fastest.

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the
weights stream from memory. On the CPU, a row vector times a weight stored (in, out)
(GPT-2's original Conv1D layout) streams at about 11.6 GB/s, the same weight stored
(out, in) as nn.Linear keeps it at 9.2 GB/s (2 cores, AMD EPYC; BENCHMARKS.md). So for
sampling on CPU each linear layer keeps a transposed, contiguous copy and computes
`addmm(bias, x, weight_t)`. CUDA's matrix libraries read both layouts equally well, so
there the model stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from gptcli.infer.quantize import quantize_model, swap_linears
from gptcli.model import Model


class InferenceLinear(nn.Module):
    """y = x W^T + b with W kept transposed: `weight_t` is (in, out), contiguous."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (B*T, in)
        y = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


def for_generation(model: Model, dtype: torch.dtype = torch.float32, quantize: str = "none") -> Model:
    """Cast `model` (in eval mode, adapters merged) to `dtype` and, on CPU, give every linear
    layer the decode-friendly layout, found by walking the modules (any model family); with
    `quantize` int8, store every linear layer as int8 instead (infer/quantize.py), quantized
    from the weights before the cast. The model is changed in place and is for inference
    only afterwards (no training, no saving). A head tied to the token embedding gets its
    own transposed (or int8) copy; the embedding lookup keeps using the original."""
    quantize_model(model, quantize)
    model.to(dtype)  # int8 weights stay int8; their scales take `dtype`
    if next(model.parameters()).device.type != "cpu":
        return model
    return swap_linears(model, InferenceLinear)  # what quantize left as nn.Linear: nothing, or all
