"""Tokenize throughput: `gptcli tokenize` end to end (read, encode, split, write) versus
tiktoken's `encode_ordinary_batch` alone on the same text already in memory.

    python benchmarks/bench_tokenize.py [--mb 200] [--write]

The corpus is the built-in `stdlib` corpus repeated into files until it reaches --mb
megabytes (written to a temporary folder). GPT-2's tokenizer comes from
../shared/data/gpt2.tiktoken. gptcli runs as a child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
RANKS = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"


def build_corpus(folder: Path, megabytes: int) -> list[Path]:
    from gptcli.data.corpus import stdlib_files

    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()]
    chunk = "".join(texts)
    files, size, i = [], 0, 0
    while size < megabytes * 1e6:
        path = folder / f"stdlib-{i:03d}.txt"
        path.write_text(chunk, encoding="utf-8")
        files.append(path)
        size += path.stat().st_size
        i += 1
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from gptcli.data.tokenizer import tiktoken_from_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        files = build_corpus(tmp / "corpus", args.mb)
        total = sum(p.stat().st_size for p in files)

        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "gptcli", "tokenize", str(tmp / "corpus"), "--out",
                               str(tmp / "out"), "--tokenizer", str(RANKS)], capture_output=True, text=True)
        ours = time.perf_counter() - start
        if done.returncode:
            sys.exit(done.stderr)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        meta = json.loads((tmp / "out" / "meta.json").read_text())
        tokens = sum(s["tokens"] for s in meta["splits"].values())

        encoding = tiktoken_from_file(RANKS).encoding
        text = files[0].read_text(encoding="utf-8")
        pieces = [text[i:i + (1 << 22)] for i in range(0, len(text), 1 << 22)]  # same 4 MiB pieces
        start = time.perf_counter()
        for _ in files:
            encoding.encode_ordinary_batch(pieces)
        raw = time.perf_counter() - start

    lines = [f"### Tokenize ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_tokenize.py --mb {args.mb}`: {total / 1e6:.0f} MB of Python "
             f"source ({len(files)} files), GPT-2 BPE, {tokens:,} tokens.", "",
             "| what | seconds | MB/s | peak RSS |", "|---|---|---|---|",
             f"| tiktoken `encode_ordinary_batch`, text in memory | {raw:.1f} | {total / 1e6 / raw:.1f} | |",
             f"| `gptcli tokenize` end to end (process start to files on disk) | {ours:.1f} | "
             f"{total / 1e6 / ours:.1f} | {peak_rss:.0f} MB |",
             f"| **gptcli / raw tiktoken throughput** | | **{raw / ours:.0%}** | |", ""]
    text = "\n".join(lines)
    publish(text, args.write)


if __name__ == "__main__":
    main()
