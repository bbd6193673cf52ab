"""Weight-only int8 quantization for generation: every linear layer's weight stored as int8
with one scale per output channel; embeddings, norms and attention stay in the model's dtype.

A decode step at batch 1 is bound by how fast the weights stream from memory, so weights
of 1 byte instead of 4 (fp32) or 2 (bf16) make it faster, as long as the matrix product
reads them as int8. On CPU that product is `torch._weight_int8pack_mm(x, q, scales)`:
x (M, K) with a contiguous last dimension, q int8 (N, K) as nn.Linear lays out its weight,
scales (N,) in x's dtype; it returns x (s q)^T in x's dtype. Its bf16 and fp16 paths are
vectorized; its fp32 path is a plain loop (at one row 6x slower than an fp32 dense
product), so fp32 activations go through it as bf16. It makes one pass over the weight per
row of x, so past KERNEL_MAX_ROWS rows (prefill of a long prompt, evaluation) the weight is
dequantized and multiplied densely instead. That is also the path on other devices
(gpt-fast's form, which torch.compile fuses into one kernel; eager on a GPU it saves
memory, not time; torch's own CUDA `_weight_int8pack_mm` is a one-thread-per-output fp32
loop). The CUDA path is untested: no GPU was at hand.

Symmetric per channel: s_j = max_k |W_jk| / 127 and q_jk = round(W_jk / s_j), so each
weight is off by at most s_j / 2 and an output y_j by at most ||x||_1 s_j / 2.

int4 (`_weight_int4pack_mm_for_cpu`, group-wise scales and zeros) is left out: at batch 1
its linear layers took 5-14% less time than int8's (mid and 124M shapes), while the demo
checkpoint's validation loss rose 0.5% (groups of 32) to 0.7% (128) against int8's 0.003%.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gptcli.errors import GptcliError
from gptcli.model import Model
from gptcli.model.lora import merge_lora

QUANTIZE_CHOICES = ("none", "int8")
INT8_MAX = 127  # symmetric: -127..127, so that -W and W quantize alike
# The CPU kernel's fast paths; fp32 activations go through it as bf16 and come back fp32.
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Rows (batch x tokens) up to which the CPU kernel beats dequantizing the weight and a dense
# product: the kernel's time grows with the rows (one matrix-vector pass each), while
# dequantizing costs the same for any number. Crossovers measured at about 6 rows for the
# blocks' layers and 50 for GPT-2's head; 16 keeps decode steps of up to 16 sequences
# (serve's default --max-batch) on the kernel and sends prefill of longer prompts and
# evaluation to the dense product.
KERNEL_MAX_ROWS = 16


def check_quantize(name: str, option: str = "--quantize") -> None:
    if name not in QUANTIZE_CHOICES:
        raise GptcliError(f"{option} must be one of {', '.join(QUANTIZE_CHOICES)}, got {name}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 weight (out, in) and fp32 scales (out,), symmetric per
    output channel. A row of zeros (the padded vocabulary rows of a head) gets scale 1."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)  # (out,)
    scales = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x (s q)^T + b with q int8 (out, in) and s one scale per output channel.

    The int8 weight and the scales are buffers, not parameters: nothing trains them, and
    `model.to(dtype)` casts the scales (and bias) to the activations' dtype while the int8
    weight stays int8."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scales", scales)  # (out,)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._cast: tuple[torch.Tensor, torch.Tensor] | None = None  # (scales, them in another dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_int8(linear.weight)
        return cls(q, scales.to(linear.weight.dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (M, in)
        if rows.device.type == "cpu" and rows.size(0) <= KERNEL_MAX_ROWS:
            kernel_dtype = rows.dtype if rows.dtype in KERNEL_DTYPES else torch.bfloat16
            y = torch._weight_int8pack_mm(rows.to(kernel_dtype).contiguous(), self.weight,
                                          self.scales_in(kernel_dtype)).to(rows.dtype)
        else:
            y = self.dequantized_matmul(rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """Off the CPU kernel: x q^T in x's dtype, then each column times its scale."""
        return F.linear(rows, self.weight.to(rows.dtype)) * self.scales_in(rows.dtype)

    def scales_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in `dtype`, cast once (again only after `.to()` replaced them)."""
        if self.scales.dtype == dtype:
            return self.scales
        if self._cast is None or self._cast[0] is not self.scales or self._cast[1].dtype != dtype:
            self._cast = (self.scales, self.scales.to(dtype))
        return self._cast[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(model: nn.Module, build: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Replace every nn.Linear of `model` (any family, a tied head included) by
    `build(linear)`, found by one walk over its modules; in place."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, build(getattr(owner, child)))
    return model


def quantize_model(model: Model, scheme: str = "int8") -> Model:
    """Store every linear layer of `model` (in eval mode) as `scheme`, in place; `none`
    leaves it as it is. LoRA adapters are merged first (the swap would drop them). For
    inference only afterwards (no training, no saving). A head tied to the token embedding
    gets its own int8 copy; the embedding lookup keeps the float matrix."""
    check_quantize(scheme)
    if scheme == "int8":
        merge_lora(model)
        swap_linears(model, Int8Linear.from_linear)
    return model
