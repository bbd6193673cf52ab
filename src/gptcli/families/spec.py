"""What a model family is: the entries every family file fills in (families/gpt2.py,
families/llama.py), read by config.py, model/, store/hf.py and store/gguf_export.py.

A family is data and small pure functions, no torch and no files: config.py reads its
name and defaults while it loads a YAML file, before anything imports torch. Functions that
touch tensors get them as arguments and use only their methods (`.t()`, `.split`,
`.reshape`); store/hf.py and store/gguf_export.py do the reading, stacking and writing.

`cfg` below is a resolved ModelConfig (config.py), `path` the config.json a message names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptcli.config import ModelConfig

# For each gptcli tensor, in the model's order, the Hugging Face tensors that make it,
# stacked by rows (one for most; q, k, v for a fused attention projection), with their
# names and shapes as Hugging Face stores them.
Layout = dict[str, list[tuple[str, tuple[int, ...]]]]

# The ModelConfig keys a family fills when a config leaves them empty (ModelConfig.resolved).
COMPONENTS = ("position", "norm", "mlp", "bias", "tie_embeddings", "zero_init")


@dataclass(frozen=True)
class HuggingFace:
    """The family in transformers: `gptcli import-hf` and `export-hf` (store/hf.py) drive these."""

    name: str  # in messages: "no {name} class in transformers computes ..."
    model_types: tuple[str, ...]  # config.json model_types imported as this family
    layers_key: str  # config.json's block count, named when the weights hold another
    layer: re.Pattern[str]  # the block index in a tensor name as `canonical` gives it
    spare_rows: bool  # whether embeddings may have rows no token uses (then cut to the tokenizer's)
    tokenizer: str  # where its directories keep the tokenizer: "vocab.json" (GPT-2's) or "tokenizer.json"
    exportable: str  # what export-hf writes: the sentence after a refusal
    # config.json (a dict, read from `path`) -> the ModelConfig keys it sets (arch aside),
    # refusing, as a GptcliError naming `path`, what gptcli's GPT does not compute
    settings: Callable[[dict, Path], dict[str, Any]]
    canonical: Callable[[str, ModelConfig], str | None]  # a stored tensor's name in `layout`; None: skipped
    layout: Callable[[ModelConfig], Layout]
    to_gptcli: Callable[[str, Any], Any]  # (gptcli key, one HF tensor) -> it in gptcli's orientation
    export_problems: Callable[[ModelConfig], list[str]]  # what no class of the family computes, with reasons
    architecture: Callable[[ModelConfig, bool], str]  # config.json's `architectures` (classifier or not)
    config: Callable[[ModelConfig], dict]  # config.json's family settings (hf.py adds vocabulary and tokens)
    weights: Callable[[dict, ModelConfig], dict]  # gptcli's state (vocabulary unpadded) -> HF tensors


@dataclass(frozen=True)
class GGUF:
    """The family in llama.cpp: `gptcli export-gguf` (store/gguf_export.py) goes through the
    Hugging Face names, so a family with a GGUF entry has a HuggingFace one too."""

    archs: tuple[str, ...]  # the GGUF architectures it may write (gguf.MODEL_ARCH names, lower case)
    arch: Callable[[ModelConfig], str]  # the one for `cfg` (export-hf accepts it), or a GptcliError saying why none
    settings: Callable[[ModelConfig, str], dict[str, Any]]  # GGUFWriter method -> value, beyond the shape every arch has
    tensors: Callable[[dict, ModelConfig, str], dict]  # HF tensors (`HuggingFace.weights`) -> as GGUF lays them out


@dataclass(frozen=True)
class Family:
    """One model family: `model.arch` in configs, `arch` in checkpoints."""

    name: str
    summary: str  # what model.arch's help says of it: "`{name}` ({summary})"
    defaults: Mapping[str, Any]  # a value for each of COMPONENTS
    hf: HuggingFace | None = None  # None: import-hf and export-hf refuse the family
    gguf: GGUF | None = None  # None: export-gguf refuses it
