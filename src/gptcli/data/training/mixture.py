"""Weighted data mixtures: `data.inputs` as a list of `{path, weight, name}` sources.

Each source is tokenized on its own (the same cache as plain inputs) and training windows
are drawn from the sources in proportion to their weights. Like `step_rows`, every draw
is a pure function of (seed, step): row i of step s's global batch (batch_size x
grad_accum x processes rows) is global row r = s * rows_per_step + i, and

- its source comes from a low-discrepancy sequence over r: x_r = (B + r * A) mod 2**64
  with A = 2**64 / golden ratio (a Weyl sequence) and B from the seed; the row goes to
  the source whose slice of [0, 2**64) (cut by the cumulative weights) holds x_r. Over
  any run of consecutive rows each source's share stays within a few rows of its weight,
  so a small run already sees the proportions asked for;
- its start is drawn from the step's seeded stream, uniformly over its source's train split.

Each micro-step of each process takes its slice of the step's rows, so any split of the
global batch sees the same rows, and resuming re-derives them. The rows each source got
in the first N steps need no saved state either: the count of x_r in a slice over r < M
is a difference of two floor sums, computed exactly in O(log M) (`floor_sum`), which is
how `tokens_by_source` reports tokens seen per source at any step, on resume or in
`gptcli info`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from gptcli.config import DataConfig, DataSource
from gptcli.data.training.dataset import STREAMS, TokenDataset, prepare_dataset
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.events import EventSink, ignore
from gptcli.runtime import Distributed

_SPAN = 1 << 64  # the sequence x_r lives in [0, 2**64)
_STEP = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: consecutive x_r spread out evenly


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum(floor((a * i + b) / m) for i in range(n)), exactly, for n >= 0, m >= 1, a, b >= 0,
    in O(log m) steps (the Euclid-like reduction of AtCoder's library)."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        top = a * n + b
        if top < m:
            return total
        n, b = divmod(top, m)
        m, a = a, m


@dataclass(frozen=True)
class Weights:
    """A mixture's sources as the sampler sees them: names, normalised weights, and the
    cut points of [0, 2**64) between consecutive sources (exact, from the weights as given)."""

    names: tuple[str, ...]
    shares: tuple[float, ...]
    cuts: tuple[int, ...]  # K - 1 ascending cut points; source k owns [cuts[k-1], cuts[k])

    @classmethod
    def of(cls, sources: list[DataSource]) -> Weights:
        exact = [Fraction(s.weight) for s in sources]
        total = sum(exact)
        cuts, running = [], Fraction(0)
        for w in exact[:-1]:
            running += w
            cuts.append(math.floor(running / total * _SPAN))
        return cls(tuple(s.name for s in sources), tuple(float(w / total) for w in exact), tuple(cuts))


def _offset(seed: int, stream: int) -> int:
    """B: where the seed starts the sequence, so different seeds interleave sources differently."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0])


def row_sources(weights: Weights, seed: int, stream: int, first_row: int, count: int) -> np.ndarray:
    """(count,) source indices of global rows first_row .. first_row + count - 1."""
    rows = np.arange(count, dtype=np.uint64) + np.uint64(first_row)
    x = rows * np.uint64(_STEP) + np.uint64(_offset(seed, stream))  # wraps mod 2**64, as intended
    return np.searchsorted(np.array(weights.cuts, dtype=np.uint64), x, side="right")


def rows_by_source(weights: Weights, seed: int, stream: int, rows: int) -> list[int]:
    """How many of global rows 0 .. rows - 1 went to each source (exact, without drawing them).

    Row r goes below cut c when (B + r A) mod M < c, i.e. when
    floor((B + r A) / M) - floor((B + r A + M - c) / M) + 1 is 1 (else it is 0)."""
    a, b = _STEP, _offset(seed, stream)
    whole = floor_sum(rows, _SPAN, a, b)
    below = [0] + [whole - floor_sum(rows, _SPAN, a, b + _SPAN - c) + rows for c in weights.cuts] + [rows]
    return [below[k + 1] - below[k] for k in range(len(weights.names))]


def tokens_by_source(data: DataConfig, seed: int, steps: int, rows_per_step: int,
                     block_size: int, stream: str = "train") -> dict[str, int]:
    """Training tokens (inputs) each source contributed in the first `steps` steps."""
    weights = Weights.of(data.resolved().inputs)
    counts = rows_by_source(weights, seed, STREAMS[stream], steps * rows_per_step)
    return {name: n * block_size for name, n in zip(weights.names, counts)}


@dataclass
class Mixture:
    """A mixture's sources opened for training: one tokenized dataset per source, one tokenizer."""

    weights: Weights
    datasets: list[TokenDataset]
    tokenizer: Tokenizer

    @classmethod
    def open(cls, data: DataConfig, seed: int, on_event: EventSink = ignore,
             dist: Distributed = Distributed()) -> Mixture:
        """Tokenize (once, into the cache) or open each source; all must share one tokenizer."""
        sources = data.resolved().inputs
        datasets = []
        for source in sources:
            alone = dataclasses.replace(data, inputs=[source.path])
            datasets.append(TokenDataset.open(prepare_dataset(alone, seed, on_event, dist=dist)))
        first = datasets[0].tokenizer
        for source, dataset in zip(sources, datasets):
            if dataset.tokenizer.fingerprint() != first.fingerprint():
                hint = (" (a char vocabulary is built from each source's own text: use bytes or a "
                        "fixed tokenizer)" if "char" in (first.name[:4], dataset.tokenizer.name[:4]) else "")
                raise GptcliError(
                    f"data.inputs: the sources do not share one tokenizer: {sources[0].name} has "
                    f"{first.name} ({first.vocab_size} ids), {source.name} has {dataset.tokenizer.name} "
                    f"({dataset.tokenizer.vocab_size} ids){hint}; tokenize every source with the same one")
        return cls(Weights.of(sources), datasets, first)

    @property
    def val_sha256(self) -> str:
        """A digest of every source's validation split, with its name and weight."""
        parts = [[n, w, d.val_sha256] for n, w, d in zip(self.weights.names, self.weights.shares, self.datasets)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def check_context(self, block_size: int) -> None:
        for dataset in self.datasets:
            dataset.check_context(block_size)

    def describe(self) -> str:
        """Per source: name, share and train/val tokens (the run header)."""
        return "; ".join(f"{name} {share:.0%}: {len(d.splits['train']):,} train / {len(d.splits['val']):,} val tokens"
                         for name, share, d in zip(self.weights.names, self.weights.shares, self.datasets))

    def combine(self, per_source: dict[str, dict[str, float]]) -> dict[str, float]:
        """The mixture's validation metrics from each source's (`val_loss`, `val_bpb`):
        val_loss is the weighted mean; val_bpb is bits over bytes of the weighted mix
        (mean bits per token / mean bytes per token); plus `val_loss/NAME` and `val_bpb/NAME`."""
        shares = dict(zip(self.weights.names, self.weights.shares))
        loss = sum(shares[n] * m["val_loss"] for n, m in per_source.items())
        bytes_per_token = sum(shares[n] * d.bytes_per_token["val"]
                              for n, d in zip(self.weights.names, self.datasets))
        metrics = {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}
        for name, m in per_source.items():
            metrics.update({f"{key}/{name}": value for key, value in m.items()})
        return metrics


class MixtureSampler:
    """BatchSampler's counterpart for a mixture: windows of block_size + 1 tokens, each
    row's source and start a pure function of (seed, step, row); see the module doc."""

    def __init__(self, mixture: Mixture, batch_size: int, block_size: int, seed: int,
                 device: torch.device, grad_accum: int = 1, world_size: int = 1):
        self.mixture = mixture
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.stream = STREAMS["train"]
        self.device = device
        self.per_step = batch_size * grad_accum * world_size
        self.world_size = world_size
        self.highs = np.array([len(d.splits["train"]) - block_size for d in mixture.datasets])  # (K,)
        self.pin = device.type == "cuda"

    def step_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, starts), each (per_step,): the whole global batch of one step."""
        sources = row_sources(self.mixture.weights, self.seed, self.stream, step * self.per_step, self.per_step)
        rng = np.random.default_rng([self.seed, self.stream, step])
        return sources, rng.integers(0, self.highs[sources])

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for this (step, micro-step, rank): x, y of shape (B, T), int64, on device."""
        sources, starts = self.step_rows(step)
        first = (micro * self.world_size + rank) * self.batch_size
        sources, starts = sources[first:first + self.batch_size], starts[first:first + self.batch_size]
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)  # (B, T+1)
        for k in np.unique(sources):
            mine = sources == k
            rows[mine] = self.mixture.datasets[k].splits["train"].windows(starts[mine], self.block_size + 1)
        rows = torch.from_numpy(rows)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.pin:  # pinned host memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Training tokens each source contributed in steps 0 .. steps - 1 (all processes)."""
        counts = rows_by_source(self.mixture.weights, self.seed, self.stream, steps * self.per_step)
        return {name: n * self.block_size for name, n in zip(self.mixture.weights.names, counts)}
