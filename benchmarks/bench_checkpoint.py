"""Checkpoint saves under FSDP: full (gathered on rank 0) against sharded against sharded and
asynchronous, on CPU: how long training stalls at a save, and rank 0's peak memory then.

    python benchmarks/bench_checkpoint.py [--layers 12 --width 768] [--steps 12] [--save-every 4] [--write]

Two processes under torchrun (gloo, `train.parallel: fsdp`, AdamW), GPT-2 small's shape
(12 layers, 768 wide, 12 heads, context 256) over bytes from the built-in corpus, batch 1
each, fp32; a checkpoint every `--save-every` steps. Each rank trains in this script
(`--worker`), timing every step's end (log_every 1) and sampling its own resident memory
every 5 ms on a thread. The stall of a save: the wall time from the end of the step that
saves to the end of the next step, less the median time of a step that does not save (for
async the next step also overlaps the writing). Peak: rank 0's largest resident memory from
the end of the saving step to the end of the next, against its largest over the steps
before the first save (the training itself). Medians over the run's mid-run saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import describe_machine, publish

MODES = {"full": {}, "sharded": {"checkpoint": "sharded"},
         "sharded + async": {"checkpoint": "sharded", "async_checkpoint": True}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One rank: train, recording (time, event) and (time, rss); rank 0 writes them out."""
    from gptcli.config import config_from_dict
    from gptcli.events import CheckpointSaved, StepLogged
    from gptcli.tasks.pretrain import pretrain

    samples, events, running = [], [], True

    def sample() -> None:
        while running:
            samples.append((time.perf_counter(), rss_bytes()))
            time.sleep(0.005)

    def on_event(event) -> None:
        if isinstance(event, StepLogged):
            events.append((time.perf_counter(), "step", event.metrics["step"]))
        elif isinstance(event, CheckpointSaved):
            events.append((time.perf_counter(), "saved", event.step))

    cfg = {"out_dir": args.out, "seed": 1,
           "data": {"inputs": ["stdlib"], "tokenizer": "bytes"},
           "model": {"arch": "gpt2", "n_layer": args.layers, "n_head": args.width // 64, "n_embd": args.width,
                     "block_size": 256, "dropout": 0.0},
           "train": {"batch_size": 1, "max_steps": args.steps, "save_every": args.save_every,
                     "eval_every": 10_000, "eval_batches": 1, "log_every": 1, "precision": "fp32",
                     "compile": "off", "device": "cpu", "parallel": "fsdp", **json.loads(args.mode)}}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    pretrain(config_from_dict(cfg), on_event=on_event)
    running = False
    thread.join()
    if os.environ.get("RANK", "0") == "0":
        Path(args.record).write_text(json.dumps({"samples": samples, "events": events}))


def measure(record: dict, save_every: int, steps: int) -> tuple[float, float, float]:
    """(median stall s, median peak MB at a save, peak MB of training before any save)."""
    ends = {step: t for t, kind, step in record["events"] if kind == "step"}
    plain = [ends[s] - ends[s - 1] for s in range(2, steps + 1) if (s - 1) % save_every != 0]
    step_time = statistics.median(plain)
    saves = [s for s in range(save_every, steps, save_every)]  # mid-run saves: a next step follows
    stalls = [ends[s + 1] - ends[s] - step_time for s in saves]

    def peak(start: float, stop: float) -> float:
        return max(rss for t, rss in record["samples"] if start <= t <= stop) / 1e6

    peaks = [peak(ends[s], ends[s + 1]) for s in saves]
    before = peak(ends[1], ends[save_every])
    return statistics.median(stalls), statistics.median(peaks), before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        for name, mode in MODES.items():
            record = Path(tmp) / f"{len(rows)}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       __file__, "--worker", "--mode", json.dumps(mode), "--out", str(Path(tmp) / f"run{len(rows)}"),
                       "--record", str(record), "--layers", str(args.layers), "--width", str(args.width),
                       "--steps", str(args.steps), "--save-every", str(args.save_every)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name] = measure(json.loads(record.read_text()), args.save_every, args.steps)
            print(f"{name}: stall {rows[name][0]:.2f} s, peak {rows[name][1]:,.0f} MB "
                  f"(training {rows[name][2]:,.0f} MB)", file=sys.stderr)
    lines = [f"### Checkpoint saves under FSDP: full, sharded, async ({time.strftime('%Y-%m-%d')})", "",
             describe_machine(), "",
             f"`python benchmarks/bench_checkpoint.py --layers {args.layers} --width {args.width} --steps "
             f"{args.steps} --save-every {args.save_every}`: 2 processes (torchrun, gloo, fsdp, AdamW, fp32), {args.layers} x {args.width} GPT-2 "
             f"shape over bytes, context 256, batch 1 each; a save every {args.save_every} steps. Stall: the time "
             f"a save adds to the step after it; peak: rank 0's resident memory from the saving step to the next, "
             f"against its peak while training before the first save.", "",
             "| checkpoint | stall at a save | rank 0 peak at a save | rank 0 peak training | stall vs full |",
             "|---|---|---|---|---|"]
    full_stall = rows["full"][0]
    for name, (stall, peak, before) in rows.items():
        lines.append(f"| {name} | {stall:.2f} s | {peak:,.0f} MB | {before:,.0f} MB | "
                     f"{stall / full_stall:.2f}× |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
