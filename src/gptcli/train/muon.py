"""Muon (Jordan et al. 2024), computed for every matrix of one shape at once.

The update is torch.optim.Muon's, step for step: Nesterov momentum, then the quintic
Newton-Schulz iteration that maps the momentum to a nearby semi-orthogonal matrix,
decoupled weight decay, and the learning rate scaled by sqrt(max(1, rows / cols)).

The iteration runs in bf16 (torch.optim.Muon's choice) where the device multiplies bf16
fast, and in fp32 elsewhere: on an AVX2-only CPU one bf16 orthogonalisation of a 4 x 128
x 384 stack measured 198 ms against 10 ms in fp32, which made the whole modern recipe 10x
slower there. The iteration only needs to land the singular values near 1, so fp32 gives
the same update up to bf16's rounding (tested). The choice is made when the optimizer is
built and kept in its parameter groups (`ns_dtype`), so a resumed run keeps its own.
torch.optim.Muon runs that iteration one matrix at a time, 15 small products per matrix;
a model's blocks repeat a few shapes, so here the matrices of one shape are stacked and
each product is one batched call. At nanoGPT's CPU shape (16 matrices, 4 shapes) that
halves the optimizer's time (BENCHMARKS.md, "Recipes"), and the difference grows with depth.

Under FSDP each process holds a row shard of every matrix (a DTensor), and Newton-Schulz
needs the whole matrix: the momentum is kept on the shards (it is elementwise), each
matrix's update is gathered whole on every process, orthogonalised there (the same
arithmetic on every process, so the same result), and each process applies the rows of its
own shard. That is one all-gather per matrix per step, the traffic of the forward's own
gathers, and the update a single process computes.

The state and parameter groups are torch.optim.Muon's (`momentum_buffer` per parameter;
`ns_steps`, `ns_coefficients`, `eps` per group, plus `ns_dtype`), so the two read each
other's state dicts.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from gptcli.train.parallel import gathered, shard_like

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# What state saved before `ns_dtype` existed was computed in.
SAVED_BEFORE_NS_DTYPE = "bf16"
# Group settings that belong to the run, not to the config: a resume keeps the saved ones.
RUN_SETTINGS = ("ns_dtype",)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float, momentum: float,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, ns_dtype: str = "bf16"):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": NS_COEFFICIENTS, "ns_steps": ns_steps, "eps": eps,
                    "adjust_lr_fn": None, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates matrices only: give it 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None) -> None:  # closure: torch's signature (DCP passes None); unused
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for (rows, cols), params in by_shape.items():
                grads = [p.grad for p in params]
                buffers = [self._buffer(p) for p in params]
                torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])  # m = mu m + (1 - mu) g
                updates = torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers
                ortho = orthogonalise(torch.stack([gathered(u) for u in updates]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"], NS_DTYPES[group["ns_dtype"]])
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                scaled_lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
                steps = [shard_like(p, o.to(p.dtype)) for p, o in zip(params, ortho.unbind(0))]
                torch._foreach_add_(params, steps, alpha=-scaled_lr)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("ns_dtype", SAVED_BEFORE_NS_DTYPE)

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz iterations on a stack of matrices g (N, rows, cols), in `dtype`: each
    converges towards U V^T of its SVD (singular values pushed into about [0.5, 1.5]).
    Works on the wide orientation, so the Gram matrix is the smaller one."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, r, r), r the smaller side
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.mT if tall else x
