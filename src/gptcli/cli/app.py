"""The `gptcli` command line: parse, call the library, render with rich.

User mistakes (`GptcliError`) print one `error: ...` line and exit with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptcli.errors import GptcliError, Interrupted

# The click that Typer parses with (a copy inside recent Typer, the click package before): its
# errors, to print a usage mistake as one line. Before click 8.2 a bare `gptcli` printed the
# help itself, without NoArgsIsHelpError (and `except ()` catches nothing).
_click_errors = importlib.import_module(typer.BadParameter.__module__)
_NO_ARGS_IS_HELP = getattr(_click_errors, "NoArgsIsHelpError", ())

QUANTIZE_HELP = ("none, or int8: linear layers' weights stored as int8 with per-channel scales "
                 "(a quarter of their fp32 bytes; about 1.6x fp32's decoding speed on CPU).")

# Options several commands share, declared once.
Checkpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", help="Run or checkpoint directory (default: the latest run under runs/).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Precision = Annotated[str, typer.Option(
    help="Weights and compute: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), fp32, bf16, fp16.")]
Quantize = Annotated[str, typer.Option(help=QUANTIZE_HELP)]
LMQuantize = Annotated[str, typer.Option(help="Language model: " + QUANTIZE_HELP)]

app = typer.Typer(
    help="Train, finetune and sample GPT models.\n\n"
         "  gptcli tokenize corpus/ --out data/mycorpus\n\n"
         "  gptcli pretrain configs/demo.yaml\n\n"
         "  gptcli sample --prompt 'def '",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def tokenize(
    inputs: Annotated[list[str], typer.Argument(help="Files, folders, globs, or `stdlib`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    tokenizer: Annotated[str, typer.Option(
        help="gpt2, r50k_base, p50k_base, cl100k_base, o200k_base, PATH.tiktoken, bytes or char.")
    ] = "gpt2",
    train_bpe: Annotated[Optional[int], typer.Option(
        "--train-bpe", metavar="VOCAB_SIZE",
        help="Learn a byte-level BPE of this vocabulary size on the corpus (overrides --tokenizer).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split.")] = 1337,
    text_field: Annotated[Optional[str], typer.Option(
        help="Field (column) with the text in .jsonl, .parquet and saved Hugging Face dataset "
             "inputs [default: text].")] = None,
    jsonl_field: Annotated[Optional[str], typer.Option(hidden=True, help="Old name of --text-field.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a tokenized directory that gptcli wrote at --out.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run from its last recorded batch (same inputs and options).")] = False,
    part: Annotated[Optional[str], typer.Option(
        metavar="K/N", help="Tokenize every N-th input file from the K-th (one of N machines); join the "
                            "parts with --merge.")] = None,
    merge: Annotated[bool, typer.Option(
        help="Join the directories of a corpus tokenized with --part (given as INPUTS) into --out.")] = False,
    shard_size: Annotated[float, typer.Option(help="MB of token ids per shard file.")] = 1024,
    workers: Annotated[Optional[int], typer.Option(
        help="Encoding workers: 1 is a thread, more are processes [default: one per core].")] = None,
) -> None:
    """Tokenize raw text into shards (train-00000.bin, ..., val-00000.bin) and meta.json.

    Example: gptcli tokenize stdlib --out data/stdlib --tokenizer bytes
    """
    from rich.table import Table
    from rich.text import Text

    from gptcli.cli.display import ProgressDisplay, console
    from gptcli.data.tokenized.shards import parse_part, tokenize_corpus

    if text_field and jsonl_field and text_field != jsonl_field:
        raise GptcliError("--jsonl-field is the old name of --text-field; give only --text-field")
    field = text_field or jsonl_field or "text"
    if not shard_size > 0:
        raise GptcliError(f"--shard-size must be more than 0 MB, got {shard_size}")
    if merge and (part or resume):
        raise GptcliError("--merge joins finished parts; it takes no --part or --resume")
    with ProgressDisplay() as display:
        try:
            if merge:
                from gptcli.data.tokenized.merge import (
                    merge_parts,  # imports torch (through the dataset reader)
                )

                result = merge_parts(inputs, out, overwrite=overwrite, on_event=display)
            else:
                result = tokenize_corpus(inputs, out, tokenizer=tokenizer, val_fraction=val_fraction,
                                         seed=seed, text_field=field, train_bpe=train_bpe, overwrite=overwrite,
                                         resume=resume, part=parse_part(part) if part else None,
                                         shard_bytes=int(shard_size * 1e6), workers=workers, on_event=display)
        except KeyboardInterrupt:
            if merge:
                raise
            console.print(f"interrupted; the batches written so far are kept; continue with: "
                          f"{_continue_command()}", markup=False, highlight=False)
            raise typer.Exit(130) from None
    table = Table(title=Text(f"{result.out_dir}  ·  {result.tokenizer} ({result.vocab_size} ids, "
                             f"{result.dtype})  ·  {result.sources} files  ·  {result.seconds:.1f}s"),
                  title_justify="left")
    for column in ("split", "documents", "MB", "tokens", "bytes/token"):
        table.add_column(column, justify="right" if column != "split" else "left")
    total_bytes = 0
    for split, stats in result.splits.items():
        total_bytes += stats.bytes
        # One text file is one document, cut by position: each split holds part of it.
        documents = "1 (split by position)" if result.split_by_position else f"{stats.documents:,}"
        table.add_row(split, documents, f"{stats.bytes / 1e6:.2f}", f"{stats.tokens:,}",
                      f"{stats.bytes / max(stats.tokens, 1):.2f}")
    console.print(table)
    console.print(f"{result.shards} shard file(s) per split at most; "
                  f"{total_bytes / 1e6 / max(result.seconds, 1e-9):.1f} MB/s end to end")


@app.command()
def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in out_dir from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the gptcli run in out_dir (kept until the new run saves its first checkpoint).")] = False,
) -> None:
    """Train a GPT from scratch.

    Example: gptcli pretrain configs/demo.yaml --set train.max_steps=100
    """
    from gptcli.cli.display import console
    from gptcli.config import load_config
    from gptcli.tasks.pretrain import pretrain as run_pretrain

    trained = _train(run_pretrain, load_config(config, set_ or []), resume, overwrite)
    if trained is None:
        return
    result, display = trained
    console.print(f"done: {result.steps} steps in {result.seconds:.0f}s, best val loss "
                  f"{_best(result, display)}; sample with: gptcli sample --checkpoint "
                  f"{shlex.quote(str(result.run_dir))} --prompt '...'", markup=False)
    _show_loss_plot(result.run_dir)


@app.command()
def finetune(
    config: Annotated[Optional[Path], typer.Argument(
        help="YAML config (see configs/finetune-*.yaml); none: the built-in classify example.")] = None,
    task: Annotated[Optional[str], typer.Option(help="classify, lm or instruct (overrides finetune.task).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config value, e.g. --set finetune.lora.rank=8 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in out_dir from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the gptcli run in out_dir (kept until the new run saves its first checkpoint).")] = False,
) -> None:
    """Adapt a checkpoint to a labelled task, new-domain text, or prompt/response pairs.

    Example: gptcli finetune --task classify   (built-in example on the latest pretrained run)
    """
    from gptcli.cli.display import console, render_classify_metrics
    from gptcli.config import FinetuneRunConfig, load_config
    from gptcli.tasks.finetune import builtin_example
    from gptcli.tasks.finetune import finetune as run_finetune

    overrides = list(set_ or [])
    if task is not None:
        overrides.append(f"finetune.task={task}")
    if config is None:
        overrides = [*builtin_example(task), *overrides]
    trained = _train(run_finetune, load_config(config, overrides, FinetuneRunConfig), resume, overwrite)
    if trained is None:
        return
    result, display = trained
    if display.last_eval and "per_class" in display.last_eval:  # a classifier's evaluation
        console.print(display.final_eval_heading(), markup=False, highlight=False)
        render_classify_metrics(display.last_eval)
    if result.before and "val_loss" in result.before:
        console.print(f"before: val loss {result.before['val_loss']:.4f}"
                      + (f", bpb {result.before['val_bpb']:.4f}" if "val_bpb" in result.before else ""))
    elif result.before:  # grpo: no loss to validate, its metric
        console.print(f"before: {result.metric} {result.before[result.metric]:.4f}", markup=False)
    console.print(f"done: {result.task}, {result.steps} steps in {result.seconds:.0f}s, best "
                  f"{result.metric} {_best(result, display)}; use it with: gptcli sample --checkpoint "
                  f"{shlex.quote(str(result.run_dir))} -p '...'", markup=False)
    _show_loss_plot(result.run_dir)


@app.command("eval")
def eval_command(
    checkpoint: Checkpoint = None,
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", help="Language model: text files, folders, globs, `stdlib` or a tokenized directory "
                       "(repeatable; none: the run's own validation). Classifier: one CSV, TSV, JSONL or Parquet "
                       "file with text and label columns (none: the validation split it trained with).")] = None,
    split: Annotated[str, typer.Option(help="Of a tokenized directory: all, train or val.")] = "all",
    batch_size: Annotated[int, typer.Option(help="Windows (or rows) per forward pass.")] = 8,
    precision: Annotated[str, typer.Option(
        help="auto (the precision the run trained in), fp32, bf16 or fp16.")] = "auto",
    text_column: Annotated[str, typer.Option(
        help="Column (field) with the text: of a classifier's labelled file, or of .jsonl, "
             ".parquet and saved Hugging Face dataset --data for a language model.")] = "text",
    label_column: Annotated[str, typer.Option(help="Classifier: column with the true label.")] = "label",
    predictions: Annotated[Optional[Path], typer.Option(
        help="Classifier: write per-row predictions to this CSV. --task generate: one JSON line per item "
             "(prompt, prediction, references, its scores).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
    device: Device = "auto",
    quantize: LMQuantize = "none",
    task: Annotated[Optional[str], typer.Option(
        help="Language model: score a task instead of the loss: hellaswag (its official JSONL), choice (JSONL of "
             "context, choices, label), or generate (JSONL of prompt or messages, and reference or references: "
             "answers generated and scored).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --task: the first N items only.")] = None,
    metrics: Annotated[Optional[list[str]], typer.Option(
        help="--task generate: exact_match, f1, rouge1, rouge2, rougeL, bleu, chrf, pass@K (repeatable or "
             "comma-separated; default exact_match,f1; ROUGE, BLEU and chrF need gptcli[eval]).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="--task generate: the most tokens of an answer (default 256, or half the context if less).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        help="--task generate: end an answer at this string (repeatable; escapes as in gptcli sample).")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="--task generate: softmax temperature (default 0: greedy).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="--task generate: sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="--task generate: nucleus sampling threshold.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="--task generate: seed of every item's samples (each item draws as gptcli sample --seed does).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(
        help="--task generate: samples per item, for pass@K (the other metrics score the first).")] = None,
    reward: Annotated[Optional[str], typer.Option(
        help="--task generate: what makes a sample correct for pass@K: exact_match (default), f1, contains, or "
             "FILE.py:FUNCTION, a function (prediction, references) -> number in [0, 1].")] = None,
    raw: Annotated[bool, typer.Option(
        help="--task generate: continue each prompt as plain text even on a chat model.")] = False,
    draft: Annotated[Optional[str], typer.Option(
        help="--task generate: speculative decoding, one item at a time: a smaller model's checkpoint with the "
             "same tokenizer, or `ngram` (prompt lookup); the same answers greedily.")] = None,
    draft_tokens: Annotated[Optional[int], typer.Option(
        help="--task generate: tokens proposed per verification with --draft (1-16; default 4).")] = None,
) -> None:
    """Loss, perplexity and bits per byte of a language model; acc and acc_norm on a multiple-choice task; generated answers scored against references; accuracy, F1 and confusion of a classifier.

    Examples:

      gptcli eval -c runs/demo                      (repeat the run's validation)

      gptcli eval -c runs/demo --data notes/ --data 'more/*.md'

      gptcli eval -c runs/classify-stdlib --data test.csv --predictions preds.csv

      gptcli eval -c runs/gpt2 --task hellaswag --data hellaswag_val.jsonl --limit 1000

      gptcli eval -c runs/qa --task generate --data qa.jsonl --metrics exact_match,f1 --stop '\\n'
    """
    from gptcli.cli.display import ProgressDisplay, render_evaluation, show_checkpoint
    from gptcli.evals.evaluate import EvalRequest, evaluate
    from gptcli.infer.sample import decode_escapes
    from gptcli.infer.session import GenerationSettings

    settings = None
    if (stop, temperature, top_k, top_p, seed) != (None,) * 5:
        settings = GenerationSettings(temperature=0.0 if temperature is None else temperature, top_k=top_k,
                                      top_p=top_p, stops=tuple(decode_escapes(s) for s in stop or ()), seed=seed)
    names = None if metrics is None else tuple(n.strip() for m in metrics for n in m.split(",") if n.strip())
    request = EvalRequest(data, split, batch_size, precision, device, quantize, text_column, label_column,
                          predictions, task, limit, names, settings, max_new_tokens, raw, num_samples, reward,
                          draft, draft_tokens)
    with ProgressDisplay() as display:
        result = evaluate(checkpoint, request, on_event=display)
    if not json_output:
        render_evaluation(result.kind, result.metrics)
    show_checkpoint(result.path)
    if json_output:
        print(json.dumps(result.metrics))


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several: one figure, one colour each).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("loss.png"),
    x: Annotated[str, typer.Option("--x", help="x axis: step or tokens.")] = "step",
    log: Annotated[bool, typer.Option("--log", help="Logarithmic loss axis.")] = False,
) -> None:
    """Draw train and val loss (and val bpb or accuracy) of runs into a PNG. Needs matplotlib.

    Examples:

      gptcli plot runs/demo --out demo.png

      gptcli plot runs/a runs/b --x tokens --log --out compare.png
    """
    from gptcli.cli.display import console
    from gptcli.cli.plot import plot_runs

    path = plot_runs(runs, out, x, log)
    console.print(f"wrote {path}", markup=False)


@app.command("runs")
def list_runs(
    root: Annotated[Path, typer.Argument(help="Folder to search for runs.")] = Path("runs"),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per run on stdout.")] = False,
) -> None:
    """List the runs under a folder: task, size, progress, best metric, tokens, wall time, status.

    Examples:

      gptcli runs

      gptcli runs experiments/ --json
    """
    from gptcli.cli.display import render_runs
    from gptcli.store.runlog import find_runs

    summaries = find_runs(root)
    if json_output:
        for summary in summaries:
            print(json.dumps({**summary.__dict__, "path": str(summary.path)}))
    else:
        render_runs(summaries, root)


@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint, run (its latest checkpoint) or HF directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the description as JSON on stdout.")] = False,
) -> None:
    """Describe a checkpoint: shape, parameters, tokenizer, step, tokens, metrics, files, checksums.

    Examples:

      gptcli info runs/demo

      gptcli info runs/demo/checkpoints/step-002000 --json
    """
    from gptcli.cli.display import render_info
    from gptcli.store.info import checkpoint_info

    description = checkpoint_info(checkpoint)
    if json_output:
        print(json.dumps(description))
    else:
        render_info(description)


@app.command()
def sample(
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="Text to continue (empty: start a document; -: read it from standard input).")
    ] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", help="Read the prompt from this UTF-8 file (its text exactly, final newline included).")
    ] = None,
    checkpoint: Checkpoint = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold in (0, 1].")] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token.")] = False,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated as one batch.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible samples.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        help="End a sample at this string (repeatable). Escapes: \\n newline, \\t tab, \\r return, "
             "\\\\ backslash, \\uXXXX and \\UXXXXXXXX code points; other text is taken as typed.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per sample.")] = False,
    device: Device = "auto",
    precision: Precision = "auto",
    raw: Annotated[bool, typer.Option(
        help="Continue the prompt as plain text even when the checkpoint has a chat template "
             "(an instruct checkpoint, or an imported model that ships one).")] = False,
    quantize: Quantize = "none",
    compile_: Annotated[str, typer.Option(
        "--compile", help="Compile the decode step: auto (on with CUDA, as CUDA graphs; off on CPU), on, off "
                          "(train.compile's words).")
    ] = "auto",
    draft: Annotated[Optional[str], typer.Option(
        help="Speculative decoding: a smaller model's checkpoint with the same tokenizer proposes tokens, or "
             "`ngram` copies them from the prompt and the text so far; the model keeps only what it would "
             "have generated itself.")] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens proposed per verification with --draft (1-16).")] = 4,
) -> None:
    """Generate text from a checkpoint, streamed to stdout.

    Example: gptcli sample --prompt 'def fib(n):' -n 200 --top-k 50 --stop '\\n\\n'
    """
    from gptcli.cli.display import notice, render_class_probabilities, show_checkpoint
    from gptcli.events import Notice
    from gptcli.infer.sample import (
        Classified,
        SampleRequest,
        decode_escapes,
        read_prompt,
        sample_or_classify,
    )

    prompt = read_prompt(prompt, prompt_file)
    request = SampleRequest(prompt=prompt, max_new_tokens=max_new_tokens,
                            temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                            num_samples=num_samples, seed=seed, stops=[decode_escapes(s) for s in stop or []],
                            device=device, precision=precision, raw=raw, quantize=quantize, compile=compile_,
                            draft=draft, draft_tokens=draft_tokens)

    def stream(row: int, text: str) -> None:
        """Sample 0 streams live (after its prompt); the others print when all are done."""
        if row == 0 and not json_output:
            sys.stdout.write(text if stream.started else prompt + text)
            stream.started = True
            sys.stdout.flush()

    stream.started = False
    result = sample_or_classify(checkpoint, request, on_text=stream,
                                on_event=lambda e: isinstance(e, Notice) and notice(e.message))
    if isinstance(result, Classified):
        probs = result.probabilities
        if json_output:
            print(json.dumps({"text": prompt, "label": next(iter(probs)), "probs": probs}))
        else:
            print(next(iter(probs)))
            render_class_probabilities(probs)
        show_checkpoint(result.path)
        return
    path, samples = result.path, result.samples
    speculation = {"speculation": result.speculation.as_dict()} if result.speculation is not None else {}
    if json_output:
        for s in samples:
            print(json.dumps({"prompt": prompt, "text": s.text, "tokens": s.tokens, **speculation},
                             ensure_ascii=False))
    else:
        if not stream.started:
            sys.stdout.write(prompt)
        sys.stdout.write("\n")
        for s in samples[1:]:
            sys.stdout.write(f"---\n{prompt}{s.text}\n")
    sys.stdout.flush()
    if result.speculation is not None:
        notice(result.speculation.summary())
    show_checkpoint(path)


@app.command()
def chat(
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", "-c", help="Instruct run, checkpoint or imported chat model (default: the latest run under runs/).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold in (0, 1].")] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible replies.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt to start with (/system changes it).")] = None,
    device: Device = "auto",
    precision: Precision = "auto",
    quantize: Quantize = "none",
    draft: Annotated[Optional[str], typer.Option(
        help="Speculative decoding: a smaller chat model with the same tokenizer, or `ngram` (prompt lookup); "
             "the replies are the model's own.")] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens proposed per verification with --draft (1-16).")] = 4,
) -> None:
    """Talk with an instruct checkpoint or an imported chat model, replies streamed to stdout.

    Reads one message per line (quietly when standard input is not a terminal);
    /reset, /system TEXT, /help, /quit. Example: gptcli chat -c runs/instruct-docstrings
    """
    from gptcli.cli.chat import run_chat
    from gptcli.infer.session import GenerationSettings

    settings = GenerationSettings(max_new_tokens, 0.0 if greedy else temperature, top_k, top_p, seed=seed)
    run_chat(checkpoint, settings, system or "", device, precision, quantize, draft, draft_tokens)


@app.command()
def serve(
    checkpoint: Checkpoint = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require 'Authorization: Bearer KEY' on /v1 requests (default: $GPTCLI_API_KEY, else none).")
    ] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="The model id clients use (default: the run's name).")] = None,
    max_batch: Annotated[int, typer.Option(
        help="Sequences decoded together; later requests wait for a free row.")] = 16,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 1 << 20,
    shutdown_timeout: Annotated[float, typer.Option(
        help="Seconds in-flight requests get to finish after SIGINT/SIGTERM.")] = 10.0,
    device: Device = "auto",
    precision: Precision = "auto",
    quantize: LMQuantize = "none",
    draft: Annotated[Optional[str], typer.Option(
        help="Speculative decoding while one request decodes alone: a smaller model with the same tokenizer, "
             "or `ngram` (prompt lookup); the answers are the model's own.")] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens proposed per verification with --draft (1-16).")] = 4,
) -> None:
    """Serve a checkpoint over OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/classify) with a web page at /.

    Example: gptcli serve -c runs/demo --port 8000, then open http://127.0.0.1:8000
    """
    from gptcli.cli.display import console
    from gptcli.serve.run import ServeOptions
    from gptcli.serve.run import serve as run_server

    options = ServeOptions(checkpoint=checkpoint, host=host, port=port, api_key=api_key, model_name=model_name,
                           max_batch=max_batch, max_body_bytes=max_body, device=device, precision=precision,
                           quantize=quantize, shutdown_timeout=shutdown_timeout, draft=draft,
                           draft_tokens=draft_tokens)

    def ready(url: str) -> None:
        console.print(f"serving at {url} (API: {url}/v1); Ctrl-C to stop", markup=False, highlight=False)

    run_server(options, on_ready=ready)


@app.command("import-hf")
def import_hf(
    hf_dir: Annotated[Path, typer.Argument(help="A Hugging Face GPT-2, Llama, Qwen2, Qwen3 or Mistral directory (config.json + model.safetensors, or its shards).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="A .tiktoken ranks file to use instead of the directory's tokenizer (default: its "
             "tokenizer.json or GPT-2 vocab.json; for GPT-2 without either, tiktoken's gpt2).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint that import-hf wrote at --out.")] = False,
) -> None:
    """Import a Hugging Face model (GPT-2, Llama, Qwen2/3, Mistral) as a gptcli checkpoint.

    Example: gptcli import-hf ~/models/gpt2 --out checkpoints/gpt2
    """
    from gptcli.cli.display import console
    from gptcli.store.hf import import_hf as run_import

    path = run_import(hf_dir, out, tokenizer, overwrite)
    console.print(f"imported {hf_dir} -> {path}; sample with: gptcli sample -c {shlex.quote(str(path))} -p '...'",
                  markup=False)


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Argument(help="Run or checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Hugging Face directory to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a directory that export-hf wrote at --out.")] = False,
) -> None:
    """Export a checkpoint for transformers: GPT-2, Llama, Qwen2 or Qwen3 (a classifier as ...ForSequenceClassification).

    Example: gptcli export-hf runs/gpt2-classify --out hf/gpt2-classify
    """
    from gptcli.cli.display import console
    from gptcli.store.hf import export_hf_model
    from gptcli.store.rundir import resolve_checkpoint

    result = export_hf_model(resolve_checkpoint(checkpoint), out, overwrite)
    console.print(f"exported -> {result.path}; load with transformers' from_pretrained('{result.path}'); "
                  f"{result.tokenizer_note}", markup=False)


@app.command("export-gguf")
def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="Run or checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="GGUF file to write.")],
    type_: Annotated[str, typer.Option("--type", help="Matrix type: f32, f16 or q8_0.")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace a GGUF file at --out.")] = False,
) -> None:
    """Export a language model as one GGUF file for llama.cpp, ollama or LM Studio (needs gptcli[gguf]).

    Example: gptcli export-gguf runs/shakespeare-char-demo --out demo.gguf --type q8_0
    """
    from gptcli.cli.display import console
    from gptcli.store.gguf_export import export_gguf as run_export
    from gptcli.store.rundir import resolve_checkpoint

    path = run_export(resolve_checkpoint(checkpoint), out, type_, overwrite)
    size = path.stat().st_size / 1e6
    console.print(f"exported -> {path} ({size:,.1f} MB); run it with llama.cpp: llama-cli -m {shlex.quote(str(path))}",
                  markup=False)


def _train(run, cfg, resume: bool, overwrite: bool):
    """Run a training command (`run` is pretrain or finetune) under the live display; on rank
    0 return (result, display). Other ranks show nothing and get None."""
    from gptcli.cli.display import TrainDisplay

    display = TrainDisplay(quiet=not _is_rank_zero())
    try:
        result = run(cfg, resume=resume, overwrite=overwrite, on_event=display)
    finally:
        display.close()
    if not _is_rank_zero():
        return None
    return result, display


def _best(result, display) -> str:
    """The best metric of a finished run, and its step when this run reached it (a resumed
    run's best may be from before)."""
    if result.best_metric is None:
        return "-"
    at = f" at step {display.best_step}" if display.best_step is not None else ""
    return f"{result.best_metric:.4f}{at}"


def _show_loss_plot(run_dir: Path) -> None:
    """Draw loss.png into a finished run's directory and name it, as the last line of the
    run. matplotlib is an optional extra that a plain install lacks: then the line says how
    to get it and draw the plot afterwards. A plot that cannot be drawn is a note, never a
    failed run."""
    import importlib.util

    from gptcli.cli.display import console, notice
    from gptcli.cli.plot import LOSS_PNG, plot_runs

    target = Path(run_dir) / LOSS_PNG
    if importlib.util.find_spec("matplotlib") is None:
        later = shlex.join(["gptcli", "plot", str(run_dir), "--out", str(target)])
        console.print(f"loss plot: not drawn, matplotlib is missing; pip install 'gptcli[plot]' then {later}",
                      markup=False, highlight=False)
        return
    try:
        plot_runs([run_dir], target)
    except Exception as exc:
        notice(f"could not draw {target}: {exc}")
        return
    console.print(f"loss plot: {target}", markup=False, highlight=False)


def _is_rank_zero() -> bool:
    """Under torchrun only rank 0 talks, so N processes give one display and one error."""
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    # Not standalone: click's own mistakes (an unknown option, a value of the wrong type)
    # come back here as exceptions, to be printed like every other user error.
    _show_library_warnings_as_notes()
    try:
        code = app(standalone_mode=False, prog_name="gptcli")
    except _NO_ARGS_IS_HELP as exc:  # bare `gptcli`: the help is the answer
        exc.show()
        sys.exit(exc.exit_code)
    except _click_errors.ClickException as exc:
        _print_error(_usage_message(exc))
        sys.exit(2)
    except GptcliError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except Interrupted as exc:
        from gptcli.cli.display import console

        if _is_rank_zero():
            console.print(f"{exc}; continue with: {_continue_command()}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: checkpoints are atomic, so stopping is safe
        sys.exit(130)
    finally:
        _leave_process_group()
    if isinstance(code, int) and code != 0:  # typer.Exit(n), and Typer's Ctrl-C as Exit(130)
        sys.exit(code)


def _show_library_warnings_as_notes() -> None:
    """The library warns (a bad `latest` pointer read without an event sink) through
    Python's warnings; the CLI shows its own as one `note: ...` line, like its notices."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        from gptcli.store.rundir import (
            PointerWarning,  # here: importing it costs torch's import
        )

        if issubclass(category, PointerWarning):
            from gptcli.cli.display import notice

            notice(str(message))
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _print_error(message: str) -> None:
    from gptcli.cli.display import console

    if _is_rank_zero():
        console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def _usage_message(exc: Exception) -> str:
    """click's message in this CLI's style (`no such option: --bogus`), with where to read
    the usage instead of click's usage block (whose `{config}` placeholders read as noise)."""
    message = " ".join(exc.format_message().split()).removesuffix(".")
    if message[:1].isupper() and message[1:2].islower():  # not an acronym or an option name
        message = message[0].lower() + message[1:]
    command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "gptcli"
    return f"{message} (see {command} --help)"


def _continue_command() -> str:
    """This command line again with --resume (without --overwrite, which would start over),
    quoted for a POSIX shell: pasted back, it gives exactly these arguments, spaces,
    brackets and `$` included."""
    dropped = {"--resume", "--no-resume", "--overwrite", "--no-overwrite"}
    return shlex.join(["gptcli", *(a for a in sys.argv[1:] if a not in dropped), "--resume"])


def _leave_process_group() -> None:
    if "torch" in sys.modules:  # never import torch just to find out
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
