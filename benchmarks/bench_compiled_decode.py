"""The compiled decode step (`gptcli sample --compile on`) against the eager loop on CPU:
decode speed, and what compiling costs, cold and with Inductor's cache warm.

    python benchmarks/bench_compiled_decode.py [--shapes mid 124M] [--tokens 128] [--write]

Each measurement runs in a child process (a fresh Python, as `gptcli sample` would be):
  eager     generate_tokens as `sample --compile off` runs it (attending over the filled
            prefix of the cache, in steps of 16 slots);
  compiled  generate_tokens with CompiledDecode (mode "default": CUDA graphs are for CUDA),
            attending over the whole context-long cache at every step (one shape).
A random GPT-2-shaped model (bench_sample.py's shapes), prepared as `sample` prepares it,
greedy, an 8-token prompt, --tokens new tokens at batch 1 and 8. Reported: the first
generation's wall time (for the compiled step: compiling included; "cold" with an empty
Inductor cache directory, "warm" in a second process that finds the first one's cache), and
tokens/s of the runs after it (median of 3). The break-even is how many new tokens a request
needs before compiling pays for itself, with the cache warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from report import describe_machine, publish

SHAPES = {"mid": (6, 6, 384, 256, 65), "124M": (12, 12, 768, 1024, 50257)}  # bench_sample.py's


def child(shape: str, batch: int, tokens: int, compiled: bool, precision: str) -> None:
    """Run in a child process: print {"first": s, "rates": [tokens/s, ...]} as JSON."""
    import torch

    from gptcli.config import ModelConfig
    from gptcli.infer.compiled import CompiledDecode
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.model.gpt import GPT
    from gptcli.runtime import DTYPES

    n_layer, n_head, n_embd, context, vocab = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=context, vocab_size=vocab))
    model = for_generation(model.eval(), DTYPES[precision])
    prompt = torch.randint(1, vocab, (8,)).tolist()
    step = CompiledDecode(cuda_graphs=False) if compiled else None

    def run() -> float:
        start = time.perf_counter()
        for _ in generate_tokens(model, prompt, tokens, SamplingSettings(temperature=0), batch, compiled=step):
            pass
        return time.perf_counter() - start

    first = run()
    rates = [batch * tokens / run() for _ in range(3)]
    assert step is None or step.fallback is None, step.fallback
    print(json.dumps({"first": first, "rates": rates}))


def measure(args: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["mid", "124M"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, batch, tokens, compiled, precision = args.child
        child(shape, int(batch), int(tokens), compiled == "1", precision)
        return
    rows = []
    for shape in args.shapes:
        for precision in args.precisions:
            for batch in (1, 8):
                common = [shape, str(batch), str(args.tokens)]
                eager = measure([*common, "0", precision], dict(os.environ))
                with tempfile.TemporaryDirectory() as cache:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                    cold = measure([*common, "1", precision], env)
                    warm = measure([*common, "1", precision], env)
                eager_rate, compiled_rate = statistics.median(eager["rates"]), statistics.median(warm["rates"])
                # Tokens at which eager's time equals the compiled run's (warm compile + decode).
                per_token_saved = batch / eager_rate - batch / compiled_rate
                compile_cost = warm["first"] - batch * args.tokens / compiled_rate
                break_even = compile_cost / per_token_saved if per_token_saved > 0 else float("inf")
                rows.append((shape, precision, batch, eager["first"], cold["first"], warm["first"], eager_rate,
                             compiled_rate, break_even))
                print(rows[-1], file=sys.stderr, flush=True)
    lines = [f"### Compiled decode on CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_compiled_decode.py --shapes {' '.join(args.shapes)} --precisions "
             f"{' '.join(args.precisions)} --tokens {args.tokens}`: random weights, greedy, 8-token prompt, "
             f"{args.tokens} new tokens; each cell a fresh process. First run: wall time of the first "
             f"generation (compiled: compiling included, with an empty Inductor cache and then with the "
             f"first process's cache); tokens/s: median of the 3 runs after it.", "",
             "| shape | weights | batch | eager first run | compiled first run, cold | warm | eager tokens/s "
             "| compiled tokens/s | compiled / eager | break-even (new tokens, warm) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, precision, batch, eager_first, cold, warm, eager_rate, compiled_rate, break_even in rows:
        even = f"{break_even:,.0f}" if break_even != float("inf") else "never"
        lines.append(f"| {shape} | {precision} | {batch} | {eager_first:.2f} s | {cold:.1f} s | {warm:.1f} s | "
                     f"{eager_rate:,.0f} | {compiled_rate:,.0f} | **{compiled_rate / eager_rate:.2f}×** | {even} |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
