"""Instruction tuning: conversations rendered in the model's chat format (gptcli's own tokens,
or an imported model's template: data/tokenizers/chat_format.py) as training rows, and the
dataset.

Loss falls only on assistant content and its end of turn (<|end|>, or the template's: so the
model learns to stop); everything else is masked with IGNORE_INDEX.

A conversation longer than the context is dropped (reported in one Notice) or, with
finetune.too_long=error, refused with its `file:line`; cutting it would teach half answers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from gptcli.data.tokenizers.chat_format import ROLES, conversation_ids
from gptcli.data.training.dataset import STREAMS, step_rows
from gptcli.data.text.records import Record, where
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.config import EvalTask
from gptcli.evals.lm import validation_loss
from gptcli.evals.run_tasks import EvalTasks
from gptcli.events import EventSink, Notice, ignore
from gptcli.model.gpt import IGNORE_INDEX
from gptcli.runtime import Distributed, Precision


def messages_of(record: dict, where: str) -> list[dict]:
    """The turns of a record: `{"prompt", "response"}` or `{"messages": [{"role", "content"}]}`."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise GptcliError(f"{where}: 'messages' must be a non-empty list")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise GptcliError(f"{where}: every message needs a 'role' and a string 'content'")
            if turn.get("role") not in ROLES:
                raise GptcliError(f"{where}: unknown role {turn.get('role')!r} (use {', '.join(ROLES)})")
        if not any(turn["role"] == "assistant" for turn in messages):
            raise GptcliError(f"{where}: no assistant message to learn from")
        return messages
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    raise GptcliError(f"{where}: expected 'prompt' and 'response' strings, or 'messages'")


class Conversation(NamedTuple):
    where: str  # `file:line` of the record it came from
    messages: list[dict]


def conversations(records: list[Record], path: str) -> list[Conversation]:
    """The conversation of every record of `path`, each knowing its line."""
    found = []
    for record in records:
        place = where(path, record)
        found.append(Conversation(place, messages_of(record, place)))
    return found


def render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the model's chat format and their targets for
    next-token training: targets[i] is ids[i + 1] where that token is a reply's (assistant
    content or its end of turn), else IGNORE_INDEX."""
    ids, learn = conversation_ids(tokenizer, messages)
    targets = [nxt if ok else IGNORE_INDEX for nxt, ok in zip(ids[1:], learn[1:])]
    return ids[:-1], targets


class InstructData:
    """Conversations as (ids, targets) rows; padded per batch, or packed into full rows."""

    metric = "val_loss"
    higher_is_better = False

    def __init__(self, tokenizer: Tokenizer, train: list[Conversation], val: list[Conversation],
                 block_size: int, batch_size: int, pack: bool, seed: int, device: torch.device,
                 grad_accum: int = 1, dist: Distributed = Distributed(), too_long: str = "drop",
                 on_event: EventSink = ignore, eval_tasks: list[EvalTask] = ()):
        self.pad_id = tokenizer.eot_id
        self.tasks = EvalTasks(list(eval_tasks), tokenizer)
        train_rows = _fitting_rows(tokenizer, train, block_size, too_long, "training")
        val_rows = _fitting_rows(tokenizer, val, block_size, too_long, "validation")
        dropped = len(train) - len(train_rows), len(val) - len(val_rows)
        if any(dropped):
            on_event(Notice(f"dropped {dropped[0]} of {len(train)} training and {dropped[1]} of "
                            f"{len(val)} validation conversations longer than the {block_size}-token "
                            f"context (finetune.too_long=drop)"))
        self.train_rows = _pack(train_rows, block_size) if pack else train_rows
        self.val_rows = _pack(val_rows, block_size) if pack else val_rows
        self.batch_size = batch_size
        self.per_step = batch_size * grad_accum * dist.world_size
        self.dist = dist
        self.seed = seed
        self.device = device

    def _batch(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        idx = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for r, (ids, tgt) in enumerate(rows):
            idx[r, :len(ids)] = ids
            targets[r, :len(tgt)] = tgt
        return {"idx": torch.from_numpy(idx).to(self.device),
                "targets": torch.from_numpy(targets).to(self.device)}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        picks = step_rows(self.seed, STREAMS["instruct"], step, micro, self.dist.rank, self.batch_size, self.per_step,
                          self.dist.world_size, len(self.train_rows))
        return self._batch([self.train_rows[i] for i in picks])

    def val_batches(self):
        for start in range(0, len(self.val_rows), self.batch_size):
            yield self._batch(self.val_rows[start:start + self.batch_size])

    def validate(self, model: torch.nn.Module, precision: Precision) -> dict[str, float]:
        """Mean loss per response token over every validation conversation, and the scores
        of train.eval_tasks."""
        return {**validation_loss(model, self.val_batches(), precision), **self.tasks.scores(model, precision)}


def _fitting_rows(tokenizer: Tokenizer, candidates: list[Conversation], block_size: int,
                  too_long: str, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, targets) of the conversations that fit the context. A longer one is left out,
    or with too_long="error" refused; a split left with none is refused either way."""
    rows = []
    for conversation in candidates:
        ids, targets = render(tokenizer, conversation.messages)
        if len(ids) <= block_size:
            rows.append((np.array(ids), np.array(targets)))
        elif too_long == "error":
            raise GptcliError(f"{conversation.where}: conversation is {len(ids)} tokens, longer than "
                              f"the {block_size}-token context; shorten it, or set "
                              f"finetune.too_long=drop to leave such conversations out")
    if not rows:
        raise GptcliError(f"all {len(candidates)} {split} conversations are longer than the "
                          f"{block_size}-token context (finetune.too_long=drop leaves none); "
                          f"shorten them")
    return rows


def _pack(rows: list[tuple[np.ndarray, np.ndarray]], block_size: int
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Concatenate consecutive conversations into rows of at most block_size tokens.
    Attention may cross conversation boundaries inside a row (the usual simple packing);
    every conversation still starts with a role token, and its loss mask is kept."""
    packed, ids, targets, length = [], [], [], 0
    for row_ids, row_targets in rows:
        if ids and length + len(row_ids) > block_size:
            packed.append((np.concatenate(ids), np.concatenate(targets)))
            ids, targets, length = [], [], 0
        ids.append(row_ids)
        targets.append(row_targets)
        length += len(row_ids)
    if ids:
        packed.append((np.concatenate(ids), np.concatenate(targets)))
    return packed
