"""One command to check gptcli on a GPU: correctness first, then speed against the peers in
the same run, as one dated table (GPU, torch and CUDA versions) for BENCHMARKS.md.

    python benchmarks/gpu_check.py [--write]             # on a CUDA machine, < 10 minutes
    python benchmarks/gpu_check.py --device cpu --tiny   # every correctness check, tiny, on CPU

Correctness (tiny shapes with --tiny, else the mid shape: 6 layers, 384 wide, context 256):
compiled vs eager training losses over 20 steps; bf16 and fp16 (GradScaler) runs finite and
close to fp32; fused AdamW equal to the unfused one; compiled decode (CUDA graphs on CUDA)
giving eager decode's greedy tokens; int8 sampling quality; a one-process torchrun DDP and
FSDP2 run equal to the plain run; fp32 resume bit-identical to a straight run.

Speed (on CUDA only): GPT-2 124M at context 1024 in bf16, training tokens/s and MFU
against the datasheet peak, beside transformers' GPT2LMHeadModel; sampling at batch 1,
beside transformers' `generate`; `configs/shakespeare-char-gpu.yaml` to 5000 steps
(nanoGPT's val 1.4697 on one A100).

Each check is a row: PASS, FAIL (with what differed), or SKIP (with why). The script exits
1 if any check fails. tests/test_gpu_check.py runs the --tiny form, so CI keeps it working.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
STEPS = 20


@dataclass
class Row:
    check: str
    status: str  # PASS, FAIL, SKIP or a measurement
    detail: str


@dataclass
class Context:
    device: str
    tiny: bool
    work: Path
    corpus: Path

    def config(self, name: str, **train) -> dict:
        """A run config for the check `name`: the tiny or the mid shape, STEPS steps."""
        shape = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32} if self.tiny else
                 {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256})
        return {"out_dir": str(self.work / name), "seed": 1234,
                "data": {"inputs": [str(self.corpus)], "tokenizer": "char", "val_fraction": 0.1},
                "model": {**shape, "dropout": 0.0},
                "train": {"batch_size": 4 if self.tiny else 16, "max_steps": STEPS, "lr": 1e-3, "min_lr": 1e-4,
                          "warmup_steps": 2, "lr_decay_steps": STEPS, "eval_every": STEPS, "eval_batches": 2,
                          "save_every": STEPS,
                          "log_every": 1, "precision": "fp32", "compile": "off", "device": self.device,
                          **train}}


def pretrain_losses(cfg: dict, resume: bool = False) -> list[float]:
    """Train `cfg`; the training loss of every step."""
    from gptcli.config import config_from_dict
    from gptcli.tasks.pretrain import pretrain

    pretrain(config_from_dict(cfg), resume=resume)
    return _losses(Path(cfg["out_dir"]))


def _losses(run: Path) -> list[float]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [m["loss"] for m in lines if "loss" in m and m.get("kind", "train") == "train"]


def _worst(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two loss curves."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


# --- correctness ---------------------------------------------------------------------------


def check_compile(ctx: Context) -> Row:
    eager = pretrain_losses(ctx.config("eager"))
    try:
        compiled = pretrain_losses(ctx.config("compiled", compile="on"))
    except Exception as exc:  # no compiler toolchain: say so, do not hide it
        return Row("compiled vs eager training", "FAIL", f"compile failed: {str(exc).splitlines()[0][:120]}")
    worst = _worst(compiled, eager)
    return Row("compiled vs eager training", "PASS" if worst < 1e-2 else "FAIL",
               f"{STEPS} steps, fp32: largest loss difference {worst:.2e} (limit 1e-2)")


def check_precisions(ctx: Context) -> list[Row]:
    fp32 = pretrain_losses(ctx.config("fp32"))
    rows = []
    for precision in ("bf16", "fp16"):
        try:
            losses = pretrain_losses(ctx.config(precision, precision=precision))
        except Exception as exc:
            rows.append(Row(f"{precision} training", "SKIP", f"not available here: {str(exc).splitlines()[0][:100]}"))
            continue
        finite = all(math.isfinite(x) for x in losses)
        gap = abs(losses[-1] - fp32[-1]) / fp32[-1]
        scaled = " with GradScaler" if precision == "fp16" else ""
        rows.append(Row(f"{precision} training{scaled}", "PASS" if finite and gap < 0.05 else "FAIL",
                        f"final loss {losses[-1]:.4f} vs fp32 {fp32[-1]:.4f} ({gap:.1%}, limit 5%); "
                        f"{'all finite' if finite else 'NOT FINITE'}"))
    return rows


def check_fused_adamw(ctx: Context) -> Row:
    torch.manual_seed(0)
    params = [torch.randn(64, 64, device=ctx.device) for _ in range(3)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    finals = []
    for fused in (True, False):
        copies = [p.clone().requires_grad_() for p in params]
        optimizer = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else False)
        for step in grads:
            for p, g in zip(copies, step):
                p.grad = g.clone()
            optimizer.step()
        finals.append(copies)
    worst = max((a - b).abs().max().item() for a, b in zip(*finals))
    return Row("fused AdamW equals unfused", "PASS" if worst < 1e-5 else "FAIL",
               f"5 steps, largest parameter difference {worst:.1e} (limit 1e-5)")


def check_compiled_decode(ctx: Context) -> Row:
    """Greedy tokens of the trained fp32 model: the compiled decode step (CUDA graphs on CUDA)
    against the eager loop, 100 steps (compiled kernels may round differently: the row says
    how many tokens agree before the first difference)."""
    from gptcli.infer.compiled import CompiledDecode
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    model, tokenizer = load_model(resolve_checkpoint(ctx.work / "fp32"), torch.device(ctx.device))  # check_precisions'
    prompt, greedy = tokenizer.encode("ROMEO:"), SamplingSettings(temperature=0)
    step = CompiledDecode(cuda_graphs=ctx.device.startswith("cuda"))
    eager = torch.cat(list(generate_tokens(model, prompt, 100, greedy))).tolist()
    compiled = torch.cat(list(generate_tokens(model, prompt, 100, greedy, compiled=step))).tolist()
    if step.fallback:
        return Row("compiled decode equals eager", "FAIL", f"compiling failed: {step.fallback}")
    same = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
    mode = "CUDA graphs" if step.cuda_graphs else "no CUDA graphs"
    return Row(f"compiled decode equals eager ({mode})", "PASS" if same >= 90 else "FAIL",
               f"greedy tokens equal for {same} of 100 steps before any difference (limit 90)")


def check_int8(ctx: Context) -> Row:
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.infer.quantize import quantize_model
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    run = ctx.work / "fp32"  # trained by check_precisions
    model, tokenizer = load_model(resolve_checkpoint(run), torch.device(ctx.device))
    model.eval()
    prompt = tokenizer.encode("ROMEO:")
    greedy = SamplingSettings(temperature=0)
    full = torch.cat(list(generate_tokens(model, prompt, 100, greedy))).tolist()
    quantize_model(model, "int8")
    quant = torch.cat(list(generate_tokens(model, prompt, 100, greedy))).tolist()
    agree = sum(a == b for a, b in zip(full, quant)) / len(full)
    return Row("int8 sampling quality", "PASS" if agree >= 0.5 else "FAIL",
               f"greedy tokens equal to fp32 on {agree:.0%} of 100 steps (limit 50%)")


def check_torchrun(ctx: Context) -> list[Row]:
    plain = _losses(ctx.work / "fp32")
    rows = []
    for parallel in ("ddp", "fsdp"):
        cfg = ctx.config(f"torchrun-{parallel}", parallel=parallel)
        path = ctx.work / f"{parallel}.json"
        path.write_text(json.dumps(cfg))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               "-m", "gptcli", "pretrain", str(path)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            rows.append(Row(f"torchrun {parallel}, 1 process", "FAIL", done.stderr.strip().splitlines()[-1][:150]))
            continue
        worst = _worst(_losses(Path(cfg["out_dir"])), plain)
        rows.append(Row(f"torchrun {parallel}, 1 process", "PASS" if worst < 1e-4 else "FAIL",
                        f"{STEPS} steps: largest loss difference from one plain process {worst:.1e} (limit 1e-4)"))
    return rows


def check_resume(ctx: Context) -> Row:
    from safetensors.torch import load_file

    from gptcli.store.checkpoint import WEIGHTS
    from gptcli.store.rundir import resolve_checkpoint

    split = ctx.config("resumed")
    split["train"]["max_steps"] = STEPS // 2
    pretrain_losses(split)
    split["train"]["max_steps"] = STEPS
    pretrain_losses(split, resume=True)
    straight = load_file(resolve_checkpoint(ctx.work / "fp32") / WEIGHTS)
    resumed = load_file(resolve_checkpoint(ctx.work / "resumed") / WEIGHTS)
    same = straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    return Row("fp32 resume bit-identical", "PASS" if same else "FAIL",
               f"{STEPS // 2} steps + --resume to {STEPS} vs {STEPS} straight: weights "
               f"{'identical' if same else 'DIFFER'}")


# --- speed (CUDA) --------------------------------------------------------------------------


def _time(step: Callable[[], object], warmup: int, repeats: int) -> float:
    """Seconds per call, after warm-up, synchronised."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def speed_training(ctx: Context) -> list[Row]:
    """GPT-2 124M, context 1024, bf16, batch 16: gptcli (compiled, fused AdamW) vs transformers."""
    import transformers

    from gptcli.config import ModelConfig, TrainConfig
    from gptcli.model.gpt import GPT
    from gptcli.runtime import Precision, peak_flops
    from gptcli.train.optim import build_optimizer

    device, batch, ctx_len, vocab = torch.device(ctx.device), 16, 1024, 50257
    x, y = torch.randint(0, vocab, (2, batch, ctx_len), device=device)
    precision = Precision("bf16", "cuda")
    model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=ctx_len, vocab_size=vocab)).to(device)
    optimizer = build_optimizer(model, TrainConfig(), device)
    compiled = torch.compile(model)

    def ours():
        with precision.autocast():
            loss = compiled(x, y) / y.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - started
    seconds = _time(ours, 3, 10)
    tokens = batch * ctx_len / seconds
    mfu = model.flops_per_token() * tokens / peak_flops(device, precision)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=ctx_len, attn_implementation="sdpa")).to(device)
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=6e-4, fused=True)

    def theirs():
        with precision.autocast():
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    hf_tokens = batch * ctx_len / _time(theirs, 3, 10)
    return [Row("train GPT-2 124M, bf16, 16 x 1024", f"{tokens:,.0f} tok/s",
                f"MFU {mfu:.0%} of the datasheet peak; compile {compile_s:.0f} s; target >= 500k tok/s on an H100"),
            Row("train, transformers GPT2LMHeadModel (sdpa)", f"{hf_tokens:,.0f} tok/s",
                f"gptcli / transformers = {tokens / hf_tokens:.2f}x (target >= 1.5x)")]


def speed_sampling(ctx: Context) -> list[Row]:
    """GPT-2 124M-shaped random weights, batch 1, 256 new tokens, greedy, bf16."""
    import transformers

    from gptcli.infer.compiled import CompiledDecode
    from gptcli.infer.cpu_layout import for_generation
    from gptcli.infer.generate import SamplingSettings, generate_tokens
    from gptcli.store.hf import import_hf_model

    device = torch.device(ctx.device)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = for_generation(import_hf_model(tmp).to(device), torch.bfloat16)
    hf = hf.to(device, torch.bfloat16)
    prompt, new = list(range(100, 108)), 256
    compiled = CompiledDecode(cuda_graphs=True)

    def run_ours(step=None):
        for _ in generate_tokens(ours, prompt, new, SamplingSettings(temperature=0), compiled=step):
            pass

    def run_hf():
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    eager_rate, hf_rate = new / _time(run_ours, 1, 3), new / _time(run_hf, 1, 3)
    ours_rate = new / _time(lambda: run_ours(compiled), 2, 3)  # warm-up 2: compile, then capture
    fell_back = f"; FELL BACK TO EAGER: {compiled.fallback}" if compiled.fallback else ""
    return [Row("sample GPT-2 124M, batch 1, bf16, compiled decode (sample's default on CUDA)",
                f"{ours_rate:,.0f} tok/s", f"target >= 1,000 tok/s{fell_back}"),
            Row("sample, eager decode (--compile off)", f"{eager_rate:,.0f} tok/s",
                f"compiled / eager = {ours_rate / eager_rate:.2f}x"),
            Row("sample, transformers generate", f"{hf_rate:,.0f} tok/s",
                f"gptcli / transformers = {ours_rate / hf_rate:.2f}x (target >= 3x)")]


def speed_shakespeare(ctx: Context) -> list[Row]:
    from gptcli.config import load_config
    from gptcli.tasks.pretrain import pretrain

    out = ctx.work / "shakespeare-char-gpu"
    cfg = load_config(ROOT / "configs" / "shakespeare-char-gpu.yaml",
                      [f"out_dir={out}", f"data.inputs=[{SHAKESPEARE}]", f"train.device={ctx.device}"])
    started = time.perf_counter()
    pretrain(cfg)
    seconds = time.perf_counter() - started
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in evals if "val_loss" in m][-1]
    return [Row("shakespeare-char-gpu.yaml, 5000 steps", f"val {val:.4f}",
                f"{seconds / 60:.1f} min wall (tokenize, compile, evals included); target val <= 1.47 "
                f"(nanoGPT 1.4697)")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the correctness checks only")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --device cpu --tiny for the correctness checks")
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} is missing (the shared data folder beside the repository)")
    work = Path(tempfile.mkdtemp(prefix="gptcli-gpu-check-"))
    os.environ["GPTCLI_CACHE"] = str(work / "cache")
    ctx = Context(args.device, args.tiny, work, SHAKESPEARE)
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        checks = [check_precisions, check_compile, check_fused_adamw, check_compiled_decode, check_int8,
                  check_torchrun, check_resume]
        if args.device.startswith("cuda") and not args.tiny:
            checks += [speed_training, speed_sampling, speed_shakespeare]
        for check in checks:
            begun = time.perf_counter()
            found = check(ctx)
            for row in found if isinstance(found, list) else [found]:
                rows.append(row)
                print(f"{row.status:>12}  {row.check}: {row.detail}  ({time.perf_counter() - begun:.0f} s)",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    lines = [f"### GPU check ({time.strftime('%Y-%m-%d')})", "", describe_machine() + cuda, "",
             f"`python benchmarks/gpu_check.py --device {args.device}{' --tiny' if args.tiny else ''}`: "
             f"{time.perf_counter() - started:.0f} s in all.", "",
             "| check | result | detail |", "|---|---|---|",
             *(f"| {r.check} | {r.status} | {r.detail} |" for r in rows), ""]
    publish("\n".join(lines), args.write)
    if any(r.status == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
