"""`gptcli sample`: text from a checkpoint, streamed as it is generated."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from gptcli.data.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Notice, ignore
from gptcli.infer.compiled import COMPILE_CHOICES, CompiledDecode, wants_compiled_decode
from gptcli.infer.cpu_layout import for_generation
from gptcli.infer.generate import (
    SampleText,
    SamplingSettings,
    cache_slots,
    generate_tokens,
    generation_bytes,
    sample_text_bytes,
)
from gptcli.infer.quantize import QUANTIZE_CHOICES, check_quantize
from gptcli.model import Model
from gptcli.model.budget import check_batch_fits
from gptcli.model.lora import merge_lora
from gptcli.runtime import DTYPES, resolve_device, resolve_precision
from gptcli.store.checkpoint import checkpoint_task, load_model
from gptcli.store.rundir import resolve_checkpoint
from gptcli.data.labelled import encode_windows, pad_windows
from gptcli.evals.classify import load_classifier
from gptcli.tasks.instruct import chat_stop_ids, is_chat_model, prompt_ids

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and folds negatives onto it)
_ESCAPE = re.compile(r"\\(?:([\\nrt])|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def decode_escapes(text: str) -> str:
    """`text` with the escapes of `--stop` turned into characters: \\n newline, \\t tab,
    \\r carriage return, \\\\ backslash, \\uXXXX and \\UXXXXXXXX (hex code points).

    Any other backslash, and all other text (non-ASCII included), stays as typed. The text
    is read once from left to right, so `\\\\n` is a backslash followed by `n`. (Not
    codecs' unicode_escape, which reads the text as Latin-1 and so mangles UTF-8.)
    """
    return _ESCAPE.sub(_unescape, text)


def _unescape(match: re.Match) -> str:
    simple, short, long = match.groups()
    if simple:
        return _SIMPLE_ESCAPES[simple]
    code = int(short or long, 16)
    return chr(code) if code <= sys.maxunicode else match.group(0)  # beyond Unicode: as typed


def read_prompt(prompt: str | None, prompt_file: str | Path | None, stdin: BinaryIO | None = None) -> str:
    """The prompt: `--prompt` as given (`-`: all of standard input) or `--prompt-file`'s
    text. Read text is UTF-8, taken exactly (a final newline stays); a byte-order mark at
    its start is dropped."""
    if prompt is not None and prompt_file is not None:
        raise GptcliError("--prompt and --prompt-file both given; use one of them")
    if prompt_file is not None:
        return _utf8(_read_prompt_file(Path(prompt_file)), f"--prompt-file: {prompt_file}")
    if prompt == "-":
        return _utf8((stdin or sys.stdin.buffer).read(), "--prompt -: standard input")
    return prompt or ""


def _read_prompt_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GptcliError(f"--prompt-file: {path} does not exist") from None
    except IsADirectoryError:
        raise GptcliError(f"--prompt-file: {path} is a directory; name a text file") from None
    except OSError as exc:
        raise GptcliError(f"--prompt-file: cannot read {path} ({exc.strerror or exc})") from None


def _utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GptcliError(f"{source}: invalid UTF-8 at byte {exc.start}; convert it (e.g. with iconv)") from None


def _not_utf8_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode, or None. Such characters are lone
    surrogates: what command-line bytes that are not UTF-8 turn into (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


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
    raw: bool = False  # continue the prompt as text even where the checkpoint has a chat template
    quantize: str = "none"  # none | int8: linear weights stored as int8 (infer/quantize.py)
    compile: str = "auto"  # auto | on | off: the decode step compiled (infer/compiled.py)

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        bad = _not_utf8_at(self.prompt)
        if bad is not None:
            problems.append(f"--prompt is not valid UTF-8 text (character {bad} is {ascii(self.prompt[bad])}); "
                            f"pass UTF-8 text, or a UTF-8 file with --prompt-file")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan passes `< 0`
            problems.append(f"--temperature must be 0 (greedy) or more, and finite; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            problems.append(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"--seed must be between 0 and 2**64 - 1 ({MAX_SEED}), got {self.seed}")
        for stop in self.stops:
            if not stop:
                problems.append("--stop must not be empty (an empty string would end every sample at once)")
            elif _not_utf8_at(stop) is not None:
                problems.append(f"--stop {ascii(stop)} is not valid UTF-8 text")
        if self.precision not in ("auto", *DTYPES):
            problems.append(f"--precision must be auto, {', '.join(DTYPES)}, got {self.precision}")
        if self.compile not in COMPILE_CHOICES:
            problems.append(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile}")
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize}")
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
    if is_classifier(path):
        raise GptcliError(f"{path} is a classifier; use classify() for it")
    device = resolve_device(request.device)
    model, tokenizer = load_for_generation(path, device, request.precision, request.quantize)
    context = model.config.block_size
    check_plain_text(tokenizer, request.prompt, "the prompt")
    stop_ids: frozenset[int] = frozenset()
    if is_chat_model(tokenizer) and not request.raw:  # an instruct or chat model: one user turn, stop at its end
        prompt = prompt_ids(tokenizer, request.prompt)
        stop_ids = chat_stop_ids(tokenizer)
    else:
        prompt = text_prompt_ids(tokenizer, request.prompt)
    if len(prompt) > context:
        on_event(Notice(f"prompt is {len(prompt)} tokens, longer than the {context}-token "
                        f"context: keeping its last {context}"))
        prompt = prompt[-context:]
    generator = None
    if request.seed is not None:
        generator = torch.Generator(device=device).manual_seed(request.seed)
    settings = SamplingSettings(request.temperature, request.top_k, request.top_p)
    wants_compiled = wants_compiled_decode(request.compile, device)
    check_samples_fit(model, request, len(prompt), wants_compiled, device)  # before any per-sample allocation
    texts = [SampleText(tokenizer, request.stops, stop_ids) for _ in range(request.num_samples)]
    compiled = CompiledDecode(device.type == "cuda") if wants_compiled else None
    for tokens in generate_tokens(model, prompt, request.max_new_tokens, settings,
                                  request.num_samples, generator, compiled):
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
    if compiled is not None and compiled.fallback:
        on_event(Notice(f"the compiled decode step failed ({compiled.fallback}); decoded eagerly"))
    return path, [Sample(t.text, t.tokens) for t in texts]


def check_samples_fit(model: Model, request: SampleRequest, prompt_tokens: int, compiled: bool,
                      device: torch.device) -> None:
    """Refuse, before any of it is allocated, a batch that cannot fit the memory left beside
    the loaded model: on the device the KV cache, activations and logits (generation_bytes),
    in the host's memory each sample's text and kept tokens (sample_text_bytes); on CPU (and
    MPS) both in the one memory. First --max-new-tokens for one sample (a sample's tokens
    are all kept), then --num-samples."""
    context = model.config.block_size

    def tensor_bytes(rows: int, tokens: int) -> int:
        return generation_bytes(model, rows, prompt_tokens, cache_slots(context, prompt_tokens, tokens, compiled))

    def host_bytes(rows: int, tokens: int) -> int:
        return rows * sample_text_bytes(tokens)

    if device.type == "cuda":  # a memory of its own, beside the host's
        budgets = [(device, tensor_bytes, "the KV cache, activations and logits"),
                   (torch.device("cpu"), host_bytes, "the texts and tokens")]
    else:
        budgets = [(device, lambda rows, tokens: tensor_bytes(rows, tokens) + host_bytes(rows, tokens),
                    "the KV cache, activations, logits and texts")]
    n, new = request.num_samples, request.max_new_tokens
    for memory, bytes_for, parts in budgets:
        check_batch_fits(f"--max-new-tokens {new}", new, lambda tokens: bytes_for(1, tokens),
                         f"{parts} of one sample of {new:,} new tokens", "generate fewer tokens", memory)
        check_batch_fits(f"--num-samples {n}", n, lambda rows: bytes_for(rows, new),
                         f"{parts} of {n:,} samples of {new:,} new tokens", "use fewer samples", memory)


def load_for_generation(path: Path, device: torch.device, precision: str = "auto",
                        quantize: str = "none") -> tuple[Model, Tokenizer]:
    """A resolved checkpoint's model, ready to generate: adapters merged, weights in the
    precision asked for (`auto`: bf16 or fp16 on CUDA, fp32 elsewhere) and, on CPU, in the
    decode-friendly layout, or with `quantize` int8 its linear layers' weights in int8
    (activations in that precision); and its tokenizer."""
    check_quantize(quantize)
    model, tokenizer = load_model(path, device)
    if model.lora_spec is not None:
        merge_lora(model)  # one matrix per layer again: the adapters cost nothing per token
    for_generation(model, resolve_precision(precision, device, option="--precision").dtype, quantize)
    return model, tokenizer


def check_plain_text(tokenizer: Tokenizer, text: str, what: str) -> None:
    """Refuse text holding a special token's spelling: prompts and messages are plain text
    (a user cannot inject an end-of-turn), so such text would not mean what it looks like."""
    for special in tokenizer.special_tokens:
        if special in text:
            raise GptcliError(f"{what} contains the special token {special} as text; it is read as "
                              f"plain text, so remove it")


def text_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Plain text to continue; an empty prompt starts a new document (end-of-text)."""
    return tokenizer.encode(text) if text else [tokenizer.eot_id]


def is_classifier(path: Path) -> bool:
    """Whether a resolved checkpoint directory holds a classifier."""
    return checkpoint_task(path) == "classify"


def classify(checkpoint: str | Path | None, text: str, device: str = "auto"
             ) -> tuple[Path, dict[str, float]]:
    """Class probabilities of `text` under a classifier checkpoint, most likely first."""
    path = resolve_checkpoint(checkpoint)
    if not is_classifier(path):
        raise GptcliError(f"{path} is not a classifier checkpoint")
    model, tokenizer, _ = load_classifier(path, resolve_device(device))
    return path, class_probabilities(model, tokenizer, text)


@torch.inference_mode()
def class_probabilities(model: Model, tokenizer: Tokenizer, text: str) -> dict[str, float]:
    """Label -> probability of `text` under a loaded classifier, most likely first. A text
    longer than the context is read as the classifier was trained to read it (`model.reading`,
    set from its checkpoint by load_classifier): cut to the context, or every window pooled."""
    device = next(model.parameters()).device
    idx, lengths, owners = pad_windows(encode_windows(tokenizer, [text], model.config.block_size, model.reading),
                                       tokenizer.eot_id, device)
    probs = torch.softmax(model(idx, lengths=lengths, owners=owners).float(), dim=-1)[0].tolist()
    return dict(sorted(zip(model.labels, probs), key=lambda pair: -pair[1]))
