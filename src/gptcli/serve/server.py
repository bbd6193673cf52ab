"""uvicorn's server with the engine's countdown: after SIGINT or SIGTERM, in-flight requests
get `timeout` seconds to finish; then the engine cancels what is still generating, and
each handler answers its client (503, or an error event in a stream) while uvicorn waits
HANDLER_GRACE_S more, rather than uvicorn cancelling the handlers mid-response."""

from __future__ import annotations

import threading

import uvicorn

from gptcli.infer.engine import BatchEngine

HANDLER_GRACE_S = 5.0  # after the engine's cancel, for handlers to send their answers


class CountdownServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: BatchEngine | None, timeout: float):
        super().__init__(config)
        self.engine, self.timeout = engine, timeout
        self.countdown: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        """uvicorn's signal handler: stop accepting (uvicorn), and start the countdown."""
        super().handle_exit(sig, frame)
        if self.engine is not None and self.countdown is None:
            self.countdown = threading.Timer(self.timeout, self.engine.stop)
            self.countdown.daemon = True
            self.countdown.start()
