"""`gptcli tokenize --merge PART... --out DIR`: join the directories of a corpus tokenized
in parts (`--part K/N`, every N-th input file from the K-th) into the directory one run
would have written, without encoding again.

Each part's meta.json says which of the corpus's files it holds and where each file's ids
sit in its train and val streams (shards.SourceStats). Merging copies every file's ids in
the corpus's file order into new shards; since a document's split never depends on the
other files (shards.py), the result equals a single run's, shard for shard.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gptcli.atomic import staging_dir
from gptcli.data.training.dataset import TokenDataset
from gptcli.data.tokenized.shards import SourceStats, SplitStats, TokenizeResult
from gptcli.data.tokenized.token_files import FORMAT, META_FILE, SPLITS, TOKENIZER_DIR, ShardWriter, read_meta
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Progress, ignore
from gptcli.outputs import check_output_dir, mark

COPY_TOKENS = 1 << 24  # ids copied at a time: flat memory whatever a file's size
SAME = ("format", "tokenizer", "dtype", "shard_tokens", "inputs_total", "val_fraction", "seed", "text_field")


def merge_parts(parts: list[str | Path], out_dir: str | Path, overwrite: bool = False,
                on_event: EventSink = ignore) -> TokenizeResult:
    started = time.perf_counter()
    if len(parts) < 2:
        raise GptcliError("--merge needs the directories of at least two parts")
    metas = [read_meta(part) for part in parts]
    _check_parts(parts, metas)
    target = check_output_dir(out_dir, "tokenized", replace=overwrite, inputs=[Path(p).resolve() for p in parts])
    datasets = [TokenDataset.open(part) for part in parts]
    owned = sorted(((SourceStats.from_json(record), d) for meta, d in zip(metas, datasets)
                    for record in meta["sources"]), key=lambda pair: pair[0].index)
    first = metas[0]
    stats = {split: SplitStats() for split in SPLITS}
    records, total = [], sum(record.bytes for record, _ in owned)
    with staging_dir(target) as work:
        mark(work, "tokenized")
        writers = {split: ShardWriter(work, split, np.dtype(first["dtype"]), first["shard_tokens"]) for split in SPLITS}
        for record, dataset in owned:
            start = {split: writers[split].written for split in SPLITS}
            for split in SPLITS:
                _copy(dataset.splits[split], record.start[split], record.splits[split].tokens, writers[split])
                for field in ("tokens", "bytes", "documents"):
                    setattr(stats[split], field, getattr(stats[split], field) + getattr(record.splits[split], field))
            records.append(SourceStats(record.index, record.name, record.path, record.bytes, start, record.splits))
            on_event(Progress("merging", sum(r.bytes for r in records), total,
                              sum(s.tokens for s in stats.values())))
        shards = {split: writer.close() for split, writer in writers.items()}
        shutil.copytree(Path(parts[0]) / TOKENIZER_DIR, work / TOKENIZER_DIR)
        meta = {**{key: first[key] for key in SAME}, "format": FORMAT,
                "splits": {s: {**asdict(stats[s]), "shards": shards[s]} for s in SPLITS},
                "sources": [record.to_json() for record in records], "part": None}
        (work / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    tokenizer = datasets[0].tokenizer
    return TokenizeResult(Path(out_dir), tokenizer.name, tokenizer.vocab_size, first["dtype"], stats, len(records),
                          time.perf_counter() - started, max(len(s) for s in shards.values()))


def _check_parts(parts: list, metas: list[dict]) -> None:
    """The parts must be parts of one run: same settings, each part once, every file once."""
    for part, meta in zip(parts, metas):
        if meta.get("part") is None:
            raise GptcliError(f"--merge: {part} is not a part (it was not tokenized with --part K/N)")
        for key in SAME:
            if meta.get(key) != metas[0].get(key):
                raise GptcliError(f"--merge: {part} has another {key} than {parts[0]}; merge parts of one "
                                  f"corpus tokenized with the same options")
    count = metas[0]["part"]["count"]
    given = sorted(meta["part"]["index"] for meta in metas)
    if any(meta["part"]["count"] != count for meta in metas) or given != list(range(1, count + 1)):
        named = ", ".join(f"{meta['part']['index']}/{meta['part']['count']}" for meta in metas)
        raise GptcliError(f"--merge: the parts given are {named}; give each of 1/{count} .. {count}/{count} once")
    indices = sorted(record["index"] for meta in metas for record in meta["sources"])
    if indices != list(range(metas[0]["inputs_total"])):
        raise GptcliError("--merge: the parts do not hold every input file exactly once; tokenize each part "
                          "from the same inputs")


def _copy(tokens, start: int, count: int, writer: ShardWriter) -> None:
    """Append ids start..start+count-1 of a split to `writer`, a chunk at a time."""
    for begin in range(start, start + count, COPY_TOKENS):
        writer.append(tokens.read(begin, min(begin + COPY_TOKENS, start + count)).astype(writer.dtype))
