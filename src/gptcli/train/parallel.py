"""Training with several processes (torchrun): how the model is spread over them, and how
full weights and optimizer state are gathered for a checkpoint and spread again on resume.

- `ddp`: every process holds the whole model; DistributedDataParallel averages gradients.
- `fsdp`: FSDP2 (`fully_shard`) splits weights, gradients and optimizer moments over the
  processes, one shard group per transformer block plus one for the rest (embeddings, the
  tied head, the final LayerNorm); weights are gathered block by block for each forward
  and backward. For models that do not fit one device.

Checkpoints always hold full tensors, in the same layout as a single process writes, so a
run saved with N processes resumes with M of either kind, or samples in one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gptcli.errors import GptcliError
from gptcli.model import Model
from gptcli.runtime import Distributed, Precision


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def gathered(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank must call it); a plain
    tensor as it is."""
    return value.full_tensor() if _is_dtensor(value) else value


def shard_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` (a full tensor, the same on every rank) laid out as `param`: for a sharded
    parameter, this rank's shard of it, cut locally (no communication)."""
    if not _is_dtensor(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def _gathered_to_cpu(value: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """Gathered tensors go to the CPU one at a time: a checkpoint never holds more than one
    full tensor on the device beyond the shards. Ranks that do not write (`keep` false)
    take part in the gather and drop the result, so host memory holds one full copy."""
    if not _is_dtensor(value):
        return value
    whole = value.full_tensor()
    return whole.cpu() if keep else None


def shard(model: Model, precision: Precision) -> None:
    """FSDP2 in place: each block is its own shard group, the root module holds the rest.
    Under bf16, weights are gathered and computed in bf16 while gradients are reduced and
    kept in fp32 (the master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if precision.name == "fp16":
        raise GptcliError("train.parallel: fsdp needs precision bf16 or fp32 (fp16 loss scaling "
                          "is not supported on sharded gradients)")
    policy = MixedPrecisionPolicy()
    if precision.name == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # Multiple-choice scoring (train.eval_tasks) runs the trunk and the head as two calls, not
    # through forward, and FSDP gathers weights only around forward: registered, each call
    # gathers the root's (embeddings, final norm, head) as forward does.
    for method in ("hidden_states", "logits"):
        register_fsdp_forward_method(model, method)


def wrap_for_steps(model: nn.Module, dist: Distributed, mode: str,
                   device: torch.device) -> nn.Module:
    """The module the training steps run through: DDP around the model, or the (already
    sharded) model itself under fsdp or in a single process."""
    if not dist.active or mode == "fsdp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(step_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) inside this block unless
    `enabled`: accumulation syncs only on the last micro-batch of a step."""
    if enabled:
        yield
    elif hasattr(step_model, "no_sync"):  # DDP
        with step_model.no_sync():
            yield
    elif hasattr(step_model, "set_requires_gradient_sync"):  # FSDP2
        step_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)
    else:  # a single process: nothing to sync
        yield


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors (gathered under fsdp; every rank calls,
    only ranks with `keep` get the gathered tensors)."""
    return {name: _gathered_to_cpu(value, keep) for name, value in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """`optimizer.state_dict()` with whole moment tensors (gathered under fsdp; every rank
    calls, as above): the single-process layout, whatever the number of processes."""
    state = optimizer.state_dict()
    state["state"] = {index: {slot: _gathered_to_cpu(value, keep) for slot, value in slots.items()}
                      for index, slots in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (single-process layout) optimizer state; under fsdp each rank keeps the
    shard of every moment that matches its shard of the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        from torch.distributed.tensor import distribute_tensor

        state = {**state, "state": {
            index: {slot: distribute_tensor(value.to(params[index].device_mesh.device_type),
                                            params[index].device_mesh, params[index].placements)
                    if value.shape == params[index].shape else value
                    for slot, value in slots.items()}
            for index, slots in state["state"].items()}}
    optimizer.load_state_dict(state)
