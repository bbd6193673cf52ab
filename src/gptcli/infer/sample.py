"""`gptcli sample`: text from a checkpoint, streamed as it is generated."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from gptcli.config import COMPILE_CHOICES
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Notice, ignore
from gptcli.infer.compiled import CompiledDecode, wants_compiled_decode
from gptcli.infer.generate import cache_slots, generation_bytes, sample_text_bytes
from gptcli.infer.load import Classifier, LanguageModel, load
from gptcli.infer.quantize import QUANTIZE_CHOICES
from gptcli.infer.speculative import SpeculationStats, draft_problems, speculation_for
from gptcli.infer.session import (
    GenerationSession,
    GenerationSettings,
    Sample,
    not_utf8_at,
)
from gptcli.model import Model
from gptcli.model.budget import check_batch_fits
from gptcli.runtime import DTYPES

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


@dataclass(frozen=True)
class SampleRequest:
    """`gptcli sample`'s request: the prompt, how to generate (GenerationSettings' fields),
    how many samples, and where and how the model runs."""

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
    draft: str | None = None  # a draft checkpoint, or "ngram" (prompt lookup): speculative decoding
    draft_tokens: int = 4  # guesses per verification

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                                  tuple(self.stops), self.seed)

    def check(self) -> None:
        problems = self.settings.problems()
        bad = not_utf8_at(self.prompt)
        if bad is not None:
            problems.append(f"--prompt is not valid UTF-8 text (character {bad} is {ascii(self.prompt[bad])}); "
                            f"pass UTF-8 text, or a UTF-8 file with --prompt-file")
        if self.num_samples < 1:
            problems.append(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.precision not in ("auto", *DTYPES):
            problems.append(f"--precision must be auto, {', '.join(DTYPES)}, got {self.precision}")
        if self.compile not in COMPILE_CHOICES:
            problems.append(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile}")
        problems += draft_problems(self.draft, self.draft_tokens, self.num_samples)
        if self.draft is not None and self.compile == "on":
            problems.append("--draft and --compile on do not go together (the verification pass has its own "
                            "shape); use --compile off or auto")
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize}")
        if problems:
            raise GptcliError("; ".join(problems))


@dataclass
class Classified:
    """`gptcli sample` of a classifier: the label probabilities of the prompt."""

    path: Path
    probabilities: dict[str, float]  # most likely first


@dataclass
class Sampled:
    path: Path
    samples: list[Sample]
    speculation: SpeculationStats | None = None  # how the guesses fared, with --draft


def sample_or_classify(checkpoint: str | Path | None, request: SampleRequest,
                       on_text: Callable[[int, str], None] = lambda row, text: None,
                       on_event: EventSink = ignore) -> Sampled | Classified:
    """`gptcli sample`: continue the prompt with a language model (see `sample`), or give
    a classifier's probabilities for it."""
    request.check()  # option errors first, before any checkpoint is looked at
    loaded = load(checkpoint, request.device, request.precision, request.quantize)
    if isinstance(loaded, Classifier):
        return Classified(loaded.path, loaded.probabilities(request.prompt))
    return Sampled(loaded.path, *_generate(loaded, request, on_text, on_event))


def sample(checkpoint: str | Path | None, request: SampleRequest,
           on_text: Callable[[int, str], None] = lambda row, text: None,
           on_event: EventSink = ignore) -> tuple[Path, list[Sample]]:
    """Generate `request.num_samples` continuations of the prompt as one batch.

    `on_text(row, delta)` receives each sample's text as it becomes final (for streaming).
    Returns the checkpoint used and the samples.
    """
    request.check()
    loaded = load(checkpoint, request.device, request.precision, request.quantize, expect=("lm", "chat"))
    return loaded.path, _generate(loaded, request, on_text, on_event)[0]


def _generate(loaded: LanguageModel, request: SampleRequest, on_text: Callable[[int, str], None],
              on_event: EventSink) -> tuple[list[Sample], SpeculationStats | None]:
    device = next(loaded.model.parameters()).device
    speculation = speculation_for(request.draft, request.draft_tokens, loaded, request.precision, request.quantize)
    session = GenerationSession(loaded, speculation)
    prompt = session.prompt(request.prompt, raw=request.raw)
    if prompt.cropped:
        on_event(Notice(f"prompt is {len(prompt.ids) + prompt.cropped} tokens, longer than the "
                        f"{session.context}-token context: keeping its last {session.context}"))
    wants_compiled = wants_compiled_decode(request.compile, device) and speculation is None
    check_samples_fit(loaded.model, request, len(prompt.ids), wants_compiled, device)  # before any per-sample allocation
    compiled = CompiledDecode(device.type == "cuda") if wants_compiled else None
    samples = session.generate(prompt, request.settings, request.num_samples, on_text, compiled)
    if compiled is not None and compiled.fallback:
        on_event(Notice(f"the compiled decode step failed ({compiled.fallback}); decoded eagerly"))
    return samples, (speculation.stats if speculation is not None else None)


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


def classify(checkpoint: str | Path | None, text: str, device: str = "auto"
             ) -> tuple[Path, dict[str, float]]:
    """Class probabilities of `text` under a classifier checkpoint, most likely first."""
    classifier = load(checkpoint, device, expect=("classifier",))
    return classifier.path, classifier.probabilities(text)
