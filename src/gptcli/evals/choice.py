"""Multiple-choice evaluation (`gptcli eval --task hellaswag|choice`), scored as EleutherAI's
lm-evaluation-harness scores its multiple-choice tasks, so that the numbers compare:

- Each choice is the continuation " " + choice after the item's context (the harness's
  target delimiter). Its tokens are found as the harness finds them for a causal model:
  spaces that end the context move to the continuation, then the continuation's ids are
  those of `encode(context + continuation)` after the first `len(encode(context))` (so a
  word that BPE would merge across the boundary is scored as the whole text encodes it).
  An empty context is the end-of-text id.
- The choice's log-likelihood is the sum of log p(token | everything before it) over its
  tokens; the model reads the last block_size + 1 tokens of context + continuation, minus
  the last (the harness's truncation).
- acc: 1 when the choice with the highest log-likelihood is the label. acc_norm: the same
  after dividing each log-likelihood by the choice's length in characters (the harness's
  `len(choice)`, without the delimiter), the number papers report. acc_bytes: divided by
  its length in UTF-8 bytes instead (the harness's metric of that name; equal to acc_norm
  where the choices are ASCII). Each is reported with the standard error of its mean
  (sample standard deviation / sqrt(n)).

Readers: `hellaswag` reads the official HellaSwag JSONL (`ctx_a`, `ctx_b`,
`activity_label`, `endings`, `label`) with the harness's preprocessing (context
"activity: ctx_a Ctx_b", WikiHow's bracketed artifacts removed); `choice` a generic JSONL
(or CSV/Parquet) of {"context": str, "choices": [str, ...], "label": int}.

Batching: every (item, choice) sequence of a batch of items is scored in one forward pass,
padded on the right (causal attention never looks right, so padding changes nothing
before it); the log-softmax is taken in fp32, at the continuations' positions only.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcli.config import EvalTask
from gptcli.data.text.records import Record, read_records, where
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.evals.lm import load_lm_for_eval
from gptcli.events import EventSink, Progress, ignore
from gptcli.model import Model
from gptcli.model.budget import (
    Sizes,
    check_batch_fits,
    logit_bytes,
    pass_bytes,
    scoring_bytes_per_logit,
)
from gptcli.runtime import Precision, eval_mode, resolve_precision

TASKS = ("hellaswag", "choice")
DELIMITER = " "  # between context and choice, as the harness's default target_delimiter


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int


def read_items(task: str, path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """The items of a `task` file (see the module docstring), the first `limit` of them."""
    if task not in TASKS:
        raise GptcliError(f"--task must be one of {', '.join(TASKS)} or generate, got {task!r}")
    if limit is not None and limit < 1:
        raise GptcliError(f"--limit must be at least 1, got {limit}")
    records = read_records(path)[:limit]
    parse = _hellaswag_item if task == "hellaswag" else _generic_item
    return [parse(record, path) for record in records]


def _field(record: Record, name: str, kind: type, path: str | Path, task: str):
    if name not in record:
        raise GptcliError(f"{where(path, record)}: no '{name}' field; a {task} item has "
                          f"{', '.join(_FIELDS[task])}")
    value = record[name]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # HellaSwag's own files give the label as an int, its HF copy as a string
    if not isinstance(value, kind) or isinstance(value, bool):
        raise GptcliError(f"{where(path, record)}: '{name}' must be {_KIND_NAMES[kind]}, got {type(value).__name__}")
    return value


_FIELDS = {"hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
           "choice": ("context", "choices", "label")}
_KIND_NAMES = {str: "text", int: "an integer", list: "a list of texts"}


def _checked(record: Record, path: str | Path, context: str, choices: list, label: int) -> ChoiceItem:
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise GptcliError(f"{where(path, record)}: the choices must be a list of at least two texts")
    if not 0 <= label < len(choices):
        raise GptcliError(f"{where(path, record)}: label {label} is not the index of one of its "
                          f"{len(choices)} choices")
    return ChoiceItem(context, tuple(choices), label)


def _generic_item(record: Record, path: str | Path) -> ChoiceItem:
    return _checked(record, path, _field(record, "context", str, path, "choice"),
                    _field(record, "choices", list, path, "choice"), _field(record, "label", int, path, "choice"))


def _hellaswag_item(record: Record, path: str | Path) -> ChoiceItem:
    def field(name, kind):
        return _field(record, name, kind, path, "hellaswag")

    context = field("ctx_a", str) + " " + field("ctx_b", str).capitalize()
    endings = field("endings", list)
    if not all(isinstance(e, str) for e in endings):
        raise GptcliError(f"{where(path, record)}: 'endings' must be a list of texts")
    return _checked(record, path, hellaswag_clean(field("activity_label", str) + ": " + context),
                    [hellaswag_clean(e) for e in endings], field("label", int))


def hellaswag_clean(text: str) -> str:
    """HellaSwag's usual preprocessing: WikiHow's " [title]" marks become sentence ends,
    other bracketed tags go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# --- scoring -----------------------------------------------------------------------------------


def choice_tokens(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one choice, split as the harness splits them."""
    continuation = DELIMITER + choice
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


@dataclass
class ChoiceResult:
    loglikelihoods: list[list[float]]  # per item, per choice
    items: list[ChoiceItem]

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {"items": len(self.items)}
        for name, length in (("acc", lambda choice: 1), ("acc_norm", len),
                             ("acc_bytes", lambda choice: len(choice.encode("utf-8")))):
            right = np.array([int(np.argmax(np.array(lls) / [length(c) for c in item.choices])) == item.label
                              for lls, item in zip(self.loglikelihoods, self.items)])
            metrics[name], metrics[f"{name}_stderr"] = float(right.mean()), _stderr(right)
        return metrics


def _stderr(outcomes: np.ndarray) -> float:
    """Standard error of the mean of 0/1 outcomes: sample standard deviation / sqrt(n)."""
    n = len(outcomes)
    return float(outcomes.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


@torch.inference_mode()
def score_items(model: Model, tokenizer: Tokenizer, items: list[ChoiceItem], batch_size: int = 8,
                on_event: EventSink = ignore) -> ChoiceResult:
    """The log-likelihood of every choice of every item (see the module docstring);
    `batch_size` items per forward pass."""
    if batch_size < 1:
        raise GptcliError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    window = model.config.block_size
    scores: list[list[float]] = []
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            per_item = [[_sequence(tokenizer, item.context, choice, window) for choice in item.choices]
                        for item in batch]
            _check_batch_fits(model, batch_size, per_item, device)
            sequences = [sequence for choices in per_item for sequence in choices]
            flat = iter(_loglikelihoods(model, sequences, device))
            scores += [[next(flat) for _ in item.choices] for item in batch]
            on_event(Progress("scoring", start + len(batch), len(items)))
    return ChoiceResult(scores, items)


def _check_batch_fits(model: Model, batch_size: int, per_item: list[list[tuple[list[int], int]]],
                      device: torch.device) -> None:
    """Refuse a --batch-size whose batch (every choice of `per_item`'s items, as
    _loglikelihoods scores them) cannot fit beside the model, before it is allocated.
    Checked per batch, as the sequences' lengths are known only once they are encoded."""
    sizes = Sizes.of(model)

    def bytes_for(items: int) -> int:
        return _scoring_bytes(sizes, [sequence for choices in per_item[:items] for sequence in choices])

    sequences = sum(len(choices) for choices in per_item)
    check_batch_fits(f"--batch-size {batch_size}", len(per_item), bytes_for,
                     f"the activations and log-probabilities of {sequences:,} sequences (the choices of "
                     f"{len(per_item):,} items)", "use a smaller --batch-size", device)


def _scoring_bytes(sizes: Sizes, sequences: list[tuple[list[int], int]]) -> int:
    """What _loglikelihoods allocates for `sequences` (model/budget.py): the padded input
    ids (N, T) in int64, one block's pass over them, the final hidden states (N, T, C) kept
    while the head runs, and the logits and fp32 log-probabilities of the K continuation
    positions (K, V)."""
    rows = len(sequences)
    longest = max(len(ids) - 1 for ids, _ in sequences)
    scored = sum(n for _, n in sequences)
    return (rows * longest * 8 + pass_bytes(sizes, rows, longest, longest, masked=False)
            + rows * longest * sizes.n_embd * sizes.elem
            + logit_bytes(sizes, scored, scoring_bytes_per_logit(sizes)))


def _sequence(tokenizer: Tokenizer, context: str, choice: str, window: int) -> tuple[list[int], int]:
    """(input ids, count of continuation ids): the model reads the ids before each target."""
    head, continuation = choice_tokens(tokenizer, context, choice)
    if not continuation:
        raise GptcliError(f"choice {choice!r} encodes to no tokens after its context")
    whole = (head + continuation)[-(window + 1):]
    return whole, min(len(continuation), len(whole) - 1)


def _loglikelihoods(model: Model, sequences: list[tuple[list[int], int]], device: torch.device) -> Iterator[float]:
    """Sum of the continuation's log-probabilities for each (ids, continuation length). Only
    the positions that predict a continuation token go through the head: at GPT-2's
    vocabulary, logits of every position of 32 sequences of 100 tokens would take 640 MB."""
    longest = max(len(ids) - 1 for ids, _ in sequences)
    inputs = torch.zeros(len(sequences), longest, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (ids, n) in enumerate(sequences):
        T = len(ids) - 1
        inputs[row, :T] = torch.tensor(ids[:-1])
        rows += [row] * n
        positions += range(T - n, T)
        targets += ids[-n:]
    hidden = model.hidden_states(inputs.to(device))  # (N, T, C)
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (K, C)
    logprobs = torch.log_softmax(model.logits(picked).float(), dim=-1)  # (K, V)
    chosen = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0].double().cpu()
    start = 0
    for _, n in sequences:
        yield float(chosen[start:start + n].sum())
        start += n


def eval_choice_checkpoint(checkpoint: str | Path | None, task: str, data: str | Path, limit: int | None = None,
                           batch_size: int = 8, precision: str = "fp32", device: str = "auto",
                           on_event: EventSink = ignore, quantize: str = "none") -> tuple[Path, dict]:
    """acc and acc_norm of a language-model checkpoint on a multiple-choice file. `precision`
    auto is fp32 (the harness's default for a float32 export); `quantize` int8 scores it
    with int8 linear layers (the CLI's `--quantize`)."""
    items = read_items(task, data, limit)
    path, model, tokenizer, dev = load_lm_for_eval(checkpoint, device, precision, quantize)
    precision_ = resolve_precision("fp32" if precision == "auto" else precision, dev, option="--precision")
    started = time.perf_counter()
    with precision_.autocast():
        result = score_items(model, tokenizer, items, batch_size, on_event)
    seconds = time.perf_counter() - started
    metrics = {"task": task, "data": str(data), **result.metrics(), "precision": precision_.name,
               "seconds": seconds, "items_per_second": len(items) / seconds}
    return path, metrics


class ChoiceTasks:
    """Multiple-choice tasks of `train.eval_tasks`, scored at every evaluation of a run. The
    files are read when the run starts, so a bad one stops it before training."""

    def __init__(self, tasks: list[EvalTask], tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tasks = [(task.metric_name, read_items(task.task, task.data, task.limit)) for task in tasks]

    def scores(self, model: Model, precision: Precision) -> dict[str, float]:
        """`NAME/acc` and `NAME/acc_norm` of every task (none without tasks)."""
        metrics = {}
        for name, items in self.tasks:
            with precision.autocast():
                result = score_items(model, self.tokenizer, items).metrics()
            metrics[f"{name}/acc"], metrics[f"{name}/acc_norm"] = result["acc"], result["acc_norm"]
        return metrics
