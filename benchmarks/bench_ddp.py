"""Data-parallel scaling on CPU: 1 process versus 2 under torchrun (gloo), same global batch.

    python benchmarks/bench_ddp.py [--steps 40] [--write]

The mid shape (6 layers, 384 wide, context 256) on the built-in corpus, fp32, global batch
8 (1 x 8, then 2 x 4). Throughput is the median tokens/s of the logged steps after the
first five. Efficiency = 2-process tokens/s / (2 x 1-process tokens/s) would be the GPU
reading; on one 2-core machine both runs share the same cores, so the fair reading is the
plain ratio of the two throughputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import describe_machine, publish


def run(tmp: Path, processes: int, steps: int) -> float:
    cfg = {"out_dir": str(tmp / f"p{processes}"), "data": {"inputs": ["stdlib"], "tokenizer": "bytes"},
           "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
           "train": {"batch_size": 8 // processes, "max_steps": steps, "log_every": 1, "eval_every": 10_000,
                     "save_every": 10_000, "eval_batches": 1, "precision": "fp32", "device": "cpu"}}
    (tmp / "cfg.yaml").write_text(json.dumps(cfg))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    subprocess.run([*launcher, "-m", "gptcli", "pretrain", str(tmp / "cfg.yaml")], check=True,
                   capture_output=True)
    rows = [json.loads(line) for line in (tmp / f"p{processes}" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and r["step"] > 5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp), 1, args.steps)
        two = run(Path(tmp), 2, args.steps)
    text = "\n".join([
        f"### Data-parallel scaling on CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
        f"`python benchmarks/bench_ddp.py --steps {args.steps}`: mid shape, fp32, global batch 8, "
        f"gloo, one machine.", "",
        "| processes | tokens/s | relative |", "|---|---|---|",
        f"| 1 (batch 8) | {one:,.0f} | 1.00 |",
        f"| 2 (batch 4 each) | {two:,.0f} | {two / one:.2f} |", ""])
    publish(text, args.write)


if __name__ == "__main__":
    main()
