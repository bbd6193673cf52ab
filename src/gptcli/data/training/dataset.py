"""Token data for training: the tokenization cache, memory-mapped splits and batch sampling.

Batches are a pure function of (seed, split, step, micro-step, rank): resuming at step N
re-derives exactly the batches an uninterrupted run would have drawn, with no sampler
state to save, and any number of processes can each draw a disjoint stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcli.atomic import write_text
from gptcli.config import DataConfig
from gptcli.data.text.corpus import expand_inputs
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.data.tokenized.token_files import (
    META_FILE,
    SPLITS,
    TOKENIZER_DIR,
    is_tokenized_dir,
    read_meta,
    split_digest,
    split_shards,
)
from gptcli.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from gptcli.errors import GptcliError
from gptcli.events import EventSink, ignore
from gptcli.paths import cache_root
from gptcli.runtime import Distributed

# The seeded random streams batches are drawn from, one per kind of data: every draw is
# a function of (seed, stream, step), so no two kinds ever share random numbers.
STREAMS = {"train": 0, "val": 1, "classify": 2, "instruct": 3, "dpo": 4, "grpo": 5}


def _cache_key(cfg: DataConfig, seed: int, tokenizer: Tokenizer | None) -> str:
    """A digest of everything the tokenized result depends on: file contents, tokenizer, split."""
    digest = hashlib.sha256()
    if tokenizer is not None:
        tokenizer_key = tokenizer.fingerprint()
    elif Path(cfg.tokenizer).is_file():  # a .tiktoken file: its contents matter, not its name
        tokenizer_key = hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest()
    else:
        tokenizer_key = cfg.tokenizer
    settings = {"tokenizer": tokenizer_key, "val_fraction": cfg.val_fraction, "seed": seed,
                "text_field": cfg.text_field}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for source in expand_inputs(cfg.inputs):
        digest.update(str(source.path.resolve()).encode() + b"\0")
        with open(source.path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:24]


def prepare_dataset(cfg: DataConfig, seed: int, on_event: EventSink = ignore,
                    tokenizer: Tokenizer | None = None, dist: Distributed = Distributed()) -> Path:
    """The tokenized directory for `cfg.inputs`: given directly, or made (once) in the cache.
    `tokenizer` (finetuning: the checkpoint's) replaces `cfg.tokenizer` when given. Under
    torchrun, rank 0 tokenizes while the other ranks wait, then they read its result (or
    fail with its error, in one line each); a node that does not share rank 0's cache
    makes its own."""
    if len(cfg.inputs) == 1 and is_tokenized_dir(cfg.inputs[0]):
        return Path(cfg.inputs[0])
    target = cache_root() / _cache_key(cfg, seed, tokenizer)

    def tokenize() -> None:
        tokenize_corpus(cfg.inputs, target, tokenizer=tokenizer or cfg.tokenizer, val_fraction=cfg.val_fraction,
                        seed=seed, text_field=cfg.jsonl_field, overwrite=True, on_event=on_event)

    problem = None
    if dist.is_main and not is_tokenized_dir(target):
        try:
            tokenize()
        except GptcliError as exc:  # every rank stops with it, none waits forever
            problem = str(exc)
    problem = dist.from_main(problem)  # the other ranks wait here for rank 0's verdict
    if problem is not None:
        raise GptcliError(problem)
    if not is_tokenized_dir(target):  # another node, whose cache is not rank 0's
        tokenize()
    return target


_VERIFIED = ".verified.json"  # per shard: the version (size, mtime, checksum) verified, its largest id
_CHUNK_BYTES = 1 << 24  # a shard is read 16 MiB at a time: flat memory at any size


def _check_shard(file: Path, dtype: np.dtype, tokens: int, sha256: str, vocab_size: int) -> None:
    """A token file must have the size and checksum meta.json recorded, and hold only ids
    below `vocab_size`. Checksum and largest id come from one pass, made once per version
    of the file (remembered by size, mtime and checksum), not every run."""
    expected_bytes = tokens * dtype.itemsize
    if not file.is_file() or file.stat().st_size != expected_bytes:
        raise GptcliError(f"{file} is missing or has the wrong size ({expected_bytes} bytes expected "
                          f"from {META_FILE}): it changed since tokenizing; tokenize the corpus again")
    stamp_path = file.parent / _VERIFIED
    info = file.stat()
    key = f"{info.st_size}:{info.st_mtime_ns}:{sha256}"
    stamps = _read_stamps(stamp_path)
    largest = _remembered_largest(stamps.get(file.name), key)
    if largest is None:
        digest, largest = _digest_and_largest(file, dtype)
        if digest != sha256:
            raise GptcliError(f"{file} does not match the checksum in {META_FILE}: it changed since "
                              f"tokenizing; tokenize the corpus again")
        try:
            write_text(stamp_path, json.dumps({**stamps, file.name: {"key": key, "largest_id": largest}}),
                       fsync=False)
        except OSError:
            pass  # a read-only dataset is verified again next time
    if largest >= vocab_size:
        raise GptcliError(f"{file} holds token id {largest}, but its tokenizer has {vocab_size} ids "
                          f"(0 to {vocab_size - 1}): the tokens were not made by this tokenizer; "
                          f"tokenize the corpus again")


def _read_stamps(path: Path) -> dict:
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _remembered_largest(stamp: object, key: str) -> int | None:
    """The largest id a stamp recorded for this version of the file; None if it is for
    another version (or from an older gptcli, which remembered no ids)."""
    if isinstance(stamp, dict) and stamp.get("key") == key and isinstance(stamp.get("largest_id"), int):
        return stamp["largest_id"]
    return None


def _digest_and_largest(file: Path, dtype: np.dtype) -> tuple[str, int]:
    """The sha256 and the largest token id (-1 if empty) of a token file, in one chunked pass."""
    digest, largest = hashlib.sha256(), -1
    buffer = bytearray(_CHUNK_BYTES)  # a multiple of every token size, so no id straddles chunks
    with open(file, "rb") as f:
        while size := f.readinto(buffer):  # full chunks until the last (a buffered reader)
            digest.update(memoryview(buffer)[:size])
            ids = np.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize)
            largest = max(largest, int(ids.max()))
    return digest.hexdigest(), largest


class SplitTokens:
    """One split's token ids, stored as one or more shard files, read as one sequence:
    shard k's ids follow shard k-1's. Each shard is a read-only memory map."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.ends = np.cumsum([len(shard) for shard in shards])  # (S,): where each shard ends

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids start..stop-1 as int64, across shard boundaries."""
        parts = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[shard - 1]) if shard else 0
            end = min(stop, int(self.ends[shard]))
            parts.append(self.shards[shard][start - begin:end - begin])
            start, shard = end, shard + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(B, length) int64: the `length` ids from each of `starts` (B,)."""
        if len(self.shards) == 1:  # one gather, as a single token file always was
            return self.shards[0][starts[:, None] + np.arange(length)].astype(np.int64)
        return np.stack([self.read(int(start), int(start) + length) for start in starts])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All ids in one array (validation streams; not for a whole training corpus)."""
        whole = self.read(0, len(self))
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class TokenDataset:
    """A tokenized directory opened for training: memory-mapped splits and the tokenizer."""

    path: Path
    tokenizer: Tokenizer
    splits: dict[str, SplitTokens]
    bytes_per_token: dict[str, float]
    val_sha256: str  # a digest of the val split's shards' checksums, from meta.json

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        path = Path(path)
        meta = read_meta(path)
        tokenizer = load_tokenizer(path / TOKENIZER_DIR)
        dtype = np.dtype(meta["dtype"])
        splits, bytes_per_token = {}, {}
        for split in SPLITS:
            shards = []
            for shard in split_shards(meta, split):
                file = path / shard["file"]
                _check_shard(file, dtype, shard["tokens"], shard["sha256"], tokenizer.vocab_size)
                shards.append(np.memmap(file, dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype))
            splits[split] = SplitTokens(shards)
            info = meta["splits"][split]
            bytes_per_token[split] = info["bytes"] / max(info["tokens"], 1)
        return cls(path, tokenizer, splits, bytes_per_token, split_digest(meta, "val"))

    def check_context(self, block_size: int) -> None:
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size:
                raise GptcliError(
                    f"the {split} split of {self.path} has {len(tokens)} tokens, too few for "
                    f"model.block_size={block_size}; use more data or a smaller block_size"
                )


def step_rows(seed: int, stream: int | tuple[int, ...], step: int, micro: int, rank: int, batch_size: int,
              per_step: int, world_size: int, high: int) -> np.ndarray:
    """The `batch_size` random indices in [0, high) for one (step, micro-step, rank).

    The step's whole global batch (`per_step` = batch_size x grad_accum x world_size
    indices) comes from one stream seeded by (seed, stream, step); each micro-step of each
    rank takes its slice. Any split of the same global batch therefore sees the same rows.
    `stream` is a number of STREAMS, or a tuple of numbers naming a sub-stream.
    """
    rng = np.random.default_rng([seed, *np.atleast_1d(stream), step])
    rows = rng.integers(0, high, size=per_step)
    first = (micro * world_size + rank) * batch_size
    return rows[first:first + batch_size]


class BatchSampler:
    """Random windows of `block_size + 1` tokens: inputs x and next-token targets y.

    Window starts come from `step_rows`: any split of the same global batch, over
    processes or micro-steps, trains on exactly the same sequences, so 2 processes equal 1
    process with twice the batch, and a run can resume with a different number of processes.
    """

    def __init__(self, tokens: SplitTokens, batch_size: int, block_size: int, seed: int,
                 split: str, device: torch.device, grad_accum: int = 1, world_size: int = 1):
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.stream = STREAMS[split]
        self.device = device
        self.per_step = batch_size * grad_accum * world_size
        self.world_size = world_size
        self.pin = device.type == "cuda"

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for this (step, micro-step, rank): x, y of shape (B, T), int64, on device."""
        starts = step_rows(self.seed, self.stream, step, micro, rank, self.batch_size, self.per_step,
                           self.world_size, len(self.tokens) - self.block_size)
        rows = torch.from_numpy(self.tokens.windows(starts, self.block_size + 1))  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.pin:  # pinned host memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
