"""Several processes and activation checkpointing on CPU.

    python benchmarks/bench_parallel.py [--steps 40] [--write]

1. Scaling: the mid shape (6 layers, 384 wide, context 256) on the built-in corpus, fp32,
   global batch 8: one process (batch 8), then two under torchrun (gloo) with DDP and with
   FSDP2 (batch 4 each). On one 2-core machine all runs share the same cores, so the fair
   reading is the plain ratio of throughputs (on GPUs it would be tokens/s / (N x one)).
2. Activation checkpointing: the mid shape at context 1024, batch 4, one process, off and
   on: tokens/s, the bytes of activations autograd keeps for the backward pass (counted
   exactly with saved-tensor hooks over one forward) and the peak resident memory of the
   training process (which also holds the torch runtime, weights and AdamW state, and
   what the allocator keeps).

Throughput is the median tokens/s of the logged steps after the fifth.
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

MID = {"n_layer": 6, "n_head": 6, "n_embd": 384}
# Runs a command and prints the peak RSS (KiB) of its largest descendant process.
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(out: Path, steps: int, processes: int, block_size: int, batch_size: int,
        **train) -> tuple[float, float]:
    """Train `steps` steps; return (median tokens/s, peak RSS in MB of the largest process)."""
    cfg = {"out_dir": str(out), "data": {"inputs": ["stdlib"], "tokenizer": "bytes"},
           "model": {**MID, "block_size": block_size},
           "train": {"batch_size": batch_size, "max_steps": steps, "log_every": 1, "eval_every": 10_000,
                     "save_every": 10_000, "eval_batches": 1, "precision": "fp32", "device": "cpu", **train}}
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps(cfg))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *launcher, "-m", "gptcli", "pretrain", str(config)],
                          check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_sec = statistics.median(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and r["step"] > 5)
    return tokens_per_sec, int(done.stdout.split()[-1]) / 1024


def saved_activation_mb(recompute: bool, block_size: int = 1024, batch_size: int = 4) -> float:
    """MB of tensors autograd keeps from one forward for the backward, weights excluded."""
    import torch

    from gptcli.config import ModelConfig
    from gptcli.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(**MID, block_size=block_size, vocab_size=256))
    model.activation_checkpointing = recompute
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randint(0, 256, (batch_size, block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, targets=x)
    return sum(kept.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(tmp / "warm-up", 7, 1, 256, 8)  # tokenizes the corpus into the cache, outside the timings
        scaling = {
            "1 (batch 8)": run(tmp / "one", args.steps, 1, 256, 8),
            "2, ddp (batch 4 each)": run(tmp / "ddp", args.steps, 2, 256, 4, parallel="ddp"),
            "2, fsdp (batch 4 each)": run(tmp / "fsdp", args.steps, 2, 256, 4, parallel="fsdp"),
        }
        recompute = {setting: (*run(tmp / f"ckpt-{setting}", args.steps, 1, 1024, 4,
                                    activation_checkpointing=setting), saved_activation_mb(setting))
                     for setting in (False, True)}
    one = scaling["1 (batch 8)"][0]
    plain = recompute[False]
    text = "\n".join([
        f"### Several processes and activation checkpointing on CPU ({time.strftime('%Y-%m-%d')})", "",
        describe_machine(), "",
        f"`python benchmarks/bench_parallel.py --steps {args.steps}`: mid shape, fp32, gloo, one machine.", "",
        "Scaling at context 256, global batch 8:", "",
        "| processes | tokens/s | relative | peak RSS per process (MB) |", "|---|---|---|---|",
        *(f"| {name} | {tps:,.0f} | {tps / one:.2f} | {rss:,.0f} |" for name, (tps, rss) in scaling.items()),
        "", "Activation checkpointing at context 1024, batch 4, one process:", "",
        "| train.activation_checkpointing | tokens/s | relative | activations kept (MB) | relative "
        "| peak RSS (MB) |", "|---|---|---|---|---|---|",
        *(f"| {str(setting).lower()} | {tps:,.0f} | {tps / plain[0]:.2f} | {kept:,.0f} | "
          f"{kept / plain[2]:.2f} | {rss:,.0f} |" for setting, (tps, rss, kept) in recompute.items()),
        ""])
    publish(text, args.write)


if __name__ == "__main__":
    main()
