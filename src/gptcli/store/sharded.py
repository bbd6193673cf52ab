"""Sharded checkpoints (`train.checkpoint: sharded`): every process writes its own part of
the weights and optimizer state with torch.distributed.checkpoint (DCP), so nothing is
gathered on rank 0; with `train.async_checkpoint` the writing runs beside training.

    step-000500/
      sharded/             DCP's files: .metadata and one __RANK_0.distcp per process, holding
                           "model" (weights by parameter name) and "optimizer" (moments, steps)
      model.safetensors    the model's metadata (arch, config, tokenizer, ...), no tensors
      trainer.json, trainer.safetensors (RNG states), tokenizer/, config.yaml, manifest.json

The manifest covers the shards too, so a missing or damaged shard is named before anything
reads it. DCP reshards on load: a checkpoint written by N processes (FSDP or not) resumes
under M of either kind, or loads whole in one process (`sample`, `eval`, `info`,
`export-hf` read it as they read any checkpoint: the weights are assembled in memory).
Under FSDP each process loads the whole weights before sharding them (as from a full
checkpoint), then its own shards of the optimizer state.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

SHARDS = "sharded"
# DCP notes on each read and write without a process group (also from async saves' threads)
# that it assumes one process: which is what `sample` or a one-process run means.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS).is_dir()


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _alone() -> bool:
    """No process group: DCP reads and writes as the only process."""
    import torch.distributed

    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _parts(optimizer) -> list[torch.optim.Optimizer]:
    """torch optimizers DCP can read: Muon's runs are two over disjoint parameters
    (optim.Optimizers), whose states DCP keys by parameter name, so they combine."""
    return list(getattr(optimizer, "parts", [optimizer]))


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                asynchronous: bool = False, group=None) -> Future | None:
    """Write this process's shards of the model and optimizer under `directory/sharded`
    (every process calls it). Asynchronously: the state is copied aside first and written
    on a thread, and the returned future ends when every process has written (DCP's
    coordinator writes the metadata last); `group` is the process group it talks over, one
    the training steps do not use."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, _parts(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    if asynchronous:
        return _dcp().async_save(state, checkpoint_id=directory / SHARDS, process_group=group, no_dist=_alone())
    _dcp().save(state, checkpoint_id=directory / SHARDS, no_dist=_alone())
    return None


def load_model_shards(model: nn.Module, directory: str | Path) -> None:
    """The weights of a sharded checkpoint into `model` (a collective under torchrun: every
    process calls it), whatever the number of processes that wrote them."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    _dcp().load(state, checkpoint_id=Path(directory) / SHARDS, no_dist=_alone())
    set_model_state_dict(model, state["model"])


def load_optimizer_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """The optimizer state of a sharded checkpoint into `optimizer` (built over `model`, in
    whatever layout this run has: each FSDP process reads the part of each moment its
    parameter shard needs). Its state is first made (DCP's zero-learning-rate step) so
    there is something to load into."""
    from torch.distributed.checkpoint.state_dict import (
        get_state_dict,
        set_optimizer_state_dict,
    )

    _, optimizer_state = get_state_dict(model, _parts(optimizer))
    state = {"optimizer": optimizer_state}
    _dcp().load(state, checkpoint_id=Path(directory) / SHARDS, no_dist=_alone())
    set_optimizer_state_dict(model, _parts(optimizer), state["optimizer"])


def shard_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """The weights' shapes by name, from the shards' metadata alone (`gptcli info`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(Path(directory) / SHARDS)).read_metadata()
    return {key.removeprefix("model."): tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
