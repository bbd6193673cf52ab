"""Encoding batches of text beside the reading and writing, in order, a batch at a time.

Two kinds behind one call, `submit(texts) -> Pending` (its `result()`: an id array per text):
  - one thread of this process, for one worker: the reading and writing overlap with the
    encoding, and nothing has to start up;
  - worker processes, for more: tiktoken's numpy encoder holds the GIL while it runs, so
    threads cannot encode on more than one core (BENCHMARKS.md, "Tokenizing at scale").
    Each worker loads the tokenizer from the directory it was saved to and sends back one
    flat array of ids and the length of each text's share (a list of arrays would be
    pickled one by one). Workers ignore Ctrl-C (the main process decides what happens) and
    exit when the main process dies, even by SIGKILL, so none is left behind.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gptcli.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from gptcli.errors import GptcliError


class WorkerLost(GptcliError):
    """A worker process died: not the input's fault, so the output so far is kept."""


class Pending:
    """A batch being encoded: `result()` waits for its ids, one array per text."""

    def __init__(self, future: Future, flat: bool):
        self.future, self.flat = future, flat

    def result(self) -> list[np.ndarray]:
        if not self.flat:
            return self.future.result()
        ids, lengths = self.future.result()
        return np.split(ids, np.cumsum(lengths)[:-1])


@contextmanager
def batch_encoder(tok: Tokenizer, tokenizer_dir: Path, dtype: np.dtype, processes: int
                  ) -> Iterator[Callable[[list[str]], Pending]]:
    """`submit(texts)` encoding on one thread (`processes` <= 1) or on `processes` worker
    processes that load the tokenizer saved in `tokenizer_dir`. Ids come back as `dtype`."""
    pool: Executor
    if processes <= 1:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptcli-batch")
        submit = lambda texts: Pending(pool.submit(_encode, tok, texts, dtype), flat=False)
    else:
        # spawn, not fork: the caller may hold threads (and torch may be imported), which a
        # forked child would inherit in whatever state they were in.
        pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(str(tokenizer_dir),))
        submit = lambda texts: Pending(pool.submit(_encode_in_worker, texts, dtype.str), flat=True)
    try:
        yield submit
    except BrokenProcessPool:  # from submit or a result
        raise WorkerLost(
            "an encoding worker process stopped (killed, or out of memory?); the batches written so far are "
            "kept: continue with --resume, or with --workers 1 (no worker processes). From a script, call "
            "tokenize_corpus under `if __name__ == '__main__':` (workers import the main script again)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text's ids as `dtype`, converted one text at a time (the encoder's own arrays,
    uint32 or int64, are held one at a time)."""
    return [np.asarray(tok.encode_batch([text])[0], dtype=dtype) for text in texts]


# In a worker process: its tokenizer, loaded once by _start_worker.
_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(parent_sentinel: int) -> None:
    """Wait for the main process to end, then end this one (nothing is left to do for it)."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _encode_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `texts` as one flat array, and each text's count of them."""
    assert _worker_tokenizer is not None
    arrays = _encode(_worker_tokenizer, texts, np.dtype(dtype))
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.dtype(dtype))), lengths
