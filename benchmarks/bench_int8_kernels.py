"""One batch-1 linear layer on the CPU: torch's weight-only int8 kernel, which
`--quantize int8` uses, against fbgemm's dynamic int8 kernel (int8 weights with one scale
per output channel, activations quantized on the fly: W8A8), and, when torchao is installed,
torchao's weight-only int8 (`Int8WeightOnlyConfig`) and dynamic W8A8
(`Int8DynamicActivationInt8WeightConfig`) layers, at GPT-2 124M's layer shapes. Evidence
for where a faster int8 decode would come from (BENCHMARKS.md, issues 18 and 30).

    python benchmarks/bench_int8_kernels.py [--calls 300] [--write]
"""

from __future__ import annotations

import argparse
import importlib.util
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


def torchao_layer(weight: torch.Tensor, config_name: str):
    """A linear layer quantized by torchao's `quantize_` with the named config (bf16
    activations for weight-only, as gptcli's int8 runs; fp32 for W8A8)."""
    import torchao.quantization as tq

    dtype = torch.bfloat16 if config_name == "Int8WeightOnlyConfig" else torch.float32
    linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=False).to(dtype)
    linear.weight.data = weight.to(dtype)
    tq.quantize_(linear, getattr(tq, config_name)())
    return lambda x: linear(x.to(dtype))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    has_torchao = importlib.util.find_spec("torchao") is not None
    torchao_columns = ["torchao weight-only int8", "torchao dynamic W8A8"] if has_torchao else []
    lines = ["### int8 kernels at batch 1, one linear layer (issues 18, 30)", "", describe_machine(), "",
             f"`python benchmarks/bench_int8_kernels.py --calls {args.calls}`: time per call, one row of "
             f"input; weights read per second counts one byte per weight."
             + ("" if has_torchao else " (torchao not installed: its columns left out)"), "",
             "| in × out | torch `_weight_int8pack_mm` (weight-only: gptcli) | fbgemm dynamic (W8A8) | "
             + "".join(f"{c} | " for c in torchao_columns) + "best against gptcli's |",
             "|---|---|---|" + "---|" * len(torchao_columns) + "---|"]

    def cell(us: float, weights: int) -> str:
        return f"{us:.0f} µs ({weights / us / 1e3:.0f} GB/s)"

    with torch.no_grad():
        for n_in, n_out in SHAPES:
            weight = torch.randn(n_out, n_in)
            x = torch.randn(1, n_in)
            layers = [weight_only(weight), dynamic_w8a8(weight)]
            if has_torchao:
                layers += [torchao_layer(weight, "Int8WeightOnlyConfig"),
                           torchao_layer(weight, "Int8DynamicActivationInt8WeightConfig")]
            times = [microseconds(lambda layer=layer: layer(x), args.calls) for layer in layers]
            lines.append(f"| {n_in} × {n_out} | " + " | ".join(cell(t, weight.numel()) for t in times)
                         + f" | {times[0] / min(times[1:]):.2f}× |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
