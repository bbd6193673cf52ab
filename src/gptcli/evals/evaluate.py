"""`gptcli eval`: one entry for every kind of evaluation, chosen by what the checkpoint is
(infer/load.py) and what was asked: a classifier's accuracy (classify.py), a multiple-choice
task (choice.py) or a language model's loss (lm.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptcli.errors import GptcliError
from gptcli.events import EventSink, ignore
from gptcli.infer.load import is_classifier
from gptcli.infer.quantize import check_quantize
from gptcli.store.rundir import resolve_checkpoint


@dataclass(frozen=True)
class EvalRequest:
    data: list[str] | None = None  # LM: text or tokenized dirs; classifier or --task: one file
    split: str = "all"  # of a tokenized directory
    batch_size: int = 8
    precision: str = "auto"
    device: str = "auto"
    quantize: str = "none"  # language models only
    text_column: str = "text"
    label_column: str = "label"  # classifier
    predictions: Path | None = None  # classifier: per-row CSV
    task: str | None = None  # a multiple-choice task (hellaswag, choice) instead of the loss
    limit: int | None = None  # with `task`: the first N items


@dataclass
class Evaluation:
    kind: Literal["lm", "choice", "classifier"]
    path: Path  # the checkpoint evaluated
    metrics: dict


def evaluate(checkpoint: str | Path | None, request: EvalRequest, on_event: EventSink = ignore) -> Evaluation:
    check_quantize(request.quantize)
    if request.limit is not None and request.task is None:
        raise GptcliError("--limit counts multiple-choice items; it goes with --task")
    path = resolve_checkpoint(checkpoint)
    if request.task is not None:
        from gptcli.evals.choice import eval_choice_checkpoint

        if not request.data or len(request.data) != 1:
            raise GptcliError(f"--task {request.task}: give the items as exactly one --data file (JSONL)")
        path, metrics = eval_choice_checkpoint(path, request.task, request.data[0], request.limit,
                                               request.batch_size, request.precision, request.device,
                                               on_event=on_event, quantize=request.quantize)
        return Evaluation("choice", path, metrics)
    if is_classifier(path):
        from gptcli.evals.classify import eval_classifier_checkpoint

        if request.quantize != "none":
            raise GptcliError(f"--quantize is for language models; {path} is a classifier")
        if request.data and len(request.data) != 1:
            raise GptcliError("--data: a classifier is evaluated on one labelled file (CSV, TSV, JSONL or "
                              "Parquet), or without --data on the validation split it trained with")
        path, metrics = eval_classifier_checkpoint(path, request.data[0] if request.data else None,
                                                   request.text_column, request.label_column, request.predictions,
                                                   batch_size=request.batch_size, device=request.device)
        return Evaluation("classifier", path, metrics)
    from gptcli.evals.lm import eval_lm_checkpoint

    path, metrics = eval_lm_checkpoint(path, request.data, request.split, request.batch_size, request.precision,
                                       request.device, text_field=request.text_column, on_event=on_event,
                                       quantize=request.quantize)
    return Evaluation("lm", path, metrics)
