"""Multiple-choice evaluation speed: `gptcli eval --task choice` against lm-evaluation-harness
(its `hf` model, the Python API) on the same exported model and the same items.

    python benchmarks/bench_choice_eval.py [--items 200] [--shape 124M] [--batch-size 8] [--write]

The model: a random GPT-2 of the shape (bench_sample.py's shapes) with GPT-2's tokenizer
(../shared/data/gpt2.tiktoken), saved as a gptcli checkpoint and exported with export-hf for
the harness. The items: HellaSwag-like, a line of tiny Shakespeare as the context and four
candidate next lines (the true one and three others). Each side is timed from the call to
its result, model loading excluded (the harness's task loading included: it is part of every
harness run); both in fp32 on the CPU with the same batch size. The accuracies must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from report import describe_machine, publish

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAPES = {"mid": (6, 6, 384, 256), "124M": (12, 12, 768, 1024)}
TASK = """task: bench_choice
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_items(path: Path, count: int) -> None:
    lines = [line for line in (SHARED / "tinyshakespeare.txt").read_text().splitlines() if len(line) > 20]
    rows = []
    for i in range(count):
        k = (37 * i) % (len(lines) - 1)
        choices = [lines[k + 1]] + [lines[(k * 7 + j * 101) % len(lines)] for j in (1, 2, 3)]
        label = i % 4
        choices[0], choices[label] = choices[label], choices[0]
        rows.append({"context": lines[k], "choices": choices, "label": label})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--shape", default="124M", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gptcli.config import ModelConfig
    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.evals.choice import read_items, score_items
    from gptcli.model.gpt import GPT
    from gptcli.store.checkpoint import load_model, save_checkpoint
    from gptcli.store.hf import export_hf

    n_layer, n_head, n_embd, context = SHAPES[args.shape]
    tok = tiktoken_from_file(SHARED / "gpt2.tiktoken")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = GPT(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=context,
                                vocab_size=tok.vocab_size))
        checkpoint = save_checkpoint(tmp / "ckpt", model.eval(), tok, "# bench\n")
        hf_dir = export_hf(checkpoint, tmp / "hf")
        data = tmp / "items.jsonl"
        write_items(data, args.items)
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "bench_choice.yaml").write_text(TASK.format(data=data))

        ours, tokenizer = load_model(checkpoint)
        items = read_items("choice", data)
        start = time.perf_counter()
        metrics = score_items(ours, tokenizer, items, args.batch_size).metrics()
        gptcli_seconds = time.perf_counter() - start

        harness_model = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
        start = time.perf_counter()
        out = simple_evaluate(model=harness_model, tasks=["bench_choice"],
                              task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False))
        harness_seconds = time.perf_counter() - start
    theirs = out["results"]["bench_choice"]
    agree = theirs["acc,none"] == metrics["acc"] and theirs["acc_norm,none"] == metrics["acc_norm"]
    lines = [f"### Multiple-choice evaluation speed ({time.strftime('%Y-%m-%d')})", "",
             f"{describe_machine()}; {torch.get_num_threads()} torch threads", "",
             f"`python benchmarks/bench_choice_eval.py --items {args.items} --shape {args.shape} --batch-size "
             f"{args.batch_size}`: a random GPT-2 {args.shape} (GPT-2's tokenizer), {args.items} four-choice items "
             f"(tiny Shakespeare lines), fp32, batch {args.batch_size}; model loading excluded.", "",
             "| implementation | seconds | items/s | acc | acc_norm |", "|---|---|---|---|---|",
             f"| gptcli (`eval --task choice`) | {gptcli_seconds:.1f} | {args.items / gptcli_seconds:.1f} | "
             f"{metrics['acc']:.4f} | {metrics['acc_norm']:.4f} |",
             f"| lm-evaluation-harness (`hf`) | {harness_seconds:.1f} | {args.items / harness_seconds:.1f} | "
             f"{theirs['acc,none']:.4f} | {theirs['acc_norm,none']:.4f} |", "",
             f"- **gptcli / harness: {harness_seconds / gptcli_seconds:.2f}× the items per second**; "
             f"acc and acc_norm {'equal' if agree else 'DIFFER'}"]
    publish("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
