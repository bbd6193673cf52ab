"""Continuous batching: many independent generation requests decoded as one batch.

A `BatchEngine` owns one KV cache of `max_batch` rows (each the whole context long) and a
thread that loops:

1. admit waiting jobs, oldest first, while rows are free: each prompt is prefilled alone
   into its rows and its first tokens sampled (a job with n choices takes n rows);
2. one decode step for every active row at once, each at its own position (per-row
   `input_pos`, kv_cache.py), attending over the slots up to the furthest row's position;
3. sample each job's next tokens, turn them into text (SampleText: whole characters, stop
   strings) and hand the text to the job's `emit` callback;
4. drop finished and cancelled jobs, moving the last rows into the freed ones so that the
   active rows stay 0..A-1 and a step computes no idle row.

So a request joins at the next step rather than waiting for a batch to drain, and a
finished one leaves at once. Prefill is not chunked: a long prompt delays everyone's next
step by its prefill time.

Sampling follows `generate_tokens` draw for draw: a job's rows are sampled together, with
its own generator when it has a seed, so a seeded or greedy request alone in the engine
gives the tokens `gptcli sample` gives.

Shapes: S rows (max_batch), A active rows, V vocabulary, L context.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.infer.generate import (
    SPAN_STEP,
    SampleText,
    SamplingSettings,
    next_token,
    prefill,
)
from gptcli.infer.speculative import Speculation, verify
from gptcli.model import Model
from gptcli.model.budget import (
    SAMPLING_BYTES_PER_LOGIT,
    Sizes,
    kv_cache_bytes,
    logit_bytes,
    pass_bytes,
)

log = logging.getLogger(__name__)  # errors go to the server's log (the library prints nothing)


@dataclass(frozen=True)
class Update:
    """Text for one choice of a job. `finish` is set on its last update: "stop" (end of
    text, a stop id or a stop string), "length" (the token budget) or "cancelled"."""

    choice: int
    text: str
    finish: str | None = None
    tokens: int = 0  # tokens this choice generated, on its last update
    ids: tuple[int, ...] = ()  # on its last update: the ids of its text (stop ids left out)
    stop_id: int | None = None  # on its last update: the stop id that ended it, if one did


@dataclass(eq=False)
class Job:
    """One request: `n` continuations of `prompt`. `emit` is called from the engine's
    thread with each Update, in order; it must be quick (hand the update to a queue)."""

    prompt: list[int]
    max_new_tokens: int
    settings: SamplingSettings
    emit: Callable[[Update], None]
    n: int = 1
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    cancelled: bool = False  # set from any thread (`cancel`); the engine drops the job at its next step

    def cancel(self) -> None:
        self.cancelled = True


class _Running:
    """A job in the batch: its texts, token counts and its generator."""

    def __init__(self, job: Job, tokenizer: Tokenizer, device: torch.device, finished: Counter):
        self.job = job
        self.tally = finished  # the engine's count of finished choices by reason
        self.texts = [SampleText(tokenizer, job.stops, job.stop_ids) for _ in range(job.n)]
        self.counts = [0] * job.n
        self.finished = [False] * job.n
        self.generator = None if job.seed is None else torch.Generator(device=device).manual_seed(job.seed)
        self.position = len(job.prompt)  # where its next token goes (the same for all its rows)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def take(self, tokens: list[int]) -> None:
        """One sampled token per choice: emit the text it releases; finish a choice at a stop
        or at the budget. A finished choice's row keeps decoding (its tokens are ignored) so
        the job's rows are sampled together, as `generate_tokens` does."""
        for choice, token in enumerate(tokens):
            if self.finished[choice]:
                continue
            text = self.texts[choice]
            self.counts[choice] += 1
            delta = text.add(token)
            if text.stopped:
                self._finish(choice, delta, "stop")
            elif self.counts[choice] == self.job.max_new_tokens:
                self._finish(choice, delta + text.finish(), "length")
            elif delta:
                self.job.emit(Update(choice, delta))

    def end(self, reason: str) -> None:
        """Finish every choice still going with `reason` ("cancelled", "error")."""
        for choice in range(self.job.n):
            if not self.finished[choice]:
                self._finish(choice, "", reason)

    def _finish(self, choice: int, text: str, reason: str) -> None:
        self.finished[choice] = True
        self.tally[reason] += 1
        sample = self.texts[choice]
        self.job.emit(Update(choice, text, reason, self.counts[choice], tuple(sample.tokens), sample.stop_id))


class BatchEngine:
    """Serves Jobs on `model` from a background thread (`start`, `submit`, `stop`)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 16,
                 speculation: Speculation | None = None):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.speculation = speculation  # used while one row decodes alone (`_speculate`)
        self.context = model.config.block_size
        self.device = next(model.parameters()).device
        self.cache = model.new_kv_cache(max_batch, self.context)  # (S, nkv, L, hs) per layer
        self.finished: Counter[str] = Counter()  # choices ended, by reason (for /health and tests)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopped = False  # set once by `stop`: no more jobs
        self._done: Future | None = None  # the loop's, once started
        # Row r of the batch: the job it belongs to and which of its choices it is.
        self._rows: list[tuple[_Running, int]] = []
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # last token per row
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # where it goes

    @staticmethod
    def bytes_needed(model: Model, max_batch: int) -> int:
        """The memory an engine of `max_batch` rows takes beyond the weights (model/budget.py):
        its KV cache, every row a whole context long; the larger of one prompt's prefill (a
        row alone, up to the context) and a step of every row; and a row of logits each,
        with sampling's working copies."""
        sizes, context = Sizes.of(model), model.config.block_size
        forward = max(pass_bytes(sizes, 1, context, context, masked=True),
                      pass_bytes(sizes, max_batch, 1, context, masked=True))
        return (kv_cache_bytes(sizes, max_batch, context) + forward
                + logit_bytes(sizes, max_batch, SAMPLING_BYTES_PER_LOGIT))

    def check(self, job: Job) -> None:
        """Refuse a job the engine could never run (the server checks first, with messages
        for users; this guards the engine's own invariants)."""
        if not 1 <= job.n <= self.max_batch:
            raise ValueError(f"n={job.n} must be 1..{self.max_batch}")
        if not job.prompt or len(job.prompt) + job.max_new_tokens > self.context or job.max_new_tokens < 1:
            raise ValueError(f"prompt of {len(job.prompt)} tokens + {job.max_new_tokens} new must fit "
                             f"the {self.context}-token context")

    def start(self, worker: Executor | None = None) -> BatchEngine:
        """Start decoding (jobs may be submitted before): on `worker`, a one-thread executor
        that did the model's other torch work, or on a thread of its own.

        One thread for all of it matters on CPU: once a second thread runs parallel torch
        ops, libgomp has more threads than cores and stops spinning at its barriers, and
        every op pays a futex wake-up (a 16 x 384 by 384 x 1152 product measured 45 us
        on the first thread, 135 us on a second one after it, 2 cores)."""
        worker = worker or ThreadPoolExecutor(1, thread_name_prefix="gptcli-engine")
        self._done = worker.submit(self._loop)
        return self

    def submit(self, job: Job) -> None:
        self.check(job)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(job)
            self._wake.notify()

    def run(self, jobs: list[Job]) -> None:
        """Decode `jobs` to their end on the calling thread, then return: for evaluation and
        rollouts, where one caller brings all the work (a server `start`s the thread instead).
        A failing step raises, after ending every job it had with "error"."""
        if self._done is not None:
            raise RuntimeError("the engine runs on its own thread; submit jobs to it instead")
        for job in jobs:
            self.check(job)
        self._waiting.extend(jobs)
        with torch.inference_mode():
            while self._rows or self._waiting:
                with self._wake:
                    admitted = self._admissible()
                try:
                    self._advance(admitted)
                except BaseException:
                    self._end_all(admitted + [*self._waiting], "error")
                    self._waiting.clear()
                    raise

    def stop(self) -> None:
        """Cancel every waiting and running job (each gets its "cancelled" updates) and end
        the thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._done is not None:
            self._done.result()

    @property
    def load(self) -> tuple[int, int]:
        """(rows decoding, jobs waiting): for /health and tests."""
        return len(self._rows), len(self._waiting)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._rows and not self._waiting:
                    self._wake.wait()
                if self._stopped:
                    break
                admitted = self._admissible()
            try:
                self._advance(admitted)
            except Exception:  # a bug or out of memory: fail what is in flight, keep serving
                log.exception("a generation step failed; its requests end with finish reason 'error'")
                self._end_all(admitted, "error")
        with self._wake:
            waiting = [*self._waiting]
            self._waiting.clear()
        self._end_all(waiting, "cancelled")

    def _advance(self, admitted: list[Job]) -> None:
        """Admit `admitted` (each removed from the list once it runs, so a failure ends
        only those still waiting in it), then one decode step."""
        while admitted:
            self._admit(admitted[0])
            admitted.pop(0)
        self._drop_finished()
        if self._rows:
            self._step()
            self._drop_finished()

    def _end_all(self, jobs: list[Job], reason: str) -> None:
        """End every running job and `jobs` (not yet running, or half admitted) with `reason`."""
        running = {id(r): r for r, _ in self._rows}
        ended = {id(r.job) for r in running.values()}
        running.update({id(job): _Running(job, self.tokenizer, self.device, self.finished) for job in jobs
                        if id(job) not in ended})
        for r in running.values():
            r.end(reason)
        self._rows.clear()

    def _admissible(self) -> list[Job]:
        """Waiting jobs that fit the free rows, oldest first (a large n waits for room
        rather than being overtaken forever); cancelled ones are dropped. Holds the lock."""
        taken, free = [], self.max_batch - len(self._rows)
        while self._waiting and (self._waiting[0].cancelled or self._waiting[0].n <= free):
            job = self._waiting.popleft()
            if job.cancelled:
                _Running(job, self.tokenizer, self.device, self.finished).end("cancelled")
                continue
            taken.append(job)
            free -= job.n
        return taken

    def _admit(self, job: Job) -> None:
        """Prefill the prompt into a free row, copy it to the job's other rows and sample
        each choice's first token."""
        running = _Running(job, self.tokenizer, self.device, self.finished)
        first = len(self._rows)
        prompt = torch.tensor([job.prompt], dtype=torch.long, device=self.device)  # (1, T)
        logits = prefill(self.model, self.cache.rows(first, first + 1), prompt)  # (1, V)
        for choice in range(1, job.n):
            self.cache.copy_row(first, first + choice, len(job.prompt))
        rows = slice(first, first + job.n)
        tokens = next_token(logits.expand(job.n, -1), job.settings, running.generator)  # (n,)
        self._tokens[rows] = tokens
        self._positions[rows] = running.position
        self._rows += [(running, choice) for choice in range(job.n)]  # last: a failure above leaves no row
        running.take(tokens.tolist())

    def _step(self) -> None:
        """One token for every active row, each at its own position (or several for a row
        decoding alone, with speculation)."""
        active = len(self._rows)
        if self.speculation is not None and active == 1:
            self._speculate()
            return
        positions = self._positions[:active]
        furthest = max(r.position for r, _ in self._rows)
        span = min(self.context, (furthest // SPAN_STEP + 1) * SPAN_STEP)
        cache = self.cache.rows(0, active).prefix(span)
        hidden = self.model.hidden_states(self._tokens[:active, None], cache, positions[:, None])
        logits = self.model.logits(hidden[:, -1])  # (A, V)
        greedy = logits.argmax(dim=-1)  # every greedy job's tokens in one op
        # Each job's rows in the order of its choices: moving rows to fill holes can
        # reorder them, and a job's choices are sampled together, choice i from row i.
        jobs: dict[int, tuple[_Running, list[int]]] = {}
        for row, (running, choice) in sorted(enumerate(self._rows), key=lambda item: item[1][1]):
            jobs.setdefault(id(running), (running, []))[1].append(row)
        for running, rows in jobs.values():
            try:
                tokens = greedy[rows] if running.job.settings.greedy else \
                    next_token(logits[rows], running.job.settings, running.generator)
            except RuntimeError:  # this job's sampling failed (a bug): end it alone
                log.exception("sampling failed for one request; it ends with finish reason 'error'")
                running.end("error")
                continue
            self._tokens[rows] = tokens
            running.position += 1
            running.take(tokens.tolist())
        self._positions[:active] += 1

    def _speculate(self) -> None:
        """Row 0, alone in the batch: the proposer's guesses after its text so far, checked in
        one pass (speculative.verify), so one step gives one or more tokens. Only alone: at
        batch 1 a step streams every weight for a single token, which a verification of k + 1
        positions shares; with more rows the step already shares them, and guesses would be
        a pass of rows x (k + 1) positions for fewer kept tokens (BENCHMARKS.md measures
        batch 8). A row's own text is its history: its last token is not yet cached."""
        running, _ = self._rows[0]
        spec, job = self.speculation, running.job
        history = job.prompt + running.texts[0].tokens
        k = min(spec.k, job.max_new_tokens - running.counts[0] - 1)  # k + 1 tokens at most: within budget and context
        tokens = verify(self.model, self.cache.rows(0, 1), history, running.position, k, job.settings,
                        spec.proposer, running.generator, spec.stats)
        for token in tokens:
            running.take([token])
            if running.done:
                return
        running.position += len(tokens)
        self._tokens[0] = tokens[-1]
        self._positions[0] += len(tokens)

    def _drop_finished(self) -> None:
        """Remove the rows of finished and cancelled jobs; fill each hole with the last row
        (its cache, token and position) so the active rows stay contiguous."""
        row = 0
        while row < len(self._rows):
            running, _ = self._rows[row]
            if running.job.cancelled and not running.done:
                running.end("cancelled")
            if not running.done:
                row += 1
                continue
            last = len(self._rows) - 1
            if row != last:
                moved, _ = self._rows[last]
                self.cache.copy_row(last, row, moved.position)
                self._tokens[row] = self._tokens[last]
                self._positions[row] = self._positions[last]
                self._rows[row] = self._rows[last]
            self._rows.pop()
