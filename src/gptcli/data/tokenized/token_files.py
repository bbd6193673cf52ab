"""The on-disk layout of a tokenized directory, and the writer of its shard files.

    meta.json         format, tokenizer spec, dtype, and per split: counts and its shards
                      [{"file", "tokens", "sha256"}]; per source: its token ranges
    train-00000.bin   a split's ids, documents ended by the end-of-text id, cut into
    train-00001.bin   shards of exactly `shard_tokens` ids (the last one shorter): shard k
    ...               follows shard k-1 as if they were one file
    val-00000.bin
    tokenizer/        the tokenizer itself (tokenizer.py)
    .gptcli           the marker that lets `--overwrite` replace it (outputs.py)

Shards are cut by position in the split's stream, not at documents or files, so a split's
shards depend only on its ids: an interrupted and resumed run, a run in parts merged
afterwards and a single run write the same files. Directories written before shards
(format 1: one `train.bin` and `val.bin`) are read as splits of one shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from gptcli.errors import GptcliError

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
FORMAT = "gptcli-tokens/2"
READABLE_FORMATS = ("gptcli-tokens/1", FORMAT)  # 1: one file per split
SHARD_BYTES = 1 << 30  # default shard size: 1 GiB of ids


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def is_tokenized_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptcliError(f"{directory} is not a tokenized directory (no {META_FILE}); "
                          f"create one with `gptcli tokenize`") from None
    except (OSError, ValueError) as exc:
        raise GptcliError(f"{path} is unreadable or not JSON: {exc}") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise GptcliError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT}); "
                          f"it may come from a newer gptcli")
    return meta


def split_shards(meta: dict, split: str) -> list[dict]:
    """The shard files of a split in order, each {"file", "tokens", "sha256"}: the list of a
    sharded directory, or the one file of a directory written before shards."""
    info = meta["splits"][split]
    if "shards" in info:
        return info["shards"]
    return [{"file": info["file"], "tokens": info["tokens"], "sha256": info["sha256"]}]


def split_digest(meta: dict, split: str) -> str:
    """One digest for a split's content: its file's sha256 when it is one file (as before
    shards), else the sha256 of its shards' sha256s in order."""
    shards = split_shards(meta, split)
    if len(shards) == 1:
        return shards[0]["sha256"]
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


class ShardWriter:
    """Appends one split's ids to `split-NNNNN.bin` files of `shard_tokens` ids each.

    `written` ids already on disk (resuming) are kept: finished shards as listed in
    `finished`, the open one truncated to its share of `written` and hashed again; shard
    files after it (written after the last saved progress) are deleted."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 written: int = 0, finished: list[dict] | None = None):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.finished = list(finished or [])
        if len(self.finished) != written // shard_tokens:
            raise ValueError(f"{split}: {len(self.finished)} finished shards for {written} ids")
        self.written = written
        in_open = written - len(self.finished) * shard_tokens  # ids already in the open shard
        self._digest = hashlib.sha256()
        path = directory / shard_name(split, len(self.finished))
        self._file = open(path, "r+b" if in_open else "wb")
        if in_open:
            self._file.truncate(in_open * dtype.itemsize)
            while chunk := self._file.read(1 << 24):
                self._digest.update(chunk)
        for later in sorted(directory.glob(f"{split}-*.bin")):
            if later.name > path.name:
                later.unlink()

    @property
    def in_open(self) -> int:
        return self.written - len(self.finished) * self.shard_tokens

    def append(self, ids: np.ndarray) -> None:
        """Write `ids` (in this split's dtype), starting new shards where they fill."""
        while len(ids):
            room = self.shard_tokens - self.in_open
            part, ids = ids[:room], ids[room:]
            data = part.tobytes()
            self._file.write(data)
            self._digest.update(data)
            self.written += len(part)
            if self.in_open == self.shard_tokens:
                self._finish_shard()
                self._file = open(self.directory / shard_name(self.split, len(self.finished)), "wb")

    def flush(self) -> None:
        """Make the written ids durable (before progress that counts them is recorded)."""
        self._file.flush()

    def close(self) -> list[dict]:
        """Close the open shard (kept only if it holds ids, or if the split is empty) and
        return every shard's {"file", "tokens", "sha256"}."""
        if self.in_open or not self.finished:
            self._finish_shard()
        else:
            name = self._file.name
            self._file.close()
            Path(name).unlink()
        return self.finished

    def _finish_shard(self) -> None:
        name = Path(self._file.name).name
        self._file.close()
        self.finished.append({"file": name, "tokens": self.in_open, "sha256": self._digest.hexdigest()})
        self._digest = hashlib.sha256()
