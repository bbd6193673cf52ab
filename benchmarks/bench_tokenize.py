"""Tokenize at scale: `gptcli tokenize` end to end (read, encode, split, write shards) on a
corpus of plain text files and on the same text as Parquet, against a hand-written raw
tiktoken script on the same files, with 1 and 2 workers (gptcli: worker processes; raw
tiktoken: its threads).

    python benchmarks/bench_tokenize.py [--mb 2048] [--scratch DIR] [--reuse] [--write]

The corpus is the built-in `stdlib` corpus (the running Python's standard library, test
suites left out) repeated until it holds --mb megabytes of text. Each copy starts with a
`# copy N` line, so no two copies are identical. It is written twice:
  plain/    each copy cut into 4 .txt files at file boundaries (each .txt file is one
            document to gptcli; 4 per copy so that a small --mb still has val documents);
  parquet/  the same copies as Parquet files of about 150 MB of text each, a `text` column
            with one row per standard-library file, one row group per copy (snappy, no
            dictionary), written a copy at a time, so building never holds more than a copy.
Both hold the same text bytes, and MB/s is always text (UTF-8) bytes per second, never
bytes on disk: a Parquet file's compressed size doesn't count. The corpus lives in
--scratch (default: gptcli-bench-tokenize in the system temp folder). With --reuse, a corpus
already there for the same --mb is used as it is and kept afterwards; without it, the
corpus is built fresh and deleted at the end. The disk it needs is printed before anything
is written.

Every measured run is a child process timed from its start to its exit (interpreter start,
imports and loading the ranks included). Its peak RSS counts its worker processes too:
the sum over the process tree, sampled every 20 ms, or the child's own peak from os.wait4
if larger (RUSAGE_CHILDREN would be the largest single process of all the children so far).
  raw tiktoken:  this file run with --raw-tiktoken: what a hand-written script does at best.
                 It imports only tiktoken, reads the plain files in 4 Mi-character pieces,
                 passes them 16 Mi characters at a time (gptcli's batch size; a batch
                 spans files) to `encode_ordinary_batch(pieces, num_threads=W)` and throws
                 the ids away.
  gptcli:        `python -m gptcli tokenize DIR --out OUT --tokenizer RANKS --workers W`;
                 the output is deleted after each run.
GPT-2's BPE comes from ../shared/data/gpt2.tiktoken. The corpus is read once before the
timed runs so that every run finds it in the page cache (when memory allows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"
PIECE_CHARS = 1 << 22  # the raw script's read size, as gptcli's 4 MiB pieces
BATCH_CHARS = 1 << 24  # text per encode_ordinary_batch call: 16 Mi characters, as gptcli's batches
PLAIN_PER_COPY = 4  # plain files a copy is cut into (at document boundaries)
PARQUET_FILE_BYTES = 150e6  # text per Parquet file
MANIFEST = "corpus.json"
BYTES_PER_ID = 2 / 2.2  # uint16 ids at ~2.2 bytes of Python source per GPT-2 token: output size


# ---------------------------------------------------------------------------------------
# The raw tiktoken script (runs in its own process).


def raw_tiktoken(folder: Path, workers: int, ranks_path: Path) -> None:
    """Encode every .txt file in `folder` with tiktoken alone; print ids and bytes as JSON."""
    import base64

    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in ranks_path.read_bytes().splitlines() if line)}
    encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    ids = size = 0
    batch: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        size += path.stat().st_size
        with open(path, encoding="utf-8", newline="") as f:
            while piece := f.read(PIECE_CHARS):
                batch.append(piece)
                if sum(map(len, batch)) >= BATCH_CHARS:
                    ids += sum(map(len, encoding.encode_ordinary_batch(batch, num_threads=workers)))
                    batch = []
    if batch:
        ids += sum(map(len, encoding.encode_ordinary_batch(batch, num_threads=workers)))
    print(json.dumps({"ids": ids, "bytes": size}))


# ---------------------------------------------------------------------------------------
# The corpus.


def stdlib_texts() -> list[str]:
    from gptcli.data.text.corpus import stdlib_files

    return [path.read_text(encoding="utf-8") for path in stdlib_files()]


def copy_of(texts: list[str], i: int) -> list[str]:
    """Copy `i` of the standard library: its first document starts with a line naming it."""
    return [f"# copy {i}\n{texts[0]}", *texts[1:]]


def corpus_plan(megabytes: int) -> dict:
    """What a corpus of `megabytes` MB is: copies, files, text bytes (exact, before writing)."""
    texts = stdlib_texts()
    one = sum(len(t.encode("utf-8")) for t in texts)
    copies = max(1, math.ceil(megabytes * 1e6 / one))
    per_parquet = max(1, round(PARQUET_FILE_BYTES / one))
    text_bytes = copies * one + sum(len(f"# copy {i}\n") for i in range(copies))
    return {"mb": megabytes, "python": sys.version.split()[0], "stdlib_files": len(texts),
            "stdlib_bytes": one, "copies": copies, "copies_per_parquet": per_parquet,
            "parquet_files": math.ceil(copies / per_parquet), "text_bytes": text_bytes}


def build_corpus(scratch: Path, plan: dict) -> None:
    """Write plain/ and parquet/ under `scratch` a copy at a time; the manifest goes last, so
    an interrupted build is never reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = stdlib_texts()
    plain, parquet = scratch / "plain", scratch / "parquet"
    plain.mkdir(parents=True)
    parquet.mkdir()
    schema = pa.schema([("text", pa.string())])
    writer = None
    for i in range(plan["copies"]):
        docs = copy_of(texts, i)
        for part in range(PLAIN_PER_COPY):
            with open(plain / f"stdlib-{i:04d}-{part}.txt", "w", encoding="utf-8", newline="") as f:
                f.writelines(docs[part * len(docs) // PLAIN_PER_COPY:(part + 1) * len(docs) // PLAIN_PER_COPY])
        if i % plan["copies_per_parquet"] == 0:
            if writer is not None:
                writer.close()
            name = parquet / f"stdlib-{i // plan['copies_per_parquet']:04d}.parquet"
            writer = pq.ParquetWriter(name, schema, compression="snappy", use_dictionary=False)
        writer.write_table(pa.table({"text": docs}, schema=schema), row_group_size=len(docs))
        print(f"\rbuilding the corpus: copy {i + 1}/{plan['copies']}", end="", file=sys.stderr, flush=True)
    writer.close()
    print(file=sys.stderr)
    (scratch / MANIFEST).write_text(json.dumps(plan, indent=1) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm_page_cache(*folders: Path) -> None:
    for folder in folders:
        for path in sorted(folder.iterdir()):
            with open(path, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def prepare(scratch: Path, megabytes: int, reuse: bool) -> dict:
    """The corpus's plan, built under `scratch` unless --reuse finds the same one there."""
    plan = corpus_plan(megabytes)
    manifest = scratch / MANIFEST
    if reuse and manifest.is_file() and json.loads(manifest.read_text()) == plan:
        print(f"reusing the corpus in {scratch}", file=sys.stderr)
        return plan
    estimate = plan["text_bytes"] * (1 + 0.5 + BYTES_PER_ID)  # plain, Parquet (at most), output
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("plain", "parquet", "out", "logs", MANIFEST):
        path = scratch / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    free = shutil.disk_usage(scratch).free
    print(f"the corpus and one output need about {estimate / 1e9:.1f} GB in {scratch} "
          f"({free / 1e9:.0f} GB free)", file=sys.stderr)
    if free < estimate * 1.1:
        sys.exit(f"not enough free disk in {scratch}: choose another --scratch or a smaller --mb")
    build_corpus(scratch, plan)
    return plan


# ---------------------------------------------------------------------------------------
# Measuring.


def tree_rss_mb(pid: int) -> float:
    """The resident memory of `pid` and all its descendants, in MB (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in os.listdir(f"/proc/{current}/task"):
                todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024  # VmRSS is in kB


def run_child(command: list[str], logs: Path) -> tuple[float, float, str]:
    """Run `command` to its end: (seconds from start to exit, the peak RSS of it and its worker
    processes together in MB, stdout). The peak is the larger of the child's own (os.wait4) and
    the process tree's sum sampled every 20 ms (shared pages count once per process: an upper
    bound)."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=ROOT)
        tree_peak, done = 0.0, threading.Event()

        def sample() -> None:
            nonlocal tree_peak
            while not done.wait(0.02):
                tree_peak = max(tree_peak, tree_rss_mb(child.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed ({child.returncode}):\n{err.read_text()[-3000:]}")
    return seconds, max(usage.ru_maxrss / 1024, tree_peak), out.read_text()  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=2048, help="megabytes of text (default 2048)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "gptcli-bench-tokenize",
                        help="where the corpus and the outputs go")
    parser.add_argument("--reuse", action="store_true",
                        help="use the corpus already in --scratch if it is the same, and keep it")
    parser.add_argument("--no-parquet-1", action="store_true", help="skip Parquet with 1 worker")
    parser.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    parser.add_argument("--raw-tiktoken", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_tiktoken:
        raw_tiktoken(Path(args.raw_tiktoken[0]), int(args.raw_tiktoken[1]), RANKS)
        return
    from report import describe_machine, publish

    scratch = args.scratch.resolve()
    plan = prepare(scratch, args.mb, args.reuse)
    plain, parquet, out = scratch / "plain", scratch / "parquet", scratch / "out"
    text_mb = plan["text_bytes"] / 1e6
    disk_mb = {"plain": folder_bytes(plain) / 1e6, "parquet": folder_bytes(parquet) / 1e6}
    warm_page_cache(plain, parquet)
    load_before = os.getloadavg()[0]

    logs = scratch / "logs"  # each child's stdout and stderr; kept only when a run fails
    logs.mkdir(exist_ok=True)
    rows: dict[tuple[str, int], tuple[float, float]] = {}  # (what, workers) -> (seconds, peak MB)
    counts: dict[tuple[str, int], int] = {}  # ids: raw (no end-of-text), gptcli (with them)

    def raw(workers: int) -> None:
        print(f"raw tiktoken, {workers} worker(s)...", file=sys.stderr, flush=True)
        seconds, peak, stdout = run_child([sys.executable, str(Path(__file__).resolve()), "--raw-tiktoken",
                                           str(plain), str(workers)], logs / f"raw-{workers}")
        result = json.loads(stdout)
        assert result["bytes"] == plan["text_bytes"], (result, plan)
        rows["raw", workers], counts["raw", workers] = (seconds, peak), result["ids"]

    def gptcli(kind: str, workers: int) -> None:
        print(f"gptcli {kind}, {workers} worker(s)...", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, _ = run_child([sys.executable, "-m", "gptcli", "tokenize", str(scratch / kind), "--out",
                                      str(out), "--tokenizer", str(RANKS), "--workers", str(workers)],
                                     logs / f"{kind}-{workers}")
        meta = json.loads((out / "meta.json").read_text())
        assert sum(s["bytes"] for s in meta["splits"].values()) == plan["text_bytes"], meta["splits"]
        counts[kind, workers] = sum(s["tokens"] for s in meta["splits"].values())
        rows[kind, workers] = seconds, peak
        shutil.rmtree(out)

    runs = [lambda: raw(1), lambda: gptcli("plain", 1), lambda: raw(2), lambda: gptcli("plain", 2),
            lambda: gptcli("parquet", 2)]
    if not args.no_parquet_1:
        runs.append(lambda: gptcli("parquet", 1))
    try:
        for run in runs:
            run()
        shutil.rmtree(logs)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.reuse:
            for name in ("plain", "parquet", MANIFEST):
                path = scratch / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    load_after = os.getloadavg()[0]

    def mbps(key: tuple[str, int]) -> float:
        return text_mb / rows[key][0]

    names = {"raw": "raw tiktoken `encode_ordinary_batch`, plain files", "plain": "`gptcli tokenize`, plain files",
             "parquet": "`gptcli tokenize`, Parquet"}
    command = f"python benchmarks/bench_tokenize.py --mb {args.mb}" + (" --no-parquet-1" if args.no_parquet_1 else "")
    documents = plan["copies"] * plan["stdlib_files"]
    lines = [f"### Tokenize at scale ({time.strftime('%Y-%m-%d')})", "",
             f"{describe_machine()}; load average {load_before:.2f} before the runs, {load_after:.2f} after.", "",
             f"`{command}`: {text_mb:,.0f} MB of text, the `stdlib` corpus (Python {plan['python']}, "
             f"{plan['stdlib_files']} files, {plan['stdlib_bytes'] / 1e6:.1f} MB) repeated {plan['copies']} times, "
             f"as {plan['copies'] * PLAIN_PER_COPY} plain .txt files ({disk_mb['plain']:,.0f} MB) and as "
             f"{plan['parquet_files']} Parquet file{'s' * (plan['parquet_files'] > 1)} "
             f"({disk_mb['parquet']:,.0f} MB on disk, {documents:,} rows, one row group per copy, snappy). "
             f"GPT-2 BPE; {counts['raw', 2]:,} ids from raw tiktoken. MB/s counts text bytes (for Parquet, the "
             f"same text, not the compressed bytes on disk); seconds run from the child process's start to its "
             f"exit; peak RSS is each child's with its worker processes (sampled sum). Raw tiktoken reads "
             f"4 Mi-character pieces and encodes 16 Mi characters at a time with "
             f"`encode_ordinary_batch(pieces, num_threads=workers)`, discarding the ids; gptcli writes its shards (deleted after each run).", "",
             "| what | workers | seconds | MB/s | peak RSS |", "|---|---|---|---|---|"]
    for key, (seconds, peak) in rows.items():
        lines.append(f"| {names[key[0]]} | {key[1]} | {seconds:.1f} | {mbps(key):.1f} | {peak:,.0f} MB |")
    lines.append("")
    for workers in (1, 2):
        lines.append(f"- **gptcli plain / raw tiktoken, {workers} worker{'s' * (workers > 1)}: "
                     f"{mbps(('plain', workers)) / mbps(('raw', workers)):.0%}** (target ≥ 90%)")
    for workers in (2, 1):
        if ("parquet", workers) in rows:
            lines.append(f"- **gptcli Parquet / plain, {workers} worker{'s' * (workers > 1)}: "
                         f"{mbps(('parquet', workers)) / mbps(('plain', workers)):.0%}**")
    for kind in ("raw", "plain", "parquet"):
        if (kind, 1) in rows:
            lines.append(f"- **2 workers / 1 worker, {names[kind]}: {mbps((kind, 2)) / mbps((kind, 1)):.2f}×**")
    gptcli_peak = max(peak for (kind, _), (_, peak) in rows.items() if kind != "raw")
    lines.append(f"- **gptcli's largest peak RSS: {gptcli_peak:,.0f} MB** (target < 1 GB at any size)")
    extra = {key: counts[key] - counts["raw", 2] for key in counts if key[0] != "raw"}
    lines += ["", f"Ids written by gptcli minus raw tiktoken's (end-of-text ids: "
                  f"{plan['copies'] * PLAIN_PER_COPY:,} plain documents, {documents:,} Parquet rows; the pieces "
                  f"are cut at different places): "
                  + ", ".join(f"{kind} {workers}: {n:+,}" for (kind, workers), n in extra.items()), ""]
    publish("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
