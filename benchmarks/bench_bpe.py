"""Benchmark gptcli.data.tokenizers.bpe.train_bpe on a >= 10 MB corpus.

Usage (with gptcli installed, or PYTHONPATH=src):  python benchmarks/bench_bpe.py [--vocab-size 8192]

The corpus is tiny shakespeare (../shared/data/tinyshakespeare.txt next to the checkout)
repeated to reach the target size, or Python's standard library sources when that file is
absent.  As a reference point it also times tiktoken encoding the same text with the
trained ranks and the GPT-2 pattern.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import tiktoken

from gptcli.data.tokenizers.bpe import GPT2_PATTERN, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
PIECE_CHARS = 1 << 20  # feed the trainer 1 MiB pieces, as a streaming reader would


def shakespeare_corpus(min_bytes: int) -> str:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    copies = -(-min_bytes // len(text.encode("utf-8")))
    return text * copies


def stdlib_corpus(min_bytes: int) -> str:
    parts: list[str] = []
    size = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(source)
        size += len(source.encode("utf-8"))
        if size >= min_bytes:
            break
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--min-mb", type=float, default=10.0)
    args = parser.parse_args()

    min_bytes = int(args.min_mb * 1_000_000)
    if SHAKESPEARE.exists():
        source, text = "tinyshakespeare (repeated)", shakespeare_corpus(min_bytes)
    else:
        source, text = "python stdlib sources", stdlib_corpus(min_bytes)
    megabytes = len(text.encode("utf-8")) / 1e6
    pieces = (text[start : start + PIECE_CHARS] for start in range(0, len(text), PIECE_CHARS))

    start = time.perf_counter()
    ranks = train_bpe(pieces, args.vocab_size)
    train_seconds = time.perf_counter() - start

    encoding = tiktoken.Encoding(
        name="bench",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    start = time.perf_counter()
    tokens = encoding.encode_ordinary(text)
    encode_seconds = time.perf_counter() - start

    print(f"corpus:        {source}, {megabytes:.2f} MB")
    print(f"vocab size:    {args.vocab_size} ({len(ranks)} mergeable ranks)")
    print(f"train_bpe:     {train_seconds:.2f} s  ({megabytes / train_seconds:.2f} MB/s)")
    print(
        f"tiktoken enc:  {encode_seconds:.2f} s  ({megabytes / encode_seconds:.2f} MB/s, "
        f"{len(tokens) / (megabytes * 1e6):.3f} tokens/byte)"
    )


if __name__ == "__main__":
    main()
