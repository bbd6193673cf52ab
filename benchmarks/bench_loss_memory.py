"""Training memory and step time of the loss: chunked (`GPT.forward`) versus the whole batch's
logits at once (the path before it).

    python benchmarks/bench_loss_memory.py [--batch 4] [--context 1024] [--precisions fp32 bf16]
        [--rounds 3] [--steps 1] [--chunk-logits N] [--write]

GPT-2 124M's shape (12 layers, 768 wide, 50,257 ids). A step is forward, backward, clip and
AdamW, through the training loop's own `_forward_backward`. The whole-batch path is the
old `forward`: `F.cross_entropy` over `logits(hidden_states(idx)).float()`.

Peak memory: on CPU each (path, precision) runs in a child process of its own, and its
peak resident set (VmHWM, else `ru_maxrss`) over two steps is reported, and the part above the model
and optimizer: above the peak after a first step on a single token (which made the
gradients and AdamW's moments); on CUDA `max_memory_allocated`. Step
time: both paths in this process, interleaved rounds (noise hits both alike), the
median; the ratio is chunked / whole-batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from report import describe_machine, publish
from torch import nn

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)  # GPT-2 124M


class WholeBatchLoss(nn.Module):
    """The model with the loss of the path before chunking: every logit of the batch at once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from gptcli.model.gpt import IGNORE_INDEX

        logits = self.model.logits(self.model.hidden_states(idx))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")


def build(batch: int, context: int, precision_name: str, device: torch.device, chunk_logits: int | None):
    """(model, {path: step function}) for one precision."""
    import gptcli.model.gpt as gpt
    from gptcli.config import ModelConfig, TrainConfig
    from gptcli.runtime import Precision
    from gptcli.train.loop import _clip, _forward_backward
    from gptcli.train.optim import build_optimizer

    if chunk_logits:
        gpt.LOSS_CHUNK_LOGITS = chunk_logits
    torch.manual_seed(0)
    model = gpt.GPT(ModelConfig(block_size=context, dropout=0.0, **SHAPE)).to(device)
    opt = build_optimizer(model, TrainConfig(), device)
    precision = Precision(precision_name, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x, y = torch.randint(0, SHAPE["vocab_size"], (2, batch, context), device=device)

    def stepper(step_model: nn.Module):
        def step(batches=({"idx": x, "targets": y},)) -> float:
            loss = _forward_backward(step_model, batches, precision, scaler)
            _clip(model, opt, scaler, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    return model, {"whole batch": stepper(WholeBatchLoss(model)), "chunked": stepper(model)}


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM where Linux has it (`ru_maxrss` also keeps
    what the parent held when it forked this process), else `ru_maxrss`."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(path: str, args) -> None:
    """Run in a fresh process: two steps of one path; print the peaks as JSON."""
    _, steps = build(args.batch, args.context, args.child_precision, torch.device("cpu"), args.chunk_logits)
    one_token = torch.zeros((1, 1), dtype=torch.long)
    steps[path]([{"idx": one_token, "targets": one_token}])  # gradients and AdamW's moments exist from here
    base = peak_rss_bytes()
    losses = [steps[path]() for _ in range(2)]
    print(json.dumps({"peak": peak_rss_bytes(), "base": base, "losses": losses}))


def memory_cpu(path: str, precision: str, args) -> dict:
    command = [sys.executable, __file__, "--child", path, "--child-precision", precision,
               "--batch", str(args.batch), "--context", str(args.context)]
    if args.chunk_logits:
        command += ["--chunk-logits", str(args.chunk_logits)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_cuda(step, device: torch.device) -> dict:
    step()  # optimizer state exists from here on
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = step()
    return {"peak": torch.cuda.max_memory_allocated(device), "base": base, "losses": [loss]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="steps per path per round")
    parser.add_argument("--chunk-logits", type=int, default=None,
                        help="logits per chunk of the loss (default: gpt.LOSS_CHUNK_LOGITS)")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import gptcli.model.gpt as gpt

    chunk_logits = args.chunk_logits or gpt.LOSS_CHUNK_LOGITS
    rows_per_chunk = max(1, chunk_logits // SHAPE["vocab_size"])
    logits_gb = args.batch * args.context * SHAPE["vocab_size"] * 4 / 1e9
    lines = [f"### Loss memory: chunked vs whole-batch logits, GPT-2 124M ({time.strftime('%Y-%m-%d')})", "",
             describe_machine(), "",
             f"`python benchmarks/bench_loss_memory.py --batch {args.batch} --context {args.context} "
             f"--precisions {' '.join(args.precisions)} --rounds {args.rounds} --steps {args.steps}"
             f"{f' --chunk-logits {args.chunk_logits}' if args.chunk_logits else ''}`; batch "
             f"{args.batch} x {args.context} on {device.type}; chunks of {rows_per_chunk} rows "
             f"({rows_per_chunk * SHAPE['vocab_size'] * 4 / 2**20:.0f} MiB of fp32 logits); the whole "
             f"batch's fp32 logits are {logits_gb:.2f} GB. Peak: "
             + ("each path in its own process, peak RSS over two steps; above model+optimizer: "
                "that less the peak after a first step on one token."
                if device.type == "cpu" else "max_memory_allocated over a step; above model+optimizer: "
                "that less the memory allocated before the step.")
             + f" Step: forward, backward, clip, AdamW; median of {args.rounds} interleaved rounds.", "",
             "| precision | loss path | peak memory | above model+optimizer | step | first loss |",
             "|---|---|---|---|---|---|"]
    for precision in args.precisions:
        model, steps = build(args.batch, args.context, precision, device, args.chunk_logits)
        if device.type == "cpu":
            memory = {path: memory_cpu(path, precision, args) for path in steps}
        else:
            memory = {path: memory_cuda(step, device) for path, step in steps.items()}
        for step in steps.values():  # warm-up
            step()
        times = {path: [] for path in steps}
        for _ in range(args.rounds):
            for path, step in steps.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()  # .item() inside: synchronised
                times[path].append((time.perf_counter() - start) / args.steps)
        median = {path: statistics.median(values) for path, values in times.items()}
        for path in steps:
            m = memory[path]
            lines.append(f"| {precision} | {path} | {m['peak'] / 1e9:.2f} GB | {(m['peak'] - m['base']) / 1e9:.2f} GB "
                         f"| {median[path] * 1000:.0f} ms | {m['losses'][0]:.4f} |")
        whole, chunked = memory["whole batch"], memory["chunked"]
        lines.append(f"| {precision} | **chunked / whole batch** | **{chunked['peak'] / whole['peak']:.2f}×** | "
                     f"**{(chunked['peak'] - chunked['base']) / (whole['peak'] - whole['base']):.2f}×** | "
                     f"**{median['chunked'] / median['whole batch']:.3f}×** | |")
        del model, steps
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
