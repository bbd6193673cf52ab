"""The optimizers (AdamW, or Muon (muon.py) for hidden matrices beside AdamW) and the
warmup + cosine learning-rate schedule.

Every parameter group built here carries `lr_scale`, its peak learning rate over
`train.lr` (optimizer states saved before it existed have none: 1): the schedule sets each
group to `lr_at(step) * lr_scale`, so Muon's groups follow the same warmup and decay at
their own height.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gptcli.config import TrainConfig
from gptcli.errors import GptcliError
from gptcli.model.lora import LoRALinear
from gptcli.runtime import bf16_matmul_is_fast
from gptcli.train.muon import Muon


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`train.optimizer`: `adamw` over every trainable parameter, or `muon`: Muon for the
    2-D weights inside the transformer blocks, AdamW for the rest (embeddings, output head,
    norms, biases, a task head), as Muon's authors prescribe. LoRA's factors are not such
    weights: orthogonalising a rank-r factor's update measured 14 points worse than AdamW on
    the classify example (BENCHMARKS.md), so they take AdamW, and a LoRA finetune with
    `muon` is AdamW throughout. Muon's Newton-Schulz runs in bf16 where `device` multiplies
    bf16 fast, else in fp32 (muon.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return _adamw(params, cfg, device)
    lora_factors = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    in_blocks = {id(p) for p in model.blocks.parameters()} - lora_factors

    def for_muon(p: nn.Parameter) -> bool:
        return p.dim() == 2 and id(p) in in_blocks

    hidden = [p for p in params if for_muon(p)]
    if not hidden and any(id(p) in lora_factors for p in params):
        return _adamw(params, cfg, device)
    if not hidden:
        raise GptcliError("train.optimizer=muon has no trainable matrix inside the blocks to update "
                          "(finetune.freeze.blocks freezes them all); use train.optimizer=adamw")
    rest = [p for p in params if not for_muon(p)]
    muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                ns_dtype="bf16" if bf16_matmul_is_fast(device) else "fp32")
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.lr
    return Optimizers([_adamw(rest, cfg, device), muon])


def _adamw(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW in which matrices (dim >= 2: linear and embedding weights) decay and biases and
    norm gains do not. The fused kernel runs on CUDA and on CPU (measured on CPU: 8% faster
    steps at the mid benchmark shape, BENCHMARKS.md)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))
    for group in optimizer.param_groups:
        group["lr_scale"] = 1.0
    return optimizer


class Optimizers:
    """Several optimizers stepped as one, over disjoint parameters.

    `param_groups` lists every part's groups in order, and the state dict has a single
    optimizer's layout (parameters numbered across the parts, groups concatenated), so the
    training loop, the gradient scaler and the checkpoint code treat it as one optimizer.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            own = part.state_dict()
            state.update({offset + index: slots for index, slots in own["state"].items()})
            groups += [{**group, "params": [offset + i for i in group["params"]]} for group in own["param_groups"]]
            offset += sum(len(group["params"]) for group in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups, offset = iter(state["param_groups"]), 0
        for part in self.parts:
            own_groups = [next(groups) for _ in part.param_groups]
            count = sum(len(group["params"]) for group in own_groups)
            part.load_state_dict({
                "state": {index - offset: slots for index, slots in state["state"].items()
                          if offset <= index < offset + count},
                "param_groups": [{**group, "params": [i - offset for i in group["params"]]}
                                 for group in own_groups],
            })
            offset += count


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup to cfg.lr, then cosine decay to
    cfg.min_lr at cfg.lr_decay_steps (default max_steps), then constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_end = cfg.lr_decay_steps or cfg.max_steps
    span = max(decay_end - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
