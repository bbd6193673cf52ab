"""Raw text -> token shards: `train.bin`, `val.bin`, `meta.json` and the tokenizer.

Layout of a tokenized directory:

    meta.json     tokenizer spec, dtype, token/byte/document counts and sha256 per split, sources
    train.bin     flat array of token ids (uint16 if the vocabulary fits, else uint32);
    val.bin       documents separated by the end-of-text id
    tokenizer/    the tokenizer itself (see tokenizer.py)
    .gptcli       the marker that lets `--overwrite` replace it (see outputs.py)

The corpus is streamed piece by piece and encoded in batches with tiktoken's threaded
batch API, so memory stays flat. Everything is written into a temporary sibling
directory that is renamed into place at the end: a failure leaves no half dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcli.atomic import staging_dir
from gptcli.data.bpe import GPT2_PATTERN
from gptcli.data.corpus import Piece, Source, expand_inputs, iter_pieces, single_document_split
from gptcli.data.tokenizer import (
    Tokenizer,
    is_corpus_dependent,
    resolve_tokenizer,
    tiktoken_from_ranks,
)
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Notice, Progress, ignore
from gptcli.outputs import check_output_dir, input_paths, mark

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
FORMAT = "gptcli-tokens/1"
BATCH_BYTES = 1 << 24  # text gathered per encode_batch call (16 MiB)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_tokenized_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


class SplitAssigner:
    """Decides, document by document, whether a piece goes to train or val.

    A corpus of many documents is split at document level: document i goes to val when
    the sequence floor(i * f + u) steps up at i, with u drawn from the seed. Exactly a
    fraction f of documents goes to val, spread evenly through the (sorted) corpus, so
    val covers every folder. A corpus of one text file is split by position instead:
    its last fraction f of lines is val (as nanoGPT does for tiny Shakespeare).
    """

    def __init__(self, sources: list[Source], val_fraction: float, seed: int):
        self.fraction = val_fraction
        self.phase = random.Random(seed).random()
        one_file = len(sources) == 1 and not sources[0].is_jsonl
        self.split_offset = single_document_split(sources[0], val_fraction) if one_file else None
        self._document = 0

    def split_of(self, piece: Piece) -> str:
        if self.split_offset is not None:
            return "val" if piece.offset >= self.split_offset else "train"
        i, f, u = self._document, self.fraction, self.phase
        if piece.document_end:
            self._document += 1
        return "val" if math.floor((i + 1) * f + u) > math.floor(i * f + u) else "train"


@dataclass
class SplitStats:
    tokens: int = 0
    bytes: int = 0
    documents: int = 0


@dataclass
class TokenizeResult:
    out_dir: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    splits: dict[str, SplitStats]
    sources: int
    seconds: float


def _pieces(sources: list[Source], jsonl_field: str, val_fraction: float,
            seed: int) -> Iterator[tuple[str, Piece]]:
    assigner = SplitAssigner(sources, val_fraction, seed)
    for piece in iter_pieces(sources, jsonl_field, assigner.split_offset):
        yield assigner.split_of(piece), piece


def _build_tokenizer(spec: str | Tokenizer, sources: list[Source], jsonl_field: str, val_fraction: float,
                     seed: int, train_bpe: int | None, on_event: EventSink) -> Tokenizer:
    """The tokenizer for this corpus; BPE training and `char` vocabularies read it once first."""
    if train_bpe is not None:
        from gptcli.data.bpe import train_bpe as learn

        texts = (p.text for split, p in _pieces(sources, jsonl_field, val_fraction, seed)
                 if split == "train")
        try:
            ranks = learn(texts, train_bpe, on_progress=lambda done, total: on_event(
                Progress("training BPE", done, total)))
        except ValueError as exc:
            raise GptcliError(f"--train-bpe: {exc}") from None
        if len(ranks) + 1 < train_bpe:
            on_event(Notice(f"the corpus ran out of pairs to merge: the vocabulary has "
                            f"{len(ranks) + 1} ids, not {train_bpe}"))
        return tiktoken_from_ranks(ranks, f"bpe-{len(ranks) + 1}", GPT2_PATTERN)
    if isinstance(spec, Tokenizer):
        return spec
    if is_corpus_dependent(spec):
        return resolve_tokenizer(spec, (p.text for p in iter_pieces(sources, jsonl_field)))
    return resolve_tokenizer(spec)


def tokenize_corpus(
    inputs: list[str],
    out_dir: str | Path,
    tokenizer: str | Tokenizer = "gpt2",
    val_fraction: float = 0.1,
    seed: int = 1337,
    jsonl_field: str = "text",
    train_bpe: int | None = None,
    overwrite: bool = False,
    on_event: EventSink = ignore,
) -> TokenizeResult:
    """Tokenize raw inputs into a tokenized directory at `out_dir` (see module docstring)."""
    started = time.perf_counter()
    if not 0 < val_fraction < 1:
        raise GptcliError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    sources = expand_inputs(inputs)
    tokenizer_file = [tokenizer] if isinstance(tokenizer, str) else []
    target = check_output_dir(out_dir, "tokenized", replace=overwrite,
                              inputs=input_paths([*inputs, *tokenizer_file]))
    tok = _build_tokenizer(tokenizer, sources, jsonl_field, val_fraction, seed, train_bpe, on_event)
    try:
        with staging_dir(target) as work:
            mark(work, "tokenized")
            dtype = token_dtype(tok.vocab_size)
            stats, digests = _write_splits(tok, dtype, sources, jsonl_field, val_fraction, seed,
                                           work, on_event)
            for split in SPLITS:
                if stats[split].tokens == 0:
                    raise GptcliError(
                        f"the {split} split is empty ({sum(s.documents for s in stats.values())} "
                        f"documents in all); add documents or change --val-fraction"
                    )
            tok.save(work / TOKENIZER_DIR)
            meta = {
                "format": FORMAT,
                "tokenizer": tok.spec,
                "dtype": dtype.name,
                "splits": {
                    s: {**stats[s].__dict__, "file": f"{s}.bin", "sha256": digests[s]} for s in SPLITS
                },
                "sources": [{"path": str(src.path), "bytes": src.size} for src in sources],
                "val_fraction": val_fraction,
                "seed": seed,
            }
            (work / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as exc:
        raise GptcliError(f"could not write {out_dir} ({exc.strerror or exc}); free disk space or "
                          f"choose a writable --out; nothing was written") from None
    return TokenizeResult(
        out_dir=out_dir,
        tokenizer=tok.name,
        vocab_size=tok.vocab_size,
        dtype=dtype.name,
        splits=stats,
        sources=len(sources),
        seconds=time.perf_counter() - started,
    )


def _batches(sources: list[Source], jsonl_field: str, val_fraction: float,
             seed: int) -> Iterator[list[tuple[str, Piece]]]:
    """(split, piece) pairs grouped into batches of about BATCH_BYTES of text."""
    batch: list[tuple[str, Piece]] = []
    batch_bytes = 0
    for split, piece in _pieces(sources, jsonl_field, val_fraction, seed):
        batch.append((split, piece))
        batch_bytes += piece.nbytes
        if batch_bytes >= BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


def _write_splits(tok: Tokenizer, dtype: np.dtype, sources: list[Source], jsonl_field: str,
                  val_fraction: float, seed: int, work: Path,
                  on_event: EventSink) -> tuple[dict[str, SplitStats], dict[str, str]]:
    """Encode every piece and append it to its split's .bin file; return counts and digests.

    Pipelined: batch N+1 is read and encoded (on the tokenizer's threads) while batch N is
    converted, hashed and written, so neither side waits for the other.
    """
    stats = {s: SplitStats() for s in SPLITS}
    hashes = {s: hashlib.sha256() for s in SPLITS}
    files = {s: open(work / f"{s}.bin", "wb") for s in SPLITS}
    total_bytes = sum(src.size for src in sources)
    done_bytes = 0
    eot = np.array([tok.eot_id], dtype=dtype)

    def write(batch: list[tuple[str, Piece]], encoded: list) -> None:
        nonlocal done_bytes
        for (split, piece), ids in zip(batch, encoded):
            array = np.asarray(ids, dtype=dtype)
            if piece.document_end:
                array = np.concatenate([array, eot])
                stats[split].documents += 1
            files[split].write(array.tobytes())
            hashes[split].update(array.tobytes())
            stats[split].tokens += len(array)
            stats[split].bytes += piece.nbytes
            done_bytes += piece.nbytes
        on_event(Progress("tokenizing", done_bytes, total_bytes,
                          sum(s.tokens for s in stats.values())))

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptcli-batch") as encoder:
            pending = None  # the batch being encoded while the previous one is written
            for batch in _batches(sources, jsonl_field, val_fraction, seed):
                future = encoder.submit(tok.encode_batch, [p.text for _, p in batch])
                if pending is not None:
                    write(pending[0], pending[1].result())
                pending = (batch, future)
            if pending is not None:
                write(pending[0], pending[1].result())
    finally:
        for f in files.values():
            f.close()
    return stats, {s: h.hexdigest() for s, h in hashes.items()}


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


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptcliError(f"{directory} is not a tokenized directory (no {META_FILE}); "
                          f"create one with `gptcli tokenize`") from None
    except (OSError, ValueError) as exc:
        raise GptcliError(f"{path} is unreadable or not JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise GptcliError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta

