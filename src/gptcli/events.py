"""Events the library reports while it works; the CLI renders them, tests may collect them.

Nothing below `cli.py` prints: long-running functions take an `on_event` callable and
call it with one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units of `phase` (bytes for reading, merges for BPE training)."""

    phase: str
    done: int
    total: int
    tokens: int = 0
    files: int = 0  # input files finished (tokenizing)
    files_total: int = 0


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an error (a fallback taken, a crop made)."""

    message: str


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    facts: dict[str, Any]  # parameters, tokenizer, device, precision, ... for a header table
    max_steps: int
    start_step: int


@dataclass(frozen=True)
class StepLogged:
    metrics: dict[str, Any]  # step, loss, lr, tokens_per_sec, mfu, ...


@dataclass(frozen=True)
class EvalDone:
    metrics: dict[str, Any]  # step, val_loss, val_bpb, best


@dataclass(frozen=True)
class CheckpointSaved:
    path: str
    step: int
    best: bool = False


@dataclass(frozen=True)
class RunFinished:
    summary: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[object], None]


def ignore(_event: object) -> None:
    """The default sink: drop every event."""
