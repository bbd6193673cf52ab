"""Task heads over a model of any family (a `Model`, see __init__.py).

Sequence classification: a linear head `score` (no bias) on the hidden state of each
sequence's last real token (`pooling` "last", as in Hugging Face's
GPT2ForSequenceClassification) or on the mean of its real tokens' hidden states ("mean").
Sequences are right-padded per batch; with causal attention the padding never reaches the
real tokens, and mean pooling leaves it out. A text read as several windows (rows) has the
mean of its rows' class logits (`owners` says which rows are whose).

A head holds its model as `trunk` (TrunkHead), but its state dict gives the trunk's tensors the
trunk's own names (`wte.weight`, `h.0.attn.c_attn.weight`, ..., no `trunk.` prefix) next to
`score.weight`, and loads them by those names. So a classifier checkpoint is its trunk's
checkpoint plus one tensor: the layout checkpoints had when the classifier was a GPT
subclass, and for GPT-2 the names HF's GPT2ForSequenceClassification uses (less its
`transformer.` prefix). Whatever reads or loads weights treats a head like any model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.model import Model
from gptcli.model.gpt import IGNORE_INDEX
from gptcli.model.lora import adapters_off
from gptcli.runtime import eval_mode

_TRUNK = "trunk."


def _flatten_trunk_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: `{prefix}trunk.NAME` -> `{prefix}NAME`, in place, order kept."""
    inner = prefix + _TRUNK
    items = list(state_dict.items())
    state_dict.clear()
    state_dict.update((prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in items)


def _nest_trunk_keys(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook, the inverse: every key of this head but its own layers'
    (`module.OWN`, `score.` for a classifier) is the trunk's."""
    own = tuple(prefix + name for name in module.OWN)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + _TRUNK + key[len(prefix):]] = state_dict.pop(key)


def _flatten_reported_keys(module: nn.Module, incompatible) -> None:
    """load_state_dict post-hook: missing and unexpected keys by the names the state dict uses
    (as reported for a head that is the root module, the case load_weights checks)."""
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.removeprefix(_TRUNK) for k in keys]


def labelled_logprobs(model: Model, idx: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-probability `model` gives each labelled token of `idx` (N, T): (K,) for the K
    positions where `labels` is not IGNORE_INDEX, with their rows and columns (K,) each.
    Only those positions go through the head (K, V), in fp32: what preference and policy
    losses are computed from."""
    hidden = model.hidden_states(idx)  # (N, T, C)
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (K,) each
    logprobs = torch.log_softmax(model.logits(hidden[rows, cols]).float(), dim=-1)  # (K, V)
    return logprobs.gather(-1, labels[rows, cols, None])[:, 0], rows, cols


class Reference:
    """The starting model, to compare a policy with as it trains (DPO's reference, GRPO's KL):
    a frozen copy of the trunk's weights as they are now, or, where the trunk will train
    LoRA adapters (`lora`), the trunk itself with its adapters switched off: no second copy.
    A plain object, not a module: the copy stays out of the state dict and the optimizer."""

    def __init__(self, trunk: Model, lora: bool):
        self.trunk = trunk
        self.frozen = None if lora else copy.deepcopy(trunk).requires_grad_(False).eval()

    @torch.no_grad()
    def logprobs(self, idx: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`labelled_logprobs` under the starting weights (eval mode: no dropout)."""
        if self.frozen is not None:
            return labelled_logprobs(self.frozen.to(idx.device), idx, labels)
        with eval_mode(self.trunk), adapters_off(self.trunk):
            return labelled_logprobs(self.trunk, idx, labels)


class TrunkHead(nn.Module):
    """A model held as `trunk` with something of the task's own on top: what every head
    shares. It reads as its trunk (arch, config, blocks, hidden states, logits, loss, FLOPs)
    and its state dict holds the trunk's tensors under the trunk's own names beside the
    head's layers (named by OWN, prefixes of their keys)."""

    OWN: tuple[str, ...] = ()

    def __init__(self, trunk: Model):
        super().__init__()
        self.trunk = trunk  # registered first: its parameters come first, as optimizer states expect
        self.lora_spec = None  # set by lora.apply_lora (the adapters go into the trunk's layers)
        self.register_state_dict_post_hook(_flatten_trunk_keys)
        self.register_load_state_dict_pre_hook(_nest_trunk_keys)
        self.register_load_state_dict_post_hook(_flatten_reported_keys)

    @property
    def arch(self) -> str:
        return self.trunk.arch

    @property
    def config(self):
        return self.trunk.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    @property
    def activation_checkpointing(self) -> bool:
        return self.trunk.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:  # the trunk runs the blocks
        self.trunk.activation_checkpointing = value

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        return self.trunk.hidden_states(idx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.trunk.logits(hidden)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk.loss(hidden, targets, weights)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors counted once

    def flops_per_token(self) -> float:
        """The trunk's, plus 6 per weight of the head's own (forward + backward)."""
        own = sum(p.numel() for name, p in self.named_parameters() if name.startswith(self.OWN))
        return self.trunk.flops_per_token() + 6 * own


class GPTClassifier(TrunkHead):
    OWN = ("score.",)

    def __init__(self, trunk: Model, labels: list[str], aux_lm_weight: float = 0.0, pooling: str = "last"):
        super().__init__(trunk)
        self.labels = list(labels)
        self.n_classes = len(labels)
        self.aux_lm_weight = aux_lm_weight
        self.pooling = pooling  # "last" or "mean" (finetune.pooling)
        self.score = nn.Linear(trunk.config.n_embd, self.n_classes, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, owners: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, K) for right-padded rows `idx` (R, T) with `lengths` (R,): one row
        per text (B = R), or with `owners` (R,) each row's text (0 .. B-1, every text at least
        one row), the mean of each text's row logits. With `targets` (B,): the summed
        cross-entropy (plus the weighted auxiliary LM loss over the rows)."""
        if lengths is None:
            lengths = torch.full((idx.size(0),), idx.size(1), device=idx.device)
        hidden = self.hidden_states(idx)  # (R, T, C)
        logits = self.score(self._pool(hidden, lengths))  # (R, K)
        if owners is not None:
            logits = _mean_by_owner(logits, owners)  # (B, K)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if self.aux_lm_weight > 0:
            loss = loss + self.aux_lm_weight * self._lm_loss(hidden, idx, lengths)
        return loss

    def _pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector (R, C) per row of `hidden` (R, T, C): its last real token's, or the mean
        over its real tokens (positions < length; the padding after them is left out)."""
        rows = torch.arange(hidden.size(0), device=hidden.device)
        if self.pooling == "last":
            return hidden[rows, lengths - 1]
        real = torch.arange(hidden.size(1), device=hidden.device) < lengths[:, None]  # (R, T)
        summed = (hidden.float() * real[:, :, None]).sum(dim=1)  # (R, C), summed in fp32
        return (summed / lengths[:, None]).to(hidden.dtype)

    def _lm_loss(self, hidden: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each sequence's mean next-token loss over its real tokens, summed over the batch:
        the auxiliary language-modelling objective of the original GPT paper (in chunks, as
        the trunk's own loss: never all the batch's logits at once)."""
        T = idx.size(1)
        next_ids = idx[:, 1:].masked_fill(torch.arange(1, T, device=idx.device) >= lengths[:, None],
                                          IGNORE_INDEX)  # (B, T-1), padding ignored
        per_example = 1.0 / (lengths - 1).clamp(min=1).float()  # (B,): a mean over each sequence
        return self.loss(hidden[:, :-1], next_ids, per_example[:, None].expand_as(next_ids))


def _mean_by_owner(logits: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of `logits` (R, K) that share an owner: (B, K), B = owners.max() + 1,
    in fp32 (a sum over many windows in bf16 would lose digits)."""
    n_texts = int(owners.max()) + 1
    sums = torch.zeros(n_texts, logits.size(1), device=logits.device).index_add_(0, owners, logits.float())
    counts = torch.bincount(owners, minlength=n_texts)  # (B,)
    return sums / counts[:, None]
