"""The same workloads on two source trees of gptcli, in alternating rounds on one machine:
did a change (a refactor, say) cost speed?

    git worktree add /tmp/before <commit>
    python benchmarks/bench_before_after.py --before /tmp/before/src [--rounds 3] [--write]

Each workload runs in a fresh process with PYTHONPATH set to one tree's `src`, before and
after taking turns, so a busy moment of a shared machine falls on both:
- train: `gptcli pretrain configs/demo.yaml` for --steps steps in fp32 (no evaluation or
  saving in between); the median of the logged tokens/s after the first interval.
- sample: `sample()` of --tokens greedy tokens from one checkpoint (trained by this script
  with the after tree), at batch 1 and batch 8: generated tokens / wall time of generating,
  loading excluded.
- serve: `gptcli serve` of that checkpoint; 8 clients at once, each a streaming
  /v1/completions request of --tokens tokens: generated tokens / wall time.
Reported: the medians per tree and after / before.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_SNIPPET = """
import sys, time
from gptcli.infer.sample import SampleRequest, sample
checkpoint, tokens, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = SampleRequest(prompt="def ", max_new_tokens=tokens, temperature=0.0, num_samples=batch, device="cpu")
sample(checkpoint, SampleRequest(prompt="def ", max_new_tokens=8, temperature=0.0, device="cpu"))  # warm-up
started = [None]
def first(row, text):
    if started[0] is None:
        started[0] = time.perf_counter()
_, samples = sample(checkpoint, request, on_text=first)
print(sum(len(s.tokens) for s in samples) / (time.perf_counter() - started[0]))
"""


def run_env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src)}


def train_speed(src: Path, steps: int, work: Path) -> float:
    out = work / f"train-{abs(hash(str(src)))}"
    subprocess.run([sys.executable, "-m", "gptcli", "pretrain", str(ROOT / "configs" / "demo.yaml"), "--overwrite",
                    "--set", f"out_dir={out}", "--set", f"train.max_steps={steps}", "--set", "train.eval_every=100000",
                    "--set", "train.save_every=100000", "--set", "train.precision=fp32", "--set", "train.log_every=10"],
                   check=True, env=run_env(src), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]  # the first interval warms up
    return statistics.median(speeds)


def sample_speed(src: Path, checkpoint: Path, tokens: int, batch: int) -> float:
    done = subprocess.run([sys.executable, "-c", SAMPLE_SNIPPET, str(checkpoint), str(tokens), str(batch)],
                          check=True, env=run_env(src), capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def serve_speed(src: Path, checkpoint: Path, tokens: int, clients: int = 8) -> float:
    server = subprocess.Popen([sys.executable, "-m", "gptcli", "serve", "-c", str(checkpoint), "--port", "0",
                               "--device", "cpu"], env=run_env(src), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in server.stdout:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found[1])
                break
        if port is None:
            raise RuntimeError("the server did not start")
        counts = [0] * clients

        def client(i: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = json.dumps({"prompt": f"def f{i}(", "max_tokens": tokens, "temperature": 1.0, "seed": i,
                               "stream": True, "stream_options": {"include_usage": True}})
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            for line in connection.getresponse().read().decode().splitlines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        counts[i] = usage["completion_tokens"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="the `src` folder of the tree to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "demo"
        subprocess.run([sys.executable, "-m", "gptcli", "pretrain", str(ROOT / "configs" / "demo.yaml"),
                        "--set", f"out_dir={checkpoint}", "--set", "train.max_steps=50"],
                       check=True, env=run_env(trees["after"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        workloads = {
            "train step (tokens/s)": lambda src: train_speed(src, args.steps, work),
            "sample, batch 1 (tokens/s)": lambda src: sample_speed(src, checkpoint, args.tokens, 1),
            "sample, batch 8 (tokens/s)": lambda src: sample_speed(src, checkpoint, args.tokens, 8),
            "serve, 8 clients (tokens/s)": lambda src: serve_speed(src, checkpoint, args.tokens),
        }
        results = {name: {tree: [] for tree in trees} for name in workloads}
        for _ in range(args.rounds):
            for name, measure in workloads.items():
                for tree, src in trees.items():
                    results[name][tree].append(measure(src))
    lines = ["| workload | before | after | after / before |", "|---|---|---|---|"]
    for name, by_tree in results.items():
        before, after = (statistics.median(by_tree[t]) for t in ("before", "after"))
        lines.append(f"| {name} | {before:,.0f} | {after:,.0f} | {after / before:.2f} |")
    text = "\n".join([f"### Before and after ({time.strftime('%Y-%m-%d')}, `python benchmarks/bench_before_after.py "
                      f"--before {args.before}`, medians of {args.rounds} alternating rounds)", "",
                      describe_machine(), "", *lines])
    publish(text, args.write)


if __name__ == "__main__":
    main()
