"""`gptcli serve`: load a checkpoint, start the batching engine, run uvicorn until a signal.

Start-up problems (a checkpoint that cannot be loaded, a port in use, a missing extra) are
GptcliErrors: one line and exit 2, before anything listens. The socket is bound here, not
by uvicorn, for that reason, and so that `--port 0` can report the port it was given.

On SIGINT or SIGTERM uvicorn stops accepting connections and lets in-flight requests
finish for up to `shutdown_timeout` seconds; then the engine cancels whatever is left
(streams end, non-streamed requests get 503) and the process exits with code 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gptcli.errors import GptcliError
from gptcli.infer.quantize import QUANTIZE_CHOICES
from gptcli.infer.speculative import draft_problems
from gptcli.runtime import DTYPES

API_KEY_ENV = "GPTCLI_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: GPTCLI_API_KEY if set, else no key
    model_name: str | None = None  # None: the run's name
    max_batch: int = 16
    max_body_bytes: int = 1 << 20
    device: str = "auto"
    precision: str = "auto"
    quantize: str = "none"  # none | int8 (infer/quantize.py)
    draft: str | None = None  # speculative decoding: a draft checkpoint or "ngram" (infer/speculative.py)
    draft_tokens: int = 4
    shutdown_timeout: float = 10.0

    def check(self) -> None:
        problems = []
        if self.max_batch < 1:
            problems.append(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be 0..65535 (0: any free port), got {self.port}")
        if self.max_body_bytes < 1024:
            problems.append(f"--max-body must be at least 1024 bytes, got {self.max_body_bytes}")
        if self.precision not in ("auto", *DTYPES):
            problems.append(f"--precision must be auto, {', '.join(DTYPES)}, got {self.precision}")
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize}")
        if self.shutdown_timeout < 0:
            problems.append(f"--shutdown-timeout must be 0 or more, got {self.shutdown_timeout}")
        problems += draft_problems(self.draft, self.draft_tokens)
        if problems:
            raise GptcliError("; ".join(problems))


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise GptcliError(f"gptcli serve needs {' and '.join(missing)}: pip install 'gptcli[serve]'")


def serve(options: ServeOptions, on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve until SIGINT or SIGTERM. `on_ready(url)` is called once the socket listens."""
    options.check()
    require_serve_extra()
    import uvicorn

    from gptcli.serve.app import build_app
    from gptcli.serve.limits import BodyLimit
    from gptcli.serve.server import HANDLER_GRACE_S, CountdownServer

    # Every torch op of the server runs on this one thread: loading, the engine's loop,
    # classification (BatchEngine.start says why).
    worker = ThreadPoolExecutor(1, thread_name_prefix="gptcli-model")
    try:
        served = worker.submit(load_served, options, worker).result()
    except BaseException:
        worker.shutdown()
        raise
    sock = _bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    if served.engine:
        served.engine.start(worker)
    app = BodyLimit(build_app(served), options.max_body_bytes)
    # uvicorn's own grace period is longer than ours: when ours ends the engine cancels what
    # is left, and handlers still have time to answer (503, or an error event) before
    # uvicorn would cancel them mid-response.
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=options.shutdown_timeout + HANDLER_GRACE_S)
    server = CountdownServer(config, served.engine, options.shutdown_timeout)
    on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    # uvicorn handles SIGINT/SIGTERM while it runs, then raises the signal again once it has
    # shut down; by then the shutdown is done, so these no-op handlers absorb it: exit 0.
    previous = {sig: signal.signal(sig, _absorb) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        if served.engine:
            served.engine.stop()
        worker.shutdown()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _absorb(signum, frame) -> None:
    """A signal that arrives after the server has stopped: nothing left to stop."""


def load_served(options: ServeOptions, worker: Executor):
    """The checkpoint, loaded and ready: the model for generation (or classification), its
    tokenizer, the engine, and the id clients name it by. Runs on `worker`, the thread
    that will run the model."""
    from gptcli.infer.engine import BatchEngine
    from gptcli.infer.load import Classifier, load
    from gptcli.infer.speculative import speculation_for
    from gptcli.model.budget import check_batch_fits
    from gptcli.serve.app import Served

    api_key = options.api_key if options.api_key is not None else os.environ.get(API_KEY_ENV) or None
    # A classifier reads texts and pools states as it was trained to (its stored settings).
    loaded = load(options.checkpoint, options.device, options.precision, options.quantize)
    name = options.model_name or model_id(loaded.path)
    if isinstance(loaded, Classifier):
        if options.draft is not None:
            raise GptcliError(f"--draft speeds up generation; {loaded.path} is a classifier: leave --draft out")
        return Served(name, loaded, worker, None, api_key, options.max_batch)
    model = loaded.model
    rows, context = options.max_batch, model.config.block_size
    check_batch_fits(f"--max-batch {rows}", rows, lambda n: BatchEngine.bytes_needed(model, n),
                     f"the KV cache, activations and logits of {rows:,} rows of {context:,} tokens",
                     "lower --max-batch", next(model.parameters()).device)  # before the engine allocates its rows
    speculation = speculation_for(options.draft, options.draft_tokens, loaded, options.precision, options.quantize)
    engine = BatchEngine(model, loaded.tokenizer, options.max_batch, speculation)
    return Served(name, loaded, worker, engine, api_key, options.max_batch, draft=options.draft)


def model_id(path: Path) -> str:
    """The name clients use: the run's name for a run checkpoint (runs/NAME/checkpoints/
    step-N), else the directory's name (an imported model)."""
    path = path.resolve()
    if path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.name


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise GptcliError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, protocol, _, address = infos[0]
    # With the protocol named (TCP), asyncio sets TCP_NODELAY on accepted connections; with
    # 0 it does not, and Nagle's algorithm held each first streamed token ~30 ms on a reused one.
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "pick another with --port" if exc.errno == 98 else "check --host and --port"
        raise GptcliError(f"cannot listen on {host}:{port} ({exc.strerror}); {hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
