"""Model families as code builds them, and the protocol the rest of gptcli uses them through.

What a family is (its name, component defaults, Hugging Face and GGUF names) is plain data
in gptcli/families/, one file each. A config names its family as `model.arch` and a
checkpoint records it as `arch` (checkpoints from before it was recorded are `gpt2`);
`get_arch` gives the family with what building one takes: its config dataclass, model
builder and checks. Outside model/, code builds models only through `get_arch` and sees
them only as `Model`s: the family's model, or a task head over one (heads.py), which offers
the same members.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gptcli.config import ModelConfig, model_config_problems
from gptcli.families import DEFAULT_FAMILY, Family, get_family
from gptcli.model.gpt import GPT, check_fits
from gptcli.model.kv_cache import KVCache
from gptcli.model.lora import LoRASpec


class Model(Protocol):
    """The members of a model (an nn.Module) that code outside model/ may use."""

    arch: str  # its family's name (gptcli/families/)
    config: Any  # the family's config dataclass; has n_embd, block_size, vocab_size
    lora_spec: LoRASpec | None  # what its adapters were made with (set by lora.apply_lora)
    activation_checkpointing: bool  # recompute blocks in backward (set by the training loop)

    @property
    def blocks(self) -> nn.ModuleList: ...  # the repeated transformer blocks, in order

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, C); with a cache, the tokens sit at positions `input_pos` (T,)."""

    def new_kv_cache(self, batch_size: int, length: int) -> KVCache: ...  # for generation, owned by the caller

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # (..., C) -> (..., vocab_size)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The summed next-token cross-entropy of hidden states (..., C) against targets (...),
        IGNORE_INDEX ones left out, each times its weight if given; never all the logits at once."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs for `idx` (B, T); given `targets`, the loss summed over them."""

    def flops_per_token(self) -> float: ...  # training FLOPs per token, for MFU

    def num_params(self) -> int: ...


@dataclass(frozen=True)
class Arch:
    """A family (gptcli/families/) with what building its models takes."""

    family: Family
    config: type  # the config dataclass, read from a checkpoint's metadata
    model: Callable[[Any], Model]  # built from a config
    problems: Callable[[Any], list[str]]  # a config's problems, for a checkpoint's stored one
    check_fits: Callable[..., None]  # refuses, before building, a model too large for a device


DEFAULT_ARCH = DEFAULT_FAMILY  # what a checkpoint without `arch` in its metadata holds


def get_arch(name: str) -> Arch:
    """The family `name` (a one-line GptcliError naming the known ones if there is none).
    Every family is the one GPT class, its components chosen by the config (gpt.py)."""
    return Arch(get_family(name), ModelConfig, GPT, model_config_problems, check_fits)
