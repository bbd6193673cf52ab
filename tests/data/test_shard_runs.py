"""Tokenizing into shards: shard files of a fixed size read back as one stream; a run
killed with SIGKILL and resumed writes the same bytes as an uninterrupted one; parts
merged equal one run; directories from before shards still read; every refusal."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, write_corpus

from gptcli.data.tokenized import shards
from gptcli.data.tokenized.merge import merge_parts
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.data.tokenized.token_files import META_FILE, read_meta
from gptcli.data.training.dataset import TokenDataset
from gptcli.errors import GptcliError

SMALL_BATCH = 4096  # bytes of text per encoded batch: many batches from a small corpus
SHARD = 2048  # bytes per shard: 1024 uint16 ids


@pytest.fixture
def big_corpus(tmp_path):
    """40 files of about 1.5 KB, three times over: enough for many batches and shards."""
    for copy in range(3):
        write_corpus(tmp_path / "corpus" / f"copy{copy}")
    return tmp_path / "corpus"


def stream(directory, split: str) -> np.ndarray:
    return np.asarray(TokenDataset.open(directory).splits[split])


def files_of(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def test_shards_have_the_size_asked_and_read_as_one_stream(tmp_path, big_corpus, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BYTES", SMALL_BATCH)
    whole = tokenize_corpus([str(big_corpus)], tmp_path / "whole", tokenizer="bytes")
    cut = tokenize_corpus([str(big_corpus)], tmp_path / "cut", tokenizer="bytes", shard_bytes=SHARD)
    meta = read_meta(tmp_path / "cut")
    sizes = [s["tokens"] for s in meta["splits"]["train"]["shards"]]
    assert whole.shards == 1 and cut.shards == len(sizes) > 3
    assert set(sizes[:-1]) == {1024} and 0 < sizes[-1] <= 1024
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "whole", split), stream(tmp_path / "cut", split))
    # A window across a shard boundary reads the ids on both sides.
    tokens = TokenDataset.open(tmp_path / "cut").splits["train"]
    assert np.array_equal(tokens.windows(np.array([1000, 0]), 50), np.stack([stream(tmp_path / "whole", "train")[
        s:s + 50] for s in (1000, 0)]))


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2-file"])
def test_worker_processes_write_the_same_bytes_as_one_thread(tmp_path, big_corpus, monkeypatch, tokenizer):
    monkeypatch.setattr(shards, "BATCH_BYTES", SMALL_BATCH)
    tokenizer = str(GPT2_TIKTOKEN) if tokenizer == "gpt2-file" else tokenizer
    options = {"tokenizer": tokenizer, "shard_bytes": SHARD}
    tokenize_corpus([str(big_corpus)], tmp_path / "thread", workers=1, **options)
    tokenize_corpus([str(big_corpus)], tmp_path / "processes", workers=3, **options)
    assert len(files_of(tmp_path / "thread")) > 4
    assert files_of(tmp_path / "processes") == files_of(tmp_path / "thread")
    assert read_meta(tmp_path / "processes") == read_meta(tmp_path / "thread")


def test_default_workers_are_one_thread_for_a_small_corpus():
    cores = len(os.sched_getaffinity(0))
    assert shards.default_workers(shards.BATCH_BYTES) == 1
    assert shards.default_workers(100 * shards.BATCH_BYTES) == min(cores, 100)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from gptcli.data.tokenized import shards
    shards.BATCH_BYTES = {batch}
    slow = lambda event: time.sleep(0.05)  # time for the test to kill it between batches
    if __name__ == "__main__":
        shards.tokenize_corpus([{corpus!r}], {out!r}, tokenizer="bytes", shard_bytes={shard}, workers={workers},
                               on_event=slow)
""")


def child_pids(pid: int) -> set[int]:
    return {int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in open(f"/proc/{pid}/task/{task}/children").read().split()}


def gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, big_corpus, monkeypatch, workers):
    """Worker processes die with the main process, even by SIGKILL: none is left behind."""
    monkeypatch.setattr(shards, "BATCH_BYTES", SMALL_BATCH)
    tokenize_corpus([str(big_corpus)], tmp_path / "straight", tokenizer="bytes", shard_bytes=SHARD)
    out = tmp_path / "resumed"
    script = tmp_path / "killed_run.py"  # a file, so that worker processes import it again as their main
    script.write_text(KILLED_RUN.format(batch=SMALL_BATCH, corpus=str(big_corpus), out=str(out), shard=SHARD,
                                        workers=workers))
    process = subprocess.Popen([sys.executable, str(script)])
    progress = tmp_path / ".resumed.partial" / "progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once a few batches are on disk
        try:
            cursor = json.loads(progress.read_text()).get("cursor")
        except (OSError, ValueError):
            cursor = None
        if cursor and cursor[0] >= 20:
            break
        time.sleep(0.01)
    workers_pids = child_pids(process.pid)  # and multiprocessing's resource tracker
    assert len(workers_pids) >= (workers if workers > 1 else 0)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert all(gone(pid, 10) for pid in workers_pids)
    assert not out.exists() and progress.is_file()
    with pytest.raises(GptcliError, match="continue it with --resume"):
        tokenize_corpus([str(big_corpus)], out, tokenizer="bytes", shard_bytes=SHARD)
    with pytest.raises(GptcliError, match="shard_bytes changed"):
        tokenize_corpus([str(big_corpus)], out, tokenizer="bytes", shard_bytes=4 * SHARD, resume=True)
    tokenize_corpus([str(big_corpus)], out, tokenizer="bytes", shard_bytes=SHARD, resume=True)
    assert files_of(out) == files_of(tmp_path / "straight")
    assert read_meta(out) == read_meta(tmp_path / "straight")
    assert not progress.parent.exists()
    with pytest.raises(GptcliError, match="is complete; there is nothing to continue"):
        tokenize_corpus([str(big_corpus)], out, tokenizer="bytes", shard_bytes=SHARD, resume=True)


def test_a_lost_worker_keeps_the_batches_written_for_resume(tmp_path, big_corpus, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BYTES", SMALL_BATCH)
    options = {"tokenizer": "bytes", "shard_bytes": SHARD}
    tokenize_corpus([str(big_corpus)], tmp_path / "straight", **options)
    events = []

    def kill_a_worker(event):  # after a few batches, as an out-of-memory killer would
        events.append(event)
        if len(events) == 5:
            workers = [pid for pid in child_pids(os.getpid())
                       if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
            os.kill(workers[0], signal.SIGKILL)

    out = tmp_path / "t"
    with pytest.raises(GptcliError, match="worker process stopped.*continue with --resume"):
        tokenize_corpus([str(big_corpus)], out, workers=2, on_event=kill_a_worker, **options)
    assert (tmp_path / ".t.partial" / "progress.json").is_file()
    tokenize_corpus([str(big_corpus)], out, workers=2, resume=True, **options)
    assert files_of(out) == files_of(tmp_path / "straight")


def test_parts_merged_equal_one_run(tmp_path, big_corpus, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BYTES", SMALL_BATCH)
    options = {"tokenizer": "bytes", "shard_bytes": SHARD, "val_fraction": 0.2}
    tokenize_corpus([str(big_corpus)], tmp_path / "one", **options)
    parts = [tmp_path / f"part{k}" for k in (1, 2, 3)]
    for k, part in enumerate(parts, start=1):
        tokenize_corpus([str(big_corpus)], part, part=(k, 3), **options)
    assert sum(read_meta(p)["splits"]["train"]["tokens"] for p in parts) == read_meta(tmp_path / "one")["splits"][
        "train"]["tokens"]
    merge_parts([str(p) for p in reversed(parts)], tmp_path / "merged")
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "one")
    merged, one = read_meta(tmp_path / "merged"), read_meta(tmp_path / "one")
    assert merged["splits"] == one["splits"] and merged["sources"] == one["sources"]
    # A part alone is a dataset too.
    assert len(stream(parts[0], "train")) == read_meta(parts[0])["splits"]["train"]["tokens"]


def test_merge_refuses_what_is_not_one_run_in_parts(tmp_path, big_corpus):
    options = {"tokenizer": "bytes"}
    part1, part2 = tmp_path / "p1", tmp_path / "p2"
    tokenize_corpus([str(big_corpus)], part1, part=(1, 3), **options)
    tokenize_corpus([str(big_corpus)], part2, part=(2, 3), **options)
    with pytest.raises(GptcliError, match="give each of 1/3 .. 3/3 once"):
        merge_parts([part1, part2], tmp_path / "m")
    tokenize_corpus([str(big_corpus)], tmp_path / "whole", **options)
    with pytest.raises(GptcliError, match="is not a part"):
        merge_parts([part1, tmp_path / "whole"], tmp_path / "m")
    tokenize_corpus([str(big_corpus)], tmp_path / "p3", part=(3, 3), seed=7, **options)
    with pytest.raises(GptcliError, match="has another seed"):
        merge_parts([part1, part2, tmp_path / "p3"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("part, message", [("0/2", "between 1 and N"), ("3/2", "between 1 and N"),
                                           ("x", "K/N"), ("1/500", "fewer than 500 parts")])
def test_bad_parts(tmp_path, big_corpus, part, message):
    with pytest.raises(GptcliError, match=message):
        tokenize_corpus([str(big_corpus)], tmp_path / "t", tokenizer="bytes", part=shards.parse_part(part))


def test_resume_without_an_interrupted_run(tmp_path, big_corpus):
    with pytest.raises(GptcliError, match="no interrupted tokenization"):
        tokenize_corpus([str(big_corpus)], tmp_path / "t", tokenizer="bytes", resume=True)


def test_a_directory_from_before_shards_still_reads(tmp_path, big_corpus):
    """Format 1: one train.bin and val.bin, their file, tokens and sha256 in meta.json."""
    out = tmp_path / "old"
    tokenize_corpus([str(big_corpus)], out, tokenizer="bytes")
    expected = {split: stream(out, split) for split in ("train", "val")}
    meta = read_meta(out)
    for split in ("train", "val"):
        (shard,) = meta["splits"][split].pop("shards")
        os.replace(out / shard["file"], out / f"{split}.bin")
        meta["splits"][split].update(file=f"{split}.bin", sha256=shard["sha256"])
    meta["format"] = "gptcli-tokens/1"
    (out / META_FILE).write_text(json.dumps(meta))
    for split in ("train", "val"):
        assert np.array_equal(stream(out, split), expected[split])
