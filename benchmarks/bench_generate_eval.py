"""Generation-task evaluation speed: `gptcli eval --task generate` against lm-evaluation-harness's
`generate_until` (its `hf` model, the Python API) on the same exported model and the same items.

    python benchmarks/bench_generate_eval.py [--items 64] [--arch gpt2|llama] [--shape mid] [--batch-size 16]
                                             [--max-new-tokens 32] [--stop none|blank-line] [--cli]
                                             [--rounds 1] [--write]

The model: a recipe (`--arch`) of the shape (bench_choice_eval.py's shapes; mid: 6 layers,
6 heads, 384 wide, a 256-token context) with GPT-2's tokenizer (../shared/data/gpt2.tiktoken),
trained a few steps on tiny Shakespeare (enough for its answers to be the play's commonest
tokens, newlines and commas, rather than random ones), saved as a gptcli checkpoint and
exported with export-hf for the harness. The items: two lines of the play and a newline as
the prompt, the line after them as the reference. Both sides decode greedily, at most
--max-new-tokens tokens, ending at end-of-text and (with --stop blank-line) at a blank line,
which ends most of this model's answers at once: without it every answer is a whole
--max-new-tokens long on both sides, the same work. fp32.

Timed: gptcli's `eval_generate_checkpoint` call, continuous batching of --batch-size rows,
loading the checkpoint included (with --cli, also the `gptcli eval` command, Python's start
included); the harness's `simple_evaluate` on an already loaded model (loading excluded, its
task loading included: part of every harness run), once one request at a time (batch 1: its
default) and once in left-padded batches of --batch-size. Each implementation runs once per
round, the rounds interleaved; reported: the median seconds and items per second, how many
items' answers equal gptcli's, and gptcli's items per second over each one's.
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
from pathlib import Path

import torch
from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAPES = {"mid": (6, 6, 384, 256), "124M": (12, 12, 768, 1024)}  # (n_layer, n_head, n_embd, context)
STOPS = {"none": (), "blank-line": ("\n\n",)}
TRAIN_STEPS = 20  # batches of 4 windows of 64 tokens: seconds on a CPU
TASK = """task: bench_generate
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: {until}
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
"""


def play_lines() -> list[str]:
    return [line for line in (SHARED / "tinyshakespeare.txt").read_text().splitlines() if len(line) > 20]


def write_items(path: Path, count: int) -> None:
    """`count` items spread over the play: two lines and a newline, then the next line."""
    lines = play_lines()
    rows = []
    for i in range(count):
        k = (53 * i) % (len(lines) - 2)
        rows.append({"prompt": f"{lines[k]}\n{lines[k + 1]}\n", "reference": lines[k + 2]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def trained_checkpoint(folder: Path, arch: str, shape: str) -> Path:
    """A model of `arch` and `shape` with GPT-2's tokenizer, trained TRAIN_STEPS steps."""
    from gptcli.config import ModelConfig
    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.model.gpt import GPT
    from gptcli.store.checkpoint import save_checkpoint

    n_layer, n_head, n_embd, context = SHAPES[shape]
    tok = tiktoken_from_file(SHARED / "gpt2.tiktoken")
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=context,
                            vocab_size=tok.vocab_size))
    ids = torch.tensor(tok.encode("\n".join(play_lines())))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(ids) - 65, (4,))
        batch = torch.stack([ids[s:s + 65] for s in starts])  # (4, 65): 64 inputs, each with its next token
        loss = model(batch[:, :-1], batch[:, 1:]) / batch[:, 1:].numel()  # the summed loss, per token
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(folder, model.eval(), tok, "# bench\n")


def run_gptcli(checkpoint: Path, data: Path, predictions: Path, args) -> tuple[float, list[str]]:
    """Seconds of the eval_generate_checkpoint call, and each item's answer."""
    from gptcli.evals.generation import GenerateRequest, eval_generate_checkpoint
    from gptcli.infer.session import GenerationSettings

    request = GenerateRequest(str(data), metrics=("exact_match",),
                              settings=GenerationSettings(temperature=0.0, stops=STOPS[args.stop]),
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              predictions=predictions)
    start = time.perf_counter()
    eval_generate_checkpoint(checkpoint, request, device=args.device, precision="fp32")
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()]


def run_cli(checkpoint: Path, data: Path, predictions: Path, args) -> tuple[float, list[str]]:
    """Seconds of the `gptcli eval --task generate` command, start to exit, and each item's answer."""
    command = [sys.executable, "-m", "gptcli", "eval", "-c", str(checkpoint), "--task", "generate",
               "--data", str(data), "--metrics", "exact_match", "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", str(args.batch_size), "--device", args.device, "--precision", "fp32",
               "--predictions", str(predictions), "--json"]
    for stop in STOPS[args.stop]:
        command += ["--stop", stop.encode("unicode_escape").decode()]  # `\n` as the CLI reads escapes
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()]


def run_harness(model, tasks: Path) -> tuple[float, list[str]]:
    """Seconds of simple_evaluate on a loaded `hf` model (an HFLM), and each item's answer."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(model=model, tasks=["bench_generate"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["bench_generate"], key=lambda s: s["doc_id"])
    return seconds, [s["filtered_resps"][0] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    parser.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stop", default="none", choices=sorted(STOPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cli", action="store_true", help="also time the `gptcli eval` command end to end")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from lm_eval.models.huggingface import HFLM

    from gptcli.store.hf import export_hf

    seconds: dict[str, list[float]] = {}  # each implementation's, one per round
    answers: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets-cache")
        checkpoint = trained_checkpoint(tmp / "ckpt", args.arch, args.shape)
        hf_dir = export_hf(checkpoint, tmp / "hf")
        data = tmp / "items.jsonl"
        write_items(data, args.items)
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "bench_generate.yaml").write_text(TASK.format(
            data=data, until=json.dumps(list(STOPS[args.stop])), max_new_tokens=args.max_new_tokens))

        runs = {f"gptcli (`eval --task generate`, batch {args.batch_size})":
                lambda: run_gptcli(checkpoint, data, tmp / "predictions.jsonl", args)}
        if args.cli:
            runs[f"gptcli CLI, end to end (batch {args.batch_size})"] = \
                lambda: run_cli(checkpoint, data, tmp / "cli-predictions.jsonl", args)
        for batch_size in (1, args.batch_size):
            model = HFLM(pretrained=str(hf_dir), dtype="float32", device=args.device, batch_size=batch_size)
            runs[f"lm-evaluation-harness (`hf`, batch {batch_size})"] = \
                lambda model=model: run_harness(model, tmp / "tasks")
        for _ in range(args.rounds):
            for name, run in runs.items():
                taken, answers[name] = run()
                seconds.setdefault(name, []).append(taken)

    median = {name: statistics.median(taken) for name, taken in seconds.items()}
    ours = next(iter(answers.values()))
    gptcli_seconds = next(iter(median.values()))
    stop = {"none": "no stop string", "blank-line": "stop at a blank line"}[args.stop]
    lines = [f"### Generation-task evaluation speed ({time.strftime('%Y-%m-%d')})", "",
             f"{describe_machine()}; {torch.get_num_threads()} torch threads", "",
             (f"`python benchmarks/bench_generate_eval.py --items {args.items} --arch {args.arch} --shape {args.shape} "
              f"--batch-size {args.batch_size} --max-new-tokens {args.max_new_tokens} --stop {args.stop}"
              f"{' --cli' if args.cli else ''} --rounds {args.rounds}`: a {args.arch} {args.shape} trained "
              f"{TRAIN_STEPS} steps (GPT-2's tokenizer), {args.items} tiny-Shakespeare prompts, greedy, at most "
              f"{args.max_new_tokens} new tokens, {stop}, fp32 on {args.device}; gptcli's checkpoint loading "
              f"included, the harness's excluded; the median of {args.rounds} interleaved round(s)."), "",
             "| implementation | seconds | items/s | answers equal to gptcli's | gptcli's items/s over its |",
             "|---|---|---|---|---|"]
    for name, taken in median.items():
        same = sum(a == b for a, b in zip(answers[name], ours))
        lines.append(f"| {name} | {taken:.1f} | {args.items / taken:.2f} | {same}/{args.items} | "
                     f"{taken / gptcli_seconds:.2f}× |")
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
