"""Validation loss of a run's checkpoint over its whole validation split.

    python benchmarks/full_val.py RUN_DIR [--write]

Training evaluations average a fixed sample of windows (train.eval_batches); this
evaluates every non-overlapping window of block_size tokens of the validation split, for
a number without sampling noise. It rebuilds the run's tokenized data from its config
(through the same cache), so the run's inputs must still be there.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from report import describe_machine, publish


def whole_split(run_dir) -> dict:
    """The run's checkpoint evaluated on every whole window of its validation split: the
    checkpoint, the windows and their length, val_loss and val_bpb."""
    from gptcli.config import load_config
    from gptcli.data.training.dataset import TokenDataset, prepare_dataset
    from gptcli.evals.lm import validation_loss
    from gptcli.runtime import Precision
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    cfg = load_config(f"{run_dir}/config.yaml")
    checkpoint = resolve_checkpoint(run_dir)
    model, _ = load_model(checkpoint)
    dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed))
    T = model.config.block_size
    val = np.asarray(dataset.splits["val"], dtype=np.int64)
    n = (len(val) - 1) // T
    x = torch.from_numpy(val[: n * T].reshape(n, T))
    y = torch.from_numpy(val[1: n * T + 1].reshape(n, T))
    batches = ({"idx": x[i:i + 64], "targets": y[i:i + 64]} for i in range(0, n, 64))
    metrics = validation_loss(model, batches, Precision("fp32", "cpu"), dataset.bytes_per_token["val"])
    return {"checkpoint": checkpoint, "windows": n, "context": T, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    r = whole_split(args.run_dir)
    n, T = r["windows"], r["context"]
    text = "\n".join([
        f"Full validation split of `{args.run_dir}` ({time.strftime('%Y-%m-%d')}, `python benchmarks/full_val.py "
        f"{args.run_dir}`): checkpoint `{r['checkpoint'].name}`, {n:,} windows of {T} tokens "
        f"({n * T:,} tokens): **val loss {r['val_loss']:.4f}**, bpb {r['val_bpb']:.4f}, "
        f"perplexity {math.exp(r['val_loss']):.2f}. {describe_machine()}", ""])
    publish(text, args.write)


if __name__ == "__main__":
    main()
