"""Causal attention on CPU, one layer forward + backward: gptcli's explicit bf16 path
(`attention.explicit_causal_attention`) versus `scaled_dot_product_attention`.

    python benchmarks/bench_attention.py [--dtypes bf16 fp32] [--write]

The sweep that set `attention.EXPLICIT_MAX_CONTEXT`: shapes from nanoGPT's CPU model up to
GPT-2's context, each timed forward only (no grad) and forward + backward, interleaved,
median of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from report import describe_machine, publish

SHAPES = [(12, 4, 64, 32), (8, 6, 128, 64), (8, 6, 256, 64), (8, 6, 512, 64), (4, 12, 1024, 64)]  # B, nh, T, hs
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def interleaved_medians(fns: dict, repeats: int, rounds: int) -> dict:
    """Median ms per call of each function, timed in turn within every round."""
    times = {key: [] for key in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[key].append((time.perf_counter() - start) / repeats * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from gptcli.model.attention import explicit_causal_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    lines = [f"### Causal attention on CPU, one layer (`benchmarks/bench_attention.py`, {time.strftime('%Y-%m-%d')})",
             "", describe_machine(), "",
             f"`python benchmarks/bench_attention.py --dtypes {' '.join(args.dtypes)}`; median of "
             f"{args.rounds} rounds of {args.repeats}. Shapes are (batch, heads, context, head size).", "",
             "| dtype | shape | SDPA fwd ms | explicit fwd ms | SDPA fwd+bwd ms | explicit fwd+bwd ms | fwd+bwd speed-up |",
             "|---|---|---|---|---|---|---|"]
    for dtype_name in args.dtypes:
        for shape in SHAPES:
            q, k, v = (torch.randn(shape, dtype=DTYPES[dtype_name], requires_grad=True) for _ in range(3))
            grad = torch.randn(shape, dtype=DTYPES[dtype_name])
            fns = {}
            for name, fn in (("sdpa", sdpa), ("explicit", explicit_causal_attention)):
                def forward(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)

                def forward_backward(fn=fn):
                    fn(q, k, v).backward(grad)

                fns[name, "f"], fns[name, "fb"] = forward, forward_backward
            ms = interleaved_medians(fns, args.repeats, args.rounds)
            lines.append(f"| {dtype_name} | {shape} | {ms['sdpa', 'f']:.2f} | {ms['explicit', 'f']:.2f} | "
                         f"{ms['sdpa', 'fb']:.2f} | {ms['explicit', 'fb']:.2f} | "
                         f"**{ms['sdpa', 'fb'] / ms['explicit', 'fb']:.2f}×** |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
