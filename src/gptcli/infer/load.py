"""One loader: what a checkpoint is, and its model ready to use.

Every command that reads a trained model (sample, chat, serve, eval, finetune's start) asks
here, and nothing else decides what a checkpoint holds:

    kind = checkpoint_kind(path)          # "lm", "chat" or "classifier", without loading weights
    loaded = load(path, device="auto")    # a LanguageModel, ChatModel or Classifier

`path` may be a run directory (its best checkpoint, else its latest), a checkpoint
directory, a Hugging Face model folder (imported once into the cache) or None (the latest
run under ./runs). A chat model is a language model whose tokenizer carries a chat format
(gptcli's instruct tokens, or an imported model's chat template, data/tokenizers/chat_format.py); a
classifier keeps its labels in the weights' metadata and, since they are stored there too,
how it pools and reads long texts (store/checkpoint.py: classifier_reading).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gptcli.data.tokenizers.chat_format import chat_stop_ids, is_chat_model
from gptcli.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from gptcli.data.training.labelled import TextReading, encode_windows, pad_windows
from gptcli.errors import GptcliError
from gptcli.infer.cpu_layout import for_generation
from gptcli.infer.quantize import check_quantize, quantize_model
from gptcli.model import Model
from gptcli.model.lora import merge_lora
from gptcli.runtime import DTYPES, resolve_device, resolve_precision
from gptcli.store.checkpoint import (
    TOKENIZER_DIR,
    checkpoint_task,
    classifier_reading,
    load_model,
    verify_checkpoint,
)
from gptcli.store.rundir import resolve_checkpoint

Kind = Literal["lm", "chat", "classifier"]


@dataclass
class LanguageModel:
    """A model that continues text: its weights ready to generate, its tokenizer."""

    path: Path  # the checkpoint directory it came from
    model: Model
    tokenizer: Tokenizer
    kind: Kind = "lm"

    @property
    def context(self) -> int:
        return self.model.config.block_size

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation by themselves (none for plain text: it runs to a stop
        string or its token budget)."""
        return frozenset()


@dataclass
class ChatModel(LanguageModel):
    """A language model with a chat format: prompts are conversations, replies end at the
    format's stop ids."""

    kind: Kind = "chat"

    @property
    def stop_ids(self) -> frozenset[int]:
        return chat_stop_ids(self.tokenizer)


@dataclass
class Classifier:
    """A sequence classifier: its model (head included, pooling set), tokenizer, labels (the
    head's order), and how it reads a text longer than its context."""

    path: Path
    model: Model
    tokenizer: Tokenizer
    reading: TextReading
    kind: Kind = "classifier"

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @torch.inference_mode()
    def probabilities(self, text: str) -> dict[str, float]:
        """Label -> probability of `text`, most likely first; a text longer than the context
        read as the classifier was trained to read it (cut, or every window pooled)."""
        device = next(self.model.parameters()).device
        rows = encode_windows(self.tokenizer, [text], self.model.config.block_size, self.reading)
        idx, lengths, owners = pad_windows(rows, self.tokenizer.eot_id, device)
        probs = torch.softmax(self.model(idx, lengths=lengths, owners=owners).float(), dim=-1)[0].tolist()
        return dict(sorted(zip(self.labels, probs), key=lambda pair: -pair[1]))


Loaded = LanguageModel | ChatModel | Classifier


def checkpoint_kind(path: Path) -> Kind:
    """What the resolved checkpoint directory `path` holds, read from its metadata and
    tokenizer alone (no weights loaded)."""
    if is_classifier(path):
        return "classifier"
    return _language_kind(load_tokenizer(path / TOKENIZER_DIR))


def is_classifier(path: Path) -> bool:
    """Whether `path` holds a classifier: checkpoint_kind's first question, from the weights'
    metadata alone (for callers that need no more, without reading the tokenizer)."""
    return checkpoint_task(path) == "classify"


def _language_kind(tokenizer: Tokenizer) -> Kind:
    """A language model's kind, by its tokenizer: a chat format makes it a chat model."""
    return "chat" if is_chat_model(tokenizer) else "lm"


def load(checkpoint: str | Path | None, device: str | torch.device = "auto", precision: str = "auto",
         quantize: str = "none", expect: tuple[Kind, ...] = ("lm", "chat", "classifier"),
         generate: bool = True) -> Loaded:
    """The checkpoint `checkpoint` names (see the module's docstring), loaded on `device`.

    A language model is made ready to generate: LoRA adapters merged, weights in
    `precision` (`auto`: bf16 or fp16 on CUDA, fp32 elsewhere), in the CPU's decode layout,
    or with `quantize` int8 its linear layers in int8. With `generate=False` (to score text
    under autocast) it stays in fp32 and its own layout, int8 if asked. A classifier loads
    in fp32 as it trained. A kind outside `expect` is refused, saying what to do with it
    instead, before any weights are read."""
    check_quantize(quantize)
    if precision not in ("auto", *DTYPES):
        raise GptcliError(f"--precision must be auto, {', '.join(DTYPES)}, got {precision}")
    path = resolve_checkpoint(checkpoint)
    verify_checkpoint(path)  # a damaged file is named as such, before anything reads it
    # checkpoint_kind's answer, with the tokenizer kept for the model (read once)
    tokenizer = None if is_classifier(path) else load_tokenizer(path / TOKENIZER_DIR)
    kind = "classifier" if tokenizer is None else _language_kind(tokenizer)
    if kind not in expect:
        raise GptcliError(_wrong_kind(path, kind, expect))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if quantize != "none" and kind == "classifier":
        raise GptcliError(f"--quantize is for language models; {path} is a classifier")
    model, tokenizer = load_model(path, dev, verified=True, tokenizer=tokenizer)
    if kind == "classifier":
        _pooling, reading = classifier_reading(path)  # the pooling is the model's own (build_model)
        return Classifier(path, model, tokenizer, reading)
    if not generate:
        quantize_model(model, quantize)
    else:
        if model.lora_spec is not None:
            merge_lora(model)  # one matrix per layer again: the adapters cost nothing per token
        for_generation(model, resolve_precision(precision, dev, option="--precision").dtype, quantize)
    return (ChatModel if kind == "chat" else LanguageModel)(path, model, tokenizer)


def language_model(path: Path, model: Model, tokenizer: Tokenizer) -> LanguageModel:
    """A model in memory (one being trained, say) as the loader would give it: a ChatModel
    when its tokenizer has a chat format."""
    return (ChatModel if _language_kind(tokenizer) == "chat" else LanguageModel)(path, model, tokenizer)


_DESCRIBED = {"lm": "a base language model", "chat": "a chat model", "classifier": "a classifier"}


def _wrong_kind(path: Path, kind: Kind, expect: tuple[Kind, ...]) -> str:
    """Why `path` is not what was expected, and what to do with it instead."""
    quoted = shlex.quote(str(path))
    instead = {
        "classifier": f"classify text with gptcli sample -c {quoted} -p TEXT",
        "lm": "continue text with gptcli sample, or make a chat model with gptcli finetune --task instruct",
        "chat": f"talk with it with gptcli chat -c {quoted}",
    }[kind]
    wanted = " or ".join(_DESCRIBED[k] for k in expect)
    return f"{path} is {_DESCRIBED[kind]}, not {wanted}; {instead}"
