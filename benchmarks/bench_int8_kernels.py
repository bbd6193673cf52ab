"""One batch-1 linear layer on the CPU: torch's weight-only int8 kernel, which
`--quantize int8` uses, against fbgemm's dynamic int8 kernel (int8 weights with one scale
per output channel, activations quantized on the fly: W8A8), at GPT-2 124M's layer shapes.
Evidence for where a faster int8 decode would come from (BENCHMARKS.md, issue 18).

    python benchmarks/bench_int8_kernels.py [--calls 300] [--write]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from report import describe_machine, publish

# (in_features, out_features) of GPT-2 124M: q/k/v, MLP up, MLP down, the vocabulary head.
SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50304)]


def microseconds(call, calls: int) -> float:
    for _ in range(calls // 10):  # warm caches and kernels
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def weight_only(weight: torch.Tensor):
    """The product `--quantize int8` runs on CPU: int8 weight, bf16 activations and scales."""
    scale = weight.abs().amax(dim=1) / 127  # (out,)
    int8 = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale = scale.bfloat16()
    return lambda x: torch._weight_int8pack_mm(x.bfloat16(), int8, scale)


def dynamic_w8a8(weight: torch.Tensor):
    """fbgemm's dynamically quantized linear layer, per-channel weight scales."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=False)
    linear.weight.data = weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that it is moving to torchao
        return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["### int8 kernels at batch 1, one linear layer (issue 18)", "", describe_machine(), "",
             f"`python benchmarks/bench_int8_kernels.py --calls {args.calls}`: time per call, one row of "
             f"fp32 input; weights read per second counts one byte per weight.", "",
             "| in × out | torch `_weight_int8pack_mm` (weight-only) | fbgemm dynamic (W8A8) | fbgemm faster by |",
             "|---|---|---|---|"]
    with torch.no_grad():
        for n_in, n_out in SHAPES:
            weight = torch.randn(n_out, n_in)
            x = torch.randn(1, n_in)
            packed, dynamic = weight_only(weight), dynamic_w8a8(weight)
            a, b = microseconds(lambda: packed(x), args.calls), microseconds(lambda: dynamic(x), args.calls)
            lines.append(f"| {n_in} × {n_out} | {a:.0f} µs ({weight.numel() / a / 1e3:.0f} GB/s) | "
                         f"{b:.0f} µs ({weight.numel() / b / 1e3:.0f} GB/s) | {a / b:.2f}× |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
