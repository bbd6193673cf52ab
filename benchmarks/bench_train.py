"""Train-step throughput: gptcli's model and loop step versus transformers' GPT2LMHeadModel.

    python benchmarks/bench_train.py [--shapes nano mid] [--steps 20] [--compile] [--write]

Same shape, same data, same optimizer (AdamW, weight decay on matrices, clip 1.0), in fp32
and in bf16 autocast, one process, measurements interleaved (gptcli, transformers,
gptcli, ...) so machine noise hits both alike. A step is forward, backward, clip and
AdamW. MFU is against the bf16 matrix-product peak measured here (2048 x 2048).
With --compile, gptcli's model is also timed under torch.compile (`train.compile: true`;
off by default on CPU), its compile time reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import describe_machine, publish

SHAPES = {  # name: (n_layer, n_head, n_embd, context, batch, vocab)
    "nano": (4, 4, 128, 64, 12, 65),  # nanoGPT's shakespeare_char CPU settings
    "mid": (6, 6, 384, 256, 8, 65),  # nanoGPT's shakespeare_char GPU model, batch 8
    "124M": (12, 12, 768, 1024, 8, 50257),  # GPT-2 small (a GPU shape; slow on CPU)
}


def gptcli_step(shape, precision_name, compiled=False):
    from gptcli.config import ModelConfig, TrainConfig
    from gptcli.model.gpt import GPT
    from gptcli.runtime import Precision
    from gptcli.train.loop import _clip, _forward_backward
    from gptcli.train.optim import build_optimizer

    n_layer, n_head, n_embd, ctx, batch, vocab = shape
    model = GPT(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=ctx,
                            vocab_size=vocab, dropout=0.0))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    precision = Precision(precision_name, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randint(0, vocab, (2, batch, ctx))
    batches = [{"idx": x, "targets": y}]
    step_model = torch.compile(model) if compiled else model

    def step():
        loss = _forward_backward(step_model, batches, precision, scaler)
        _clip(model, opt, scaler, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model.num_params(include_positions=False)


def hf_step(shape, precision_name):
    import transformers

    n_layer, n_head, n_embd, ctx, batch, vocab = shape
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=ctx,
                                     vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))
    x = torch.randint(0, vocab, (batch, ctx))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision_name == "bf16")

    def step():
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["nano", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from gptcli.runtime import measure_matmul_flops

    torch.manual_seed(0)
    peak = measure_matmul_flops(torch.device("cpu"), torch.bfloat16, n=2048, seconds=2.0)
    peak_fp32 = measure_matmul_flops(torch.device("cpu"), torch.float32, n=2048, seconds=2.0)
    rows = []
    compile_seconds = []
    ours_kinds = ["gptcli", "gptcli compiled"] if args.compile else ["gptcli"]
    for name in args.shapes:
        shape = SHAPES[name]
        n_layer, _, n_embd, ctx, batch, _ = shape
        results = {}
        for precision in ("fp32", "bf16"):
            steps = {"transformers": hf_step(shape, precision)}
            for kind in ours_kinds:
                steps[kind], n_params = gptcli_step(shape, precision, compiled=kind.endswith("compiled"))
                start = time.perf_counter()
                steps[kind]()  # the first call compiles
                if kind.endswith("compiled"):
                    compile_seconds.append(time.perf_counter() - start)
            for step in steps.values():  # warm-up: allocator, kernels, optimizer state
                for _ in range(3):
                    step()
            samples = {who: [] for who in steps}
            for _ in range(args.rounds):
                for who, step in steps.items():
                    samples[who].append(time_steps(step, args.steps))
            for who, values in samples.items():
                results[(who, precision)] = statistics.median(values)
        tokens = batch * ctx
        flops = (6 * n_params + 12 * n_layer * ctx * n_embd) * tokens
        kinds = ours_kinds + ["transformers"]
        best = {who: min(("fp32", "bf16"), key=lambda p: results[(who, p)]) for who in kinds}
        for precision in ("fp32", "bf16"):
            for who in kinds:
                seconds = results[(who, precision)]
                rows.append((name, who, precision, seconds * 1000, tokens / seconds, flops / seconds / peak))
        for who in ours_kinds:
            ratio = results[("transformers", best["transformers"])] / results[(who, best[who])]
            rows.append((name, "ratio", f"{who} {best[who]} / transformers {best['transformers']}", ratio, None, None))
    lines = [f"### Train step on CPU ({time.strftime('%Y-%m-%d')})", "", describe_machine(), "",
             f"`python benchmarks/bench_train.py --shapes {' '.join(args.shapes)} --steps {args.steps}"
             f"{' --compile' if args.compile else ''}`; "
             f"median of {args.rounds} interleaved rounds of {args.steps} steps. Measured matmul peak "
             f"(2048²): bf16 {peak / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s; MFU is "
             f"against the bf16 peak." + (f" Compiling took {min(compile_seconds):.0f}-"
                                         f"{max(compile_seconds):.0f} s per model (not in the step times)."
                                         if compile_seconds else ""), "",
             "| shape | implementation | precision | ms/step | tokens/s | MFU (bf16 peak) |",
             "|---|---|---|---|---|---|"]
    for name, who, precision, ms, tps, mfu in rows:
        if who == "ratio":
            lines.append(f"| {name} | **speed-up, best vs best** | {precision} | **{ms:.2f}×** | | |")
        else:
            lines.append(f"| {name} | {who} | {precision} | {ms:.1f} | {tps:,.0f} | {100 * mfu:.1f}% |")
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
