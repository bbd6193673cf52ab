"""LoRA: low-rank adapters on chosen linear layers (Hu et al., 2021).

A `LoRALinear` is an `nn.Linear` (same `weight`/`bias` names, so checkpoints keep GPT-2's
names) plus two small matrices: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with
A (r, in) random and B (out, r) zero, so training starts from the base model exactly.
Only A and B (and a task head) train; `merge_lora` folds B A into W and turns the layers
back into plain `nn.Linear`, so sampling and export need no LoRA code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Linear layers of a GPT block, by the suffix of their module name.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, spec: LoRASpec):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.scale = spec.scale
        self.lora_dropout = nn.Dropout(spec.dropout)
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return super().forward(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (without adapter dropout)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def apply_lora(model: nn.Module, spec: LoRASpec) -> int:
    """Wrap every targeted linear layer of `model` in place; return how many were wrapped."""
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
              and any(name.endswith(t) for t in spec.targets)]
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), spec))
    model.lora_spec = spec  # recorded in checkpoints, so loading rebuilds the adapters
    return len(chosen)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place."""
    for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, name, model.get_submodule(name).merged())
    model.lora_spec = None



@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside: `model` computes as its base weights alone (each adapter's scale set to 0), the
    reference a LoRA run compares its policy with, without a second copy of the model."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in adapters]
    for m in adapters:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(adapters, scales):
            m.scale = scale
