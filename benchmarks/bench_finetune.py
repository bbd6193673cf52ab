"""Built-in classify example (configs/finetune-classify.yaml), full finetuning versus LoRA,
on the CPU.

    python benchmarks/bench_finetune.py --init runs/demo [--steps 300] [--set KEY=VALUE ...] [--write]

Each mode runs in its own child process so its peak resident memory (ru_maxrss) is its
own. Reports validation accuracy against both baselines of the same run (majority class,
naive Bayes over words), macro-F1, wall time, trainable/total parameters and peak RSS;
--write appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
MODES = {"full": [], "lora r8": ["finetune.lora.rank=8", "finetune.lora.alpha=16", "finetune.aux_lm_weight=0",
                                  "train.lr=3e-3"]}


def child(init: str, steps: int, overrides: list[str], out_dir: str) -> None:
    """Run one finetune in this process and print its result as JSON."""
    from gptcli.config import FinetuneRunConfig, load_config
    from gptcli.tasks.finetune import finetune

    cfg = load_config(ROOT / "configs" / "finetune-classify.yaml",
                      [f"finetune.init_from={init}", f"train.max_steps={steps}", f"out_dir={out_dir}",
                       "finetune.patience=0", *overrides], FinetuneRunConfig)
    started = time.perf_counter()
    result = finetune(cfg, overwrite=True)
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_accuracy" in r][-1]
    print(json.dumps({
        "seconds": time.perf_counter() - started, "best_accuracy": result.best_metric,
        "final_accuracy": last["val_accuracy"], "macro_f1": last["val_macro_f1"],
        "baseline": last["val_majority_baseline"], "naive_bayes": last["val_naive_bayes_accuracy"],
        "trainable": result.trainable_params,
        "total": result.total_params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default="runs/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override for both modes (repeatable).")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.init, args.steps, args.child[1:], args.child[0])
        return
    results = {}
    for mode, overrides in MODES.items():
        out_dir = str(ROOT / "runs" / f"bench-classify-{mode.split()[0]}")
        done = subprocess.run([sys.executable, __file__, "--init", args.init, "--steps", str(args.steps),
                               "--child", out_dir, *args.overrides, *overrides], check=True, capture_output=True, text=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [f"### Finetune: built-in classify example, full vs LoRA ({time.strftime('%Y-%m-%d')})", "",
             describe_machine(), "",
             f"`python benchmarks/bench_finetune.py --init {args.init} --steps {args.steps}"
             + "".join(f" --set {o}" for o in args.overrides) + "`: configs/finetune-classify.yaml, "
             f"4 classes (stdlib package of a 6-line snippet), 1,800 train / 200 val snippets, "
             f"batch 32, no early stopping; LoRA adds "
             + ", ".join(MODES["lora r8"]) + ".", "",
             "| mode | steps | wall time | val accuracy (best / final) | macro-F1 | majority | naive Bayes | "
             "trainable / total params | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {args.steps} | {r['seconds']:.0f} s | {r['best_accuracy']:.3f} / "
                     f"{r['final_accuracy']:.3f} | {r['macro_f1']:.3f} | {r['baseline']:.3f} | "
                     f"{r['naive_bayes']:.3f} | "
                     f"{r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
                     f"{r['peak_rss_mb']:.0f} MB |")
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
