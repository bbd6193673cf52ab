"""Train the shipped CPU configs end to end and record what they reach.

    python benchmarks/bench_configs.py [--only shakespeare-char|demo] [--write]

For each config: wall time of `gptcli pretrain`, ms per step (median over logged
intervals, evaluation and saving excluded), final and best validation loss, and a sample
from the trained model. With --write the table is appended to BENCHMARKS.md with the
machine it ran on. Runs go to runs/bench-<config>, replacing earlier ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "shakespeare-char": {"prompt": "ROMEO:", "target": 1.88},  # nanoGPT's val loss at step 2000
    "demo": {"prompt": "def ", "target": None},
}


def run(name: str) -> dict:
    out_dir = ROOT / "runs" / f"bench-{name}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptcli", "pretrain", str(ROOT / "configs" / f"{name}.yaml"),
                    "--set", f"out_dir={out_dir}", "--overwrite"], check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    tokens_per_step = steps[0]["tokens_seen"] / steps[0]["step"]
    ms_per_step = statistics.median(1000 * tokens_per_step / r["tokens_per_sec"] for r in steps)
    sample = subprocess.run(
        [sys.executable, "-m", "gptcli", "sample", "-c", str(out_dir), "-p", CONFIGS[name]["prompt"],
         "-n", "300", "--seed", "0", "--temperature", "0.8"],
        check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return {"config": name, "steps": steps[-1]["step"], "wall_s": wall, "ms_per_step": ms_per_step,
            "final_val": evals[-1]["val_loss"], "best_val": min(e["val_loss"] for e in evals),
            "val_bpb": evals[-1]["val_bpb"], "target": CONFIGS[name]["target"], "sample": sample,
            "precision": (out_dir / "config.yaml").read_text().split("precision: ")[1].split()[0]}


def table(results: list[dict]) -> str:
    lines = ["| config | steps | wall time | ms/step | final val loss | best val loss | val bpb | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = f"≤ {r['target']}" if r["target"] else "-"
        lines.append(f"| {r['config']} | {r['steps']} | {r['wall_s']:.0f} s | {r['ms_per_step']:.1f} | "
                     f"{r['final_val']:.4f} | {r['best_val']:.4f} | {r['val_bpb']:.3f} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--write", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    results = [run(name) for name in CONFIGS if args.only in (None, name)]
    report = [f"### Shipped configs, CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
              table(results), ""]
    for r in results:
        prompt = CONFIGS[r["config"]]["prompt"]
        report += [f"Sample from `{r['config']}` (`gptcli sample -p {prompt!r} -n 300 --seed 0`):",
                   "", "```", r["sample"].rstrip(), "```", ""]
    text = "\n".join(report)
    publish(text, args.write)


if __name__ == "__main__":
    main()
