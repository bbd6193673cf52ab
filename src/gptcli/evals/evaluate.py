"""`gptcli eval`: one entry for every kind of evaluation, chosen by what the checkpoint is
(infer/load.py) and what was asked: a classifier's accuracy (classify.py), a multiple-choice
task (choice.py), a generation task (generation.py) or a language model's loss (lm.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptcli.errors import GptcliError
from gptcli.evals.generation import GREEDY, GenerateRequest
from gptcli.events import EventSink, ignore
from gptcli.infer.load import is_classifier
from gptcli.infer.quantize import check_quantize
from gptcli.infer.session import GenerationSettings
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
    predictions: Path | None = None  # classifier: per-row CSV; generate: per-item JSONL
    task: str | None = None  # a multiple-choice task (hellaswag, choice) or generate, instead of the loss
    limit: int | None = None  # with `task`: the first N items
    # --task generate only (None: not given):
    metrics: tuple[str, ...] | None = None
    settings: GenerationSettings | None = None  # all but max_new_tokens
    max_new_tokens: int | None = None
    raw: bool = False
    num_samples: int | None = None
    reward: str | None = None
    draft: str | None = None  # speculative decoding: a draft checkpoint or "ngram"
    draft_tokens: int | None = None

    def generate_options(self) -> list[str]:
        """The options given that only --task generate takes."""
        given = {"--metrics": self.metrics is not None, "--max-new-tokens": self.max_new_tokens is not None,
                 "--stop/--temperature/--top-k/--top-p/--seed": self.settings is not None, "--raw": self.raw,
                 "--num-samples": self.num_samples is not None,
                 "--reward": self.reward is not None, "--draft/--draft-tokens": self.draft is not None
                 or self.draft_tokens is not None}
        return [option for option, there in given.items() if there]


@dataclass
class Evaluation:
    kind: Literal["lm", "choice", "generate", "classifier"]
    path: Path  # the checkpoint evaluated
    metrics: dict


def evaluate(checkpoint: str | Path | None, request: EvalRequest, on_event: EventSink = ignore) -> Evaluation:
    check_quantize(request.quantize)
    if request.limit is not None and request.task is None:
        raise GptcliError("--limit counts multiple-choice items; it goes with --task")
    if request.task != "generate" and request.generate_options():
        raise GptcliError(f"{', '.join(request.generate_options())}: for --task generate")
    path = resolve_checkpoint(checkpoint)
    if request.task == "generate":
        from gptcli.evals.generation import eval_generate_checkpoint

        if request.data and len(request.data) != 1:
            raise GptcliError("--task generate: give the items as one --data file (JSONL, CSV or Parquet), or "
                              "none for an instruct finetune's own validation split")
        wanted = GenerateRequest(
            request.data[0] if request.data else None, request.metrics or GenerateRequest.metrics,
            request.settings or GREEDY, request.max_new_tokens, request.raw, request.num_samples or 1, request.reward or "exact_match",
            request.limit, request.batch_size, request.predictions, request.draft,
            GenerateRequest.draft_tokens if request.draft_tokens is None else request.draft_tokens)
        path, metrics = eval_generate_checkpoint(path, wanted, request.device, request.precision,
                                                 request.quantize, on_event)
        return Evaluation("generate", path, metrics)
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
