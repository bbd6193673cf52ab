"""Raw text -> a tokenized directory of shards (token_files.py has the layout): resumable,
and in parts for several machines.

The corpus is streamed piece by piece (corpus.py); each piece goes to train or val;
pieces are gathered into batches of about 16 MiB of text, encoded beside the reading and
writing (one thread, or a worker process per core: encoders.py) and written in order, so
the output never depends on the number of workers.

The split is decided per document from the seed and the document's place: document j of
the corpus's file g (counting every file, in every part) has counter i = g + j and goes to
val when floor((i + 1) f + u) > floor(i f + u), u drawn from the seed. So a fraction f of
each file's documents goes to val, spread evenly; a corpus of one document per file sends
exactly a fraction f of its files; and no document's split depends on which other files are
in the run, so parts tokenized apart split exactly as one run does. A corpus of one plain
text file is split by position instead: its last fraction f of lines is val (as nanoGPT
does for Shakespeare).

Resuming: the output is built in `.NAME.partial/` beside `--out`. After each written batch,
`progress.json` records where reading stands (a restart point in the corpus) and what is on
disk (ids per split, finished shards, counts); the shard files are flushed first, so it
never counts ids that are not on disk. `resume=True` cuts the shards back to what it counts
and reads on from there: the batches that follow are the ones the uninterrupted run made,
so the result is the same, byte for byte. A failure (bad input) deletes the partial output;
an interruption (Ctrl-C, a kill) keeps it.

Parts: `part=(k, n)` tokenizes every n-th input file starting with the k-th; the parts'
directories are joined by merge.py without encoding again.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gptcli.atomic import fsync_tree, replace_dir, write_text
from gptcli.data.tokenizers.bpe import GPT2_PATTERN
from gptcli.data.text.corpus import Piece, Source, expand_inputs, iter_pieces, single_document_split
from gptcli.data.tokenized.encoders import Pending, WorkerLost, batch_encoder
from gptcli.data.tokenized.token_files import (
    FORMAT,
    META_FILE,
    SHARD_BYTES,
    SPLITS,
    TOKENIZER_DIR,
    ShardWriter,
    token_dtype,
)
from gptcli.data.tokenizers.tokenizer import (
    Tokenizer,
    is_corpus_dependent,
    load_tokenizer,
    resolve_tokenizer,
    tiktoken_from_ranks,
)
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Notice, Progress, ignore
from gptcli.outputs import check_output_dir, input_paths, mark

BATCH_BYTES = 1 << 22  # text gathered per encode_batch call (4 MiB)
PROGRESS_FILE = "progress.json"


@dataclass
class SplitStats:
    tokens: int = 0
    bytes: int = 0
    documents: int = 0


@dataclass
class SourceStats:
    """One input file's share of each split: where its ids start in the split's stream,
    and its ids, bytes and documents there (merging parts moves whole files by these)."""

    index: int  # in the whole corpus's file list (all parts)
    name: str
    path: str
    bytes: int
    start: dict[str, int]
    splits: dict[str, SplitStats] = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "path": self.path, "bytes": self.bytes,
                **{split: {"start": self.start[split], **asdict(self.splits[split])} for split in SPLITS}}

    @classmethod
    def from_json(cls, data: dict) -> SourceStats:
        return cls(data["index"], data["name"], data["path"], data["bytes"],
                   {split: data[split]["start"] for split in SPLITS},
                   {split: SplitStats(**{k: v for k, v in data[split].items() if k != "start"})
                    for split in SPLITS})


@dataclass
class TokenizeResult:
    out_dir: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    splits: dict[str, SplitStats]
    sources: int
    seconds: float
    shards: int = 1
    # One plain text file: its one document is cut by position, part in train, part in val
    # (so the splits' `documents` count it once, in val, where it ends).
    split_by_position: bool = False


def default_workers(remaining_bytes: int) -> int:
    """Encoding workers when none are asked for: a process per core the run may use, when
    the corpus left holds a batch for each of them; else one thread (processes take a
    moment to start and would have nothing to do)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and remaining_bytes >= cores * BATCH_BYTES else 1


def parse_part(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) as (K, N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise GptcliError(f"--part must look like K/N (e.g. 2/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise GptcliError(f"--part {text}: K must be between 1 and N")
    return k, n


class SplitAssigner:
    """Train or val for each piece (see the module docstring)."""

    def __init__(self, val_fraction: float, seed: int, split_offset: int | None):
        self.fraction, self.split_offset = val_fraction, split_offset
        self.phase = random.Random(seed).random()

    def split_of(self, piece: Piece, file: int, document: int) -> str:
        """`file`: the index of the piece's file among all the corpus's files; `document`:
        the index of its document within the file."""
        if self.split_offset is not None:
            return "val" if piece.offset >= self.split_offset else "train"
        i, f, u = file + document, self.fraction, self.phase
        return "val" if math.floor((i + 1) * f + u) > math.floor(i * f + u) else "train"


def _build_tokenizer(spec: str | Tokenizer, sources: list[Source], text_field: str, val_fraction: float,
                     seed: int, train_bpe: int | None, part: tuple[int, int], on_event: EventSink) -> Tokenizer:
    """The tokenizer for this corpus; BPE training and `char` vocabularies read it once first."""
    if train_bpe is not None:
        from gptcli.data.tokenizers.bpe import train_bpe as learn

        texts = (piece.text for split, piece, _ in _assigned(sources, text_field, val_fraction, seed, part=part)
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
        return resolve_tokenizer(spec, (p.text for p in iter_pieces(sources, text_field)))
    return resolve_tokenizer(spec)


def _splits_by_position(sources: list[Source], part: tuple[int, int]) -> bool:
    """Whether the corpus is one plain text file, split by position rather than by document.
    A part of several (n > 1) is never: the whole corpus then has at least n files, and a
    part's one file must split by document as it does in a run of them all."""
    return part[1] == 1 and len(sources) == 1 and sources[0].is_plain_text


def _split_offset(sources: list[Source], val_fraction: float, part: tuple[int, int]) -> int | None:
    """The byte where val starts when the corpus is one plain text file, else None."""
    if _splits_by_position(sources, part):
        return single_document_split(sources[0], val_fraction)
    return None


def _assigned(sources: list[Source], text_field: str, val_fraction: float, seed: int,
              start: tuple[int, int] | None = None, document: int = 0,
              part: tuple[int, int] = (1, 1)) -> Iterator[tuple[str, Piece, tuple[int, int]]]:
    """(split, piece, (source index, document index in its file)) for every piece from
    `start` on; `document`: the index of the document `start` is in. `sources` are part
    `part` = (k, n) of the corpus's files: source i is the corpus's file k - 1 + i n."""
    if start is not None and start[0] >= len(sources):
        return  # everything was read before
    assigner = SplitAssigner(val_fraction, seed, _split_offset(sources, val_fraction, part))
    index_of = {source.path: i for i, source in enumerate(sources)}
    current = start[0] if start else 0
    for piece in iter_pieces(sources, text_field, assigner.split_offset, start=start):
        i = index_of[piece.source]
        if i != current:
            current, document = i, 0
        yield assigner.split_of(piece, part[0] - 1 + i * part[1], document), piece, (i, document)
        if piece.document_end:
            document += 1


@dataclass
class _Batch:
    items: list[tuple[str, Piece, tuple[int, int]]]

    @property
    def cursor(self) -> tuple[int, int, int]:
        """Where this batch starts: (source index, offset, document index in the file)."""
        _, piece, (source, document) = self.items[0]
        return source, piece.offset, document


def _batches(items: Iterator[tuple[str, Piece, tuple[int, int]]]) -> Iterator[_Batch]:
    """Items grouped into batches of about BATCH_BYTES of text."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += item[1].nbytes
        if size >= BATCH_BYTES:
            yield _Batch(batch)
            batch, size = [], 0
    if batch:
        yield _Batch(batch)


def tokenize_corpus(
    inputs: list[str],
    out_dir: str | Path,
    tokenizer: str | Tokenizer = "gpt2",
    val_fraction: float = 0.1,
    seed: int = 1337,
    text_field: str = "text",
    train_bpe: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    part: tuple[int, int] | None = None,
    shard_bytes: int = SHARD_BYTES,
    workers: int | None = None,
    on_event: EventSink = ignore,
) -> TokenizeResult:
    """Tokenize raw inputs into a tokenized directory at `out_dir` (see the module
    docstring). `workers`: encoding workers (default_workers: a process per core)."""
    started = time.perf_counter()
    if not 0 < val_fraction < 1:
        raise GptcliError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if shard_bytes < 1024:
        raise GptcliError(f"--shard-size must be at least 1 KB, got {shard_bytes} bytes")
    if workers is not None and workers < 1:
        raise GptcliError(f"--workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    every_source = expand_inputs(inputs)
    k, n = part or (1, 1)
    if n > len(every_source):
        raise GptcliError(f"--part {k}/{n}: the inputs are {len(every_source)} files, fewer than {n} parts")
    sources = every_source[k - 1::n]
    tokenizer_file = [tokenizer] if isinstance(tokenizer, str) else []
    if resume and (out_dir / META_FILE).is_file():
        raise GptcliError(f"--resume: {out_dir} is complete; there is nothing to continue")
    target = check_output_dir(out_dir, "tokenized", replace=overwrite and not resume,
                              inputs=input_paths([*inputs, *tokenizer_file]))
    work = target.with_name(f".{target.name}.partial")
    settings = {"inputs": [[s.name, s.size] for s in every_source], "part": [k, n], "val_fraction": val_fraction,
                "seed": seed, "text_field": text_field, "shard_bytes": shard_bytes,
                "tokenizer": tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint(),
                "train_bpe": train_bpe}
    try:
        progress = _open_work(work, target, out_dir, settings, resume, overwrite)
    except OSError as exc:
        raise GptcliError(f"could not write {out_dir} ({exc.strerror or exc}); choose a writable --out") from None
    try:
        if progress is None:
            tok = _build_tokenizer(tokenizer, sources, text_field, val_fraction, seed, train_bpe, (k, n), on_event)
            tok.save(work / TOKENIZER_DIR)
        else:
            tok = load_tokenizer(work / TOKENIZER_DIR)
        run = _Run(tok, sources, work, shard_bytes, settings, progress, on_event, first_index=k - 1, step=n)
        run.write(_assigned(sources, text_field, val_fraction, seed, *run.restart_point(), part=(k, n)),
                  workers or default_workers(run.total_bytes - run.done_bytes))
        for split in SPLITS if n == 1 else ():  # a part may hold no val document: merging adds them up
            if run.stats[split].tokens == 0:
                raise GptcliError(f"the {split} split is empty ({sum(s.documents for s in run.stats.values())} "
                                  f"documents in all); add documents or change --val-fraction")
        meta = {"format": FORMAT, "tokenizer": tok.spec, "dtype": run.dtype.name,
                "shard_tokens": run.shard_tokens,
                "splits": {s: {**asdict(run.stats[s]), "shards": run.shards[s]} for s in SPLITS},
                "sources": [record.to_json() for record in run.records],
                "inputs_total": len(every_source), "part": {"index": k, "count": n} if n > 1 else None,
                "val_fraction": val_fraction, "seed": seed, "text_field": text_field}
        (work / PROGRESS_FILE).unlink()
        (work / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        fsync_tree(work)
        replace_dir(work, target)
    except WorkerLost:
        raise  # like an interruption: --resume continues
    except GptcliError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing is kept
        raise
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise GptcliError(f"could not write {out_dir} ({exc.strerror or exc}); free disk space or "
                          f"choose a writable --out; nothing was written") from None
    return TokenizeResult(out_dir, tok.name, tok.vocab_size, run.dtype.name, run.stats, len(sources),
                          time.perf_counter() - started, max(len(s) for s in run.shards.values()),
                          split_by_position=_splits_by_position(sources, (k, n)))


def _open_work(work: Path, target: Path, shown: Path, settings: dict, resume: bool, overwrite: bool
               ) -> dict | None:
    """The partial directory, fresh (returns None) or to resume (returns its progress)."""
    progress_file = work / PROGRESS_FILE
    if resume:
        if not progress_file.is_file():
            done = " (it is complete)" if (target / META_FILE).is_file() else ""
            raise GptcliError(f"--resume: there is no interrupted tokenization of {shown} to continue{done}; "
                              f"run without --resume")
        progress = json.loads(progress_file.read_text())
        changed = [key for key in settings if progress["settings"].get(key) != settings[key]]
        if changed:
            raise GptcliError(f"--resume: {', '.join(changed)} changed since the interrupted run; resume with "
                              f"the same inputs and options, or start again with --overwrite")
        return progress
    if work.exists():
        if not overwrite:
            raise GptcliError(f"an interrupted tokenization of {shown} left {work.name}; continue it with "
                              f"--resume, or start again with --overwrite")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mark(work, "tokenized")
    write_text(progress_file, json.dumps({"settings": settings, "cursor": None}))
    return None


class _Run:
    """The writing half: shard writers, counts, and progress.json after each batch."""

    def __init__(self, tok: Tokenizer, sources: list[Source], work: Path, shard_bytes: int, settings: dict,
                 progress: dict | None, on_event: EventSink, first_index: int, step: int):
        self.tok, self.sources, self.work, self.on_event = tok, sources, work, on_event
        self.dtype = token_dtype(tok.vocab_size)
        self.shard_tokens = max(shard_bytes // self.dtype.itemsize, 1)
        self.global_index = lambda i: first_index + i * step  # a source's index among all parts' files
        self.settings = settings  # recorded again with every progress.json
        saved = progress or {}
        self.cursor = saved.get("cursor")
        self.stats = {s: SplitStats(**saved["stats"][s]) if saved else SplitStats() for s in SPLITS}
        self.records = [SourceStats.from_json(r) for r in saved.get("sources", [])]
        self.writers = {s: ShardWriter(work, s, self.dtype, self.shard_tokens,
                                       self.stats[s].tokens, saved.get("finished", {}).get(s))
                        for s in SPLITS}
        self.shards: dict[str, list[dict]] = {}
        self.total_bytes = sum(source.size for source in sources)  # on disk (compressed)
        self.done_bytes = sum(source.size for source in sources[:self.cursor[0]]) if self.cursor else 0

    def restart_point(self) -> tuple[tuple[int, int] | None, int]:
        """(start, document) for `_assigned`: where the last recorded batch ended (None:
        nothing written yet; a source index past the last file: everything was)."""
        if self.cursor is None:
            return None, 0
        source, offset, document = self.cursor
        return (source, offset), document

    def write(self, items: Iterator[tuple[str, Piece, tuple[int, int]]], workers: int) -> None:
        """Encode and write every batch in order, `workers` batches encoding while the one
        before them is written (one worker: a thread; more: processes, encoders.py)."""
        eot = np.array([self.tok.eot_id], dtype=self.dtype)
        self._report(self.cursor[0] if self.cursor else 0)  # the clock of the MB/s shown starts here
        pending: deque[tuple[_Batch, Pending]] = deque()
        with batch_encoder(self.tok, self.work / TOKENIZER_DIR, self.dtype, workers) as submit:
            for batch in _batches(items):
                pending.append((batch, submit([piece.text for _, piece, _ in batch.items])))
                if len(pending) > workers:
                    self._write_first(pending, eot)
            while pending:
                self._write_first(pending, eot)
        self.shards = {split: writer.close() for split, writer in self.writers.items()}

    def _write_first(self, pending: deque[tuple[_Batch, Pending]], eot: np.ndarray) -> None:
        """Write the first pending batch once encoded; the progress recorded after it points
        at the next batch (or, after the last, past the last file)."""
        batch, encoded = pending.popleft()
        self._write_batch(batch, encoded.result(), eot,
                          next_cursor=pending[0][0].cursor if pending else (len(self.sources), 0, 0))

    def _write_batch(self, batch: _Batch, encoded: list[np.ndarray], eot: np.ndarray, next_cursor) -> None:
        for (split, piece, (source, _)), ids in zip(batch.items, encoded):
            array = np.asarray(ids, dtype=self.dtype)
            record = self._record(source)
            if piece.document_end:
                array = np.concatenate([array, eot])
                self.stats[split].documents += 1
                record.splits[split].documents += 1
            self.writers[split].append(array)
            for stats in (self.stats[split], record.splits[split]):
                stats.tokens += len(array)
                stats.bytes += piece.nbytes
        self._save_progress(next_cursor)
        self.done_bytes += sum(piece.disk_bytes for _, piece, _ in batch.items)
        self._report(min(next_cursor[0], len(self.sources)))

    def _report(self, files_done: int) -> None:
        self.on_event(Progress("tokenizing", self.done_bytes, self.total_bytes,
                               sum(s.tokens for s in self.stats.values()), files_done, len(self.sources)))

    def _record(self, source: int) -> SourceStats:
        """The counts of source `source`, started when its first piece arrives."""
        while len(self.records) <= source:  # files without pieces (none expected) keep their place
            i = len(self.records)
            self.records.append(SourceStats(self.global_index(i), self.sources[i].name, str(self.sources[i].path),
                                            self.sources[i].size, {s: self.stats[s].tokens for s in SPLITS}))
        return self.records[source]

    def _save_progress(self, next_cursor) -> None:
        for writer in self.writers.values():
            writer.flush()
        progress = {"settings": self.settings, "cursor": list(next_cursor) if next_cursor else None,
                    "stats": {s: asdict(self.stats[s]) for s in SPLITS},
                    "finished": {s: w.finished for s, w in self.writers.items()},
                    "sources": [r.to_json() for r in self.records]}
        write_text(self.work / PROGRESS_FILE, json.dumps(progress))

