"""Graceful stops: the first SIGINT, SIGTERM or SIGUSR1 asks the training loop to finish
its step, save and exit; a second one stops at once (checkpoints are written atomically,
so nothing is corrupted either way). SIGTERM is what a scheduler sends before it takes the
machine back (and torchrun passes on to its workers), SIGUSR1 what Slurm sends ahead of a
time limit with `--signal=USR1@SECONDS`. Before and after the loop, SIGTERM interrupts
like Ctrl-C, so a command's cleanup runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """Context manager that records the first stop signal instead of dying on it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else []))

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, instead of ending the process on the
    spot: cleanup in `finally` blocks runs (a run directory claimed for --overwrite puts the
    old run back). The training loop's StopRequest takes over while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
