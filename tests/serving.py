"""Servers for the serve tests: `gptcli serve` started in a subprocess on a free loopback
port (`--port 0`; the URL is read from its start-up line) and stopped with SIGTERM, the
small checkpoints they serve, and plain HTTP requests. conftest.py imports the fixtures."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, WithAddedTokens
from gptcli.model.gpt import GPT
from gptcli.store.checkpoint import save_checkpoint

CONTEXT = 64
START_TIMEOUT_S = 60


def random_model(vocab_size: int, seed: int = 0) -> GPT:
    """A random model with large weights, so that greedy text depends on the prompt and
    end-of-text is rare."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory):
    """A base language model over bytes."""
    return save_checkpoint(tmp_path_factory.mktemp("lm") / "base", random_model(BytesTokenizer.vocab_size),
                           BytesTokenizer(), "# lm\n")


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """An instruct-shaped model: gptcli's chat tokens after the byte vocabulary."""
    tokenizer = WithAddedTokens(BytesTokenizer(), CHAT_TOKENS)
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "assistant", random_model(tokenizer.vocab_size),
                           tokenizer, "# chat\n")


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path  # the server's stderr

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(checkpoint, *args: str, log_dir: Path, env: dict | None = None) -> Server:
    """`gptcli serve -c checkpoint --port 0 ARGS` in a subprocess, once it listens. Its
    stderr goes to a file (a pipe nobody reads could fill and block the server)."""
    log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log", dir=log_dir)[1])
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "-c", str(checkpoint), "--port", "0",
                                    "--device", "cpu", *args], stdout=subprocess.DEVNULL, stderr=log,
                                   env={**os.environ, **(env or {})})
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"serving at (http://\S+) ", log_path.read_text(errors="replace"))
        if found:
            return Server(process, found.group(1), log_path)
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise AssertionError(f"gptcli serve did not start: {log_path.read_text(errors='replace')[-2000:]}")


@pytest.fixture
def serve_process(tmp_path):
    """Start servers with `serve_process(checkpoint, *args)`; all are stopped at the end."""
    started = []

    def start(checkpoint, *args, env=None) -> Server:
        server = start_server(checkpoint, *args, log_dir=tmp_path, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def request(url: str, body: dict | bytes | None = None, method: str | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP request, with the standard library only (the tests
    check what a server answers to anything, not what one client library sends)."""
    parts = urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method or ("GET" if data is None else "POST"), parts.path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()
