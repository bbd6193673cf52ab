"""GPT-2's recipe against the modern one, on nanoGPT's CPU shape, in one script.

    python benchmarks/bench_recipes.py [--parts speed demo-time main shortest ablations demo] [--write]

Every run is `gptcli pretrain` of a shipped config with `--set` overrides, one after the
other on the same machine, so the wall times compare:
- speed: both recipes at nanoGPT's CPU shape for --speed-steps steps: training tokens/s
  (the median of the logged intervals) beside the loss, and the modern recipe's share.
- demo-time: configs/demo.yaml exactly as shipped, from a cold tokenization cache: the
  main command's wall time (its promise: at most 3 minutes on a quiet 2-core CPU).
- main: configs/shakespeare-char.yaml (GPT-2's recipe) and configs/shakespeare-char-modern.yaml,
  2000 steps each, validation loss every 100 steps (20 batches, as nanoGPT estimates it)
  and, at the end, over the whole validation split.
- shortest: the modern config cut to fewer steps (its schedule set for that many), shortest
  first, until one reaches nanoGPT's 1.8857 over the whole validation split; its wall time
  against the GPT-2 recipe's 2000 steps (target: at most 35%).
- ablations: each change alone on top of GPT-2's recipe, and each removed from the modern
  one, at --ablation-steps steps.
- demo: configs/demo.yaml (stdlib, bytes) in both recipes at equal wall time: the modern
  run gets the steps that fit in the GPT-2 run's measured time.
Wall time is the run's own (run.json: setup, training, evaluations and saving).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from full_val import whole_split
from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-recipes"
NANOGPT_VAL = 1.8857  # nanoGPT's shakespeare_char val loss at 2000 steps (its README)
GPT2, MODERN = "shakespeare-char", "shakespeare-char-modern"

# The changes of the modern recipe: name -> (run-name slug, --set overrides that add it to
# GPT-2's recipe, overrides that take it out of the modern one).
CHANGES = {
    "rotary positions": ("rotary", ["model.position=rope"], ["model.position=learned"]),
    "RMSNorm": ("rmsnorm", ["model.norm=rmsnorm"], ["model.norm=layernorm"]),
    "QK-norm": ("qk-norm", ["model.qk_norm=true"], ["model.qk_norm=false"]),
    "SwiGLU MLP (out: GELU)": ("swiglu", ["model.mlp=swiglu"], ["model.mlp=gelu"]),
    "ReLU² MLP (out: SwiGLU → ReLU²)": ("relu2", ["model.mlp=relu2"], ["model.mlp=relu2"]),
    "untied embeddings": ("untied", ["model.tie_embeddings=false"], ["model.tie_embeddings=true"]),
    "no biases": ("no-bias", ["model.bias=false"], ["model.bias=true"]),
    "zero-init projections": ("zero-init", ["model.zero_init=true"], ["model.zero_init=false"]),
    "logit soft-cap 15 (not kept: the modern column adds it)":
        ("softcap", ["model.logit_softcap=15"], ["model.logit_softcap=15"]),
    "Muon": ("muon", ["train.optimizer=muon"], ["train.optimizer=adamw"]),
}


def pretrain(name: str, config: str, overrides: list[str], shipped: bool = False,
             env: dict | None = None) -> dict:
    """Train one run; its validation curve, final losses, training tokens/s and wall time.
    `shipped` keeps the config's own evaluation and saving (else every 100 steps, no saves)."""
    out_dir = RUNS / name
    saved = out_dir / "bench-result.json"
    if REUSE and saved.is_file() and json.loads(saved.read_text())["overrides"] == overrides:
        return json.loads(saved.read_text())
    command = [sys.executable, "-m", "gptcli", "pretrain", str(ROOT / "configs" / f"{config}.yaml"),
               "--overwrite", "--set", f"out_dir={out_dir}"]
    if not shipped:
        command += ["--set", "train.eval_every=100", "--set", "train.save_every=100000"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    command_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    speeds = sorted(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r)
    info = json.loads((out_dir / "run.json").read_text())
    last = max(curve)
    result = {"name": name, "overrides": overrides, "steps": last, "curve": curve, "val": curve[last],
              "full_val": full_validation(out_dir), "wall": info["wall_seconds"],
              "command_seconds": command_seconds, "tokens_per_sec": speeds[len(speeds) // 2],
              "precision": _precision_of(out_dir)}
    saved.write_text(json.dumps(result))
    return json.loads(saved.read_text())  # as a reuse would read it (string step keys)


def _precision_of(out_dir: Path) -> str:
    """The precision `auto` chose, as the run's latest checkpoint records it."""
    from gptcli.store.checkpoint import load_trainer_state
    from gptcli.store.rundir import resolve_checkpoint

    return load_trainer_state(resolve_checkpoint(out_dir)).precision


def full_validation(out_dir: Path) -> dict:
    """Loss and bits per byte over every whole window of the run's validation split."""
    r = whole_split(out_dir)
    return {"loss": r["val_loss"], "bpb": r["val_bpb"]}


def schedule_for(steps: int) -> list[str]:
    """Overrides that fit the modern config's schedule to `steps` (warmup kept at 5%)."""
    return [f"train.max_steps={steps}", f"train.warmup_steps={max(steps // 20, 1)}"]


def main_part(results: dict) -> list[str]:
    gpt2 = results.setdefault("gpt2", pretrain("gpt2", GPT2, []))
    modern = results.setdefault("modern", pretrain("modern", MODERN, []))
    lines = ["| step | GPT-2 recipe val loss | modern recipe val loss |", "|---|---|---|"]
    for step in sorted(gpt2["curve"], key=int):
        lines.append(f"| {step} | {gpt2['curve'][step]:.4f} | {modern['curve'].get(step, math.nan):.4f} |")
    lines += ["", "| recipe | steps | wall time | tokens/s | val loss (20 batches) | val loss (whole split) | "
                  "val bpb (whole split) |", "|---|---|---|---|---|---|---|"]
    for name, r in (("GPT-2", gpt2), ("modern", modern)):
        lines.append(f"| {name} | {r['steps']} | {r['wall']:.0f} s | {r['tokens_per_sec']:,.0f} | {r['val']:.4f} | "
                     f"{r['full_val']['loss']:.4f} | {r['full_val']['bpb']:.4f} |")
    return lines


def speed_part(steps: int) -> list[str]:
    """Training speed of both recipes at nanoGPT's CPU shape, beside their loss."""
    runs = {name: pretrain(f"speed-{slug}", config, schedule_for(steps))
            for name, slug, config in (("GPT-2", "gpt2", GPT2), ("modern", "modern", MODERN))}
    lines = [f"| recipe | precision | tokens/s | val loss at {steps} (whole split) | wall time |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['precision']} | {r['tokens_per_sec']:,.0f} | {r['full_val']['loss']:.4f} | "
                     f"{r['wall']:.0f} s |")
    share = runs["modern"]["tokens_per_sec"] / runs["GPT-2"]["tokens_per_sec"]
    return [*lines, "", f"The modern recipe trains at {share:.0%} of GPT-2's tokens/s."]


def demo_time_part() -> list[str]:
    """The main command as a newcomer runs it: the shipped demo, tokenizing stdlib first."""
    env = {**os.environ, "GPTCLI_CACHE": str(RUNS / "demo-time-cache")}
    subprocess.run(["rm", "-rf", env["GPTCLI_CACHE"]], check=True)
    r = pretrain("demo-time", "demo", [], shipped=True, env=env)
    verdict = "met" if r["command_seconds"] <= 180 else "missed"
    return ["| run | precision | steps | tokens/s | val loss (20 batches) | val bpb (whole split) | "
            "command wall time | target (180 s) |", "|---|---|---|---|---|---|---|---|",
            f"| configs/demo.yaml | {r['precision']} | {r['steps']} | {r['tokens_per_sec']:,.0f} | {r['val']:.4f} | "
            f"{r['full_val']['bpb']:.4f} | {r['command_seconds']:.0f} s | {verdict} |"]


def shortest_part(results: dict, candidates: list[int]) -> list[str]:
    gpt2 = results.setdefault("gpt2", pretrain("gpt2", GPT2, []))
    lines = ["| modern run | wall time | val loss (20 batches) | val loss (whole split) | reaches 1.8857 | share of GPT-2's 2000-step wall time |",
             "|---|---|---|---|---|---|"]
    for steps in candidates:
        r = pretrain(f"modern-{steps}", MODERN, schedule_for(steps))
        reached = r["full_val"]["loss"] <= NANOGPT_VAL
        lines.append(f"| {steps} steps | {r['wall']:.0f} s | {r['val']:.4f} | {r['full_val']['loss']:.4f} | "
                     f"{'yes' if reached else 'no'} | {r['wall'] / gpt2['wall']:.0%} |")
        if reached:
            break
    return lines


def ablation_part(steps: int) -> list[str]:
    base = schedule_for(steps)
    gpt2 = pretrain("ablate-gpt2", GPT2, base)
    modern = pretrain("ablate-modern", MODERN, base)
    lines = [f"| change | GPT-2 + change: val loss at {steps} | Δ | wall | modern − change: val loss at {steps} | Δ | wall |",
             "|---|---|---|---|---|---|---|",
             f"| (none) | {gpt2['full_val']['loss']:.4f} | | {gpt2['wall']:.0f} s | "
             f"{modern['full_val']['loss']:.4f} | | {modern['wall']:.0f} s |"]
    for change, (slug, add, remove) in CHANGES.items():
        plus = pretrain(f"ablate-plus-{slug}", GPT2, base + add)
        minus = pretrain(f"ablate-minus-{slug}", MODERN, base + remove)
        lines.append(f"| {change} | {plus['full_val']['loss']:.4f} | {plus['full_val']['loss'] - gpt2['full_val']['loss']:+.4f} | "
                     f"{plus['wall']:.0f} s | {minus['full_val']['loss']:.4f} | "
                     f"{minus['full_val']['loss'] - modern['full_val']['loss']:+.4f} | {minus['wall']:.0f} s |")
    return lines


def modern_recipe() -> list[str]:
    """The modern config's recipe as overrides for another config: its model keys other
    than the shape, and its optimizer and learning rates."""
    from gptcli.config import read_yaml

    modern = read_yaml(ROOT / "configs" / f"{MODERN}.yaml")
    shape = {"n_layer", "n_head", "n_embd", "block_size", "dropout", "vocab_size"}
    recipe = [f"model.{k}={v}" for k, v in modern["model"].items() if k not in shape]
    recipe += [f"train.{k}={modern['train'][k]}" for k in ("optimizer", "muon_lr", "lr", "min_lr")]
    return ["model.bias=null", *recipe]  # the demo config's bias: true is GPT-2's


def demo_part() -> list[str]:
    gpt2 = pretrain("demo-gpt2", "demo", [])
    probe = pretrain("demo-modern-probe", "demo", [*modern_recipe(), "train.max_steps=200"])
    seconds_per_step = probe["wall"] / probe["steps"]
    steps = int(gpt2["wall"] / seconds_per_step)
    modern = pretrain("demo-modern", "demo", [*modern_recipe(), *schedule_for(steps)])
    lines = ["| demo recipe | steps | wall time | val bpb (whole split) |", "|---|---|---|---|"]
    for name, r in (("GPT-2", gpt2), ("modern", modern)):
        lines.append(f"| {name} | {r['steps']} | {r['wall']:.0f} s | {r['full_val']['bpb']:.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["speed", "demo-time", "main", "shortest", "ablations", "demo"])
    parser.add_argument("--speed-steps", type=int, default=300)
    parser.add_argument("--shortest", nargs="+", type=int, default=[300, 400, 500, 600, 700, 800, 1000])
    parser.add_argument("--ablation-steps", type=int, default=600)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of an earlier invocation")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    os.chdir(ROOT)  # the configs' paths (../shared/data/...) are relative to the repository
    started = time.perf_counter()
    results: dict = {}
    sections = []
    if "speed" in args.parts:
        sections += [f"Training speed of both recipes ({args.speed_steps} steps each):", "",
                     *speed_part(args.speed_steps), ""]
    if "demo-time" in args.parts:
        sections += ["The main command (configs/demo.yaml as shipped, tokenizing included):", "",
                     *demo_time_part(), ""]
    if "main" in args.parts:
        sections += ["GPT-2 recipe vs modern recipe, 2000 steps each:", "", *main_part(results), ""]
    if "shortest" in args.parts:
        sections += [f"Shortest modern run reaching nanoGPT's {NANOGPT_VAL}:", "",
                     *shortest_part(results, args.shortest), ""]
    if "ablations" in args.parts:
        sections += [f"Ablations at {args.ablation_steps} steps (val loss over the whole split):", "",
                     *ablation_part(args.ablation_steps), ""]
    if "demo" in args.parts:
        sections += ["configs/demo.yaml in both recipes at equal wall time:", "", *demo_part(), ""]
    text = "\n".join([f"### Recipes ({time.strftime('%Y-%m-%d')}, `python benchmarks/bench_recipes.py`, "
                      f"{time.perf_counter() - started:.0f} s)", "", describe_machine(), "", *sections])
    publish(text, args.write)


if __name__ == "__main__":
    main()
