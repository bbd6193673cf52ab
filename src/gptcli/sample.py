"""`gptcli sample`: text from a checkpoint, streamed as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptcli.checkpoint import checkpoint_task, load_model, resolve_checkpoint
from gptcli.classify import GPTClassifier, encode_texts
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Notice, ignore
from gptcli.generate import SampleText, SamplingSettings, generate_tokens
from gptcli.instruct import END, has_chat_template, prompt_ids
from gptcli.inference import for_generation
from gptcli.lora import merge_lora
from gptcli.runtime import DTYPES, resolve_device, resolve_precision


@dataclass(frozen=True)
class SampleRequest:
    prompt: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 (else fp16) on CUDA, fp32 elsewhere

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            problems.append(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.precision not in ("auto", *DTYPES):
            problems.append(f"--precision must be auto, {', '.join(DTYPES)}, got {self.precision}")
        if problems:
            raise GptcliError("; ".join(problems))


@dataclass
class Sample:
    text: str
    tokens: list[int]


def sample(checkpoint: str | Path | None, request: SampleRequest,
           on_text: Callable[[int, str], None] = lambda row, text: None,
           on_event: EventSink = ignore) -> tuple[Path, list[Sample]]:
    """Generate `request.num_samples` continuations of the prompt as one batch.

    `on_text(row, delta)` receives each sample's text as it becomes final (for streaming).
    Returns the checkpoint used and the samples.
    """
    request.check()
    path = resolve_checkpoint(checkpoint)
    device = resolve_device(request.device)
    model, tokenizer = load_model(path, device)
    if isinstance(model, GPTClassifier):
        raise GptcliError(f"{path} is a classifier; use classify() for it")
    if model.lora_spec is not None:
        merge_lora(model)  # one matrix per layer again: the adapters cost nothing per token
    for_generation(model, resolve_precision(request.precision, device, option="--precision").dtype)
    context = model.config.block_size
    for special in tokenizer.special_tokens:
        if special in request.prompt:
            raise GptcliError(f"the prompt contains the special token {special} as text; prompts are "
                              f"plain text, so remove it (an empty prompt starts a new document)")
    stop_ids: frozenset[int] = frozenset()
    if has_chat_template(tokenizer):  # an instruct checkpoint: one user turn, stop at its end
        prompt = prompt_ids(tokenizer, request.prompt)
        stop_ids = frozenset({tokenizer.special_tokens[END]})
    else:
        prompt = tokenizer.encode(request.prompt) if request.prompt else [tokenizer.eot_id]
    if len(prompt) > context:
        on_event(Notice(f"prompt is {len(prompt)} tokens, longer than the {context}-token "
                        f"context: keeping its last {context}"))
        prompt = prompt[-context:]
    generator = None
    if request.seed is not None:
        generator = torch.Generator(device=device).manual_seed(request.seed)
    settings = SamplingSettings(request.temperature, request.top_k, request.top_p)
    texts = [SampleText(tokenizer, request.stops, stop_ids) for _ in range(request.num_samples)]
    for tokens in generate_tokens(model, prompt, request.max_new_tokens, settings,
                                  request.num_samples, generator):
        for row, token in enumerate(tokens.tolist()):
            delta = texts[row].add(token)
            if delta:
                on_text(row, delta)
        if all(t.stopped for t in texts):
            break
    for row, text in enumerate(texts):
        delta = text.finish()
        if delta:
            on_text(row, delta)
    return path, [Sample(t.text, t.tokens) for t in texts]


def is_classifier(path: Path) -> bool:
    """Whether a resolved checkpoint directory holds a classifier."""
    return checkpoint_task(path) == "classify"


@torch.inference_mode()
def classify(checkpoint: str | Path | None, text: str, device: str = "auto"
             ) -> tuple[Path, dict[str, float]]:
    """Class probabilities of `text` under a classifier checkpoint, most likely first."""
    path = resolve_checkpoint(checkpoint)
    model, tokenizer = load_model(path, resolve_device(device))
    if not isinstance(model, GPTClassifier):
        raise GptcliError(f"{path} is not a classifier checkpoint")
    (ids,) = encode_texts(tokenizer, [text], model.config.block_size, keep="end")
    idx = torch.tensor(ids, device=model.wte.weight.device)[None]
    probs = torch.softmax(model(idx).float(), dim=-1)[0].tolist()
    ranked = sorted(zip(model.labels, probs), key=lambda pair: -pair[1])
    return path, dict(ranked)
