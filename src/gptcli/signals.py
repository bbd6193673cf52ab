"""Graceful stops: the first SIGINT/SIGTERM asks the training loop to finish its step,
save and exit; a second SIGINT/SIGTERM stops at once (checkpoints are written atomically,
so nothing is corrupted either way)."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager that records the first stop signal instead of dying on it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
