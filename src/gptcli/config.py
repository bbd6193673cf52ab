"""Typed run configuration: dataclasses, strict YAML loading and `--set` overrides.

Precedence is defaults < YAML < `--set key=value`. Loading is strict: unknown keys,
wrong types and out-of-range values are all collected and reported together, each
named by its dotted path (`train.lr: expected a number, got 'abc'`).

Every field carries a `help` string in its metadata, and a number field the range it
accepts (`_field(..., at_least=1)`), checked in every section by `field_problems`; the
README's config reference is written from the same help text. This module does not
import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptcli.errors import GptcliError, shorten
from gptcli.families import DEFAULT_FAMILY, FAMILIES


def _show(number: int | float) -> str:
    """A number as an error message quotes it: a whole number can be thousands of digits."""
    return shorten(str(number))


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts, declared on the field itself (`_field(..., at_least=1)`)
    and checked by `field_problems` alike in every section. `low`/`high` are None where
    there is no bound, and exclusive where `*_open`; `says` words the rule for an error
    where the bounds alone do not tell what they mean ("0 (off) or more")."""

    low: float | None = None  # an int bound stays an int: errors show `1`, not `1.0`
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    says: str = ""

    def allows(self, value: float) -> bool:
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high

    def __str__(self) -> str:
        """What a value must be: "at least 1", "0 or more", "greater than 0", "in [0, 1)"."""
        if self.says:
            return self.says
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_show(self.low)}, "
                    f"{_show(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            if self.low_open:
                return f"greater than {_show(self.low)}"
            return "0 or more" if self.low == 0 else f"at least {_show(self.low)}"
        return f"less than {_show(self.high)}" if self.high_open else f"at most {_show(self.high)}"


def _field(default: Any, help: str, path: bool = False, *, at_least: float | None = None,
           above: float | None = None, at_most: float | None = None, below: float | None = None,
           says: str = "") -> Any:
    """A dataclass field whose `help` documents it (and whose list default is copied);
    `path`: its value names files, so a leading `~` is expanded on loading.

    A number field states the values it accepts here, and nowhere else: at most one lower
    bound (`at_least` inclusive, `above` exclusive) and one upper (`at_most` inclusive,
    `below` exclusive); `at_least=0, below=1` is [0, 1). `says` words the rule in errors
    where the bounds need explaining. `field_problems` checks every such field."""
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise TypeError("a field has at most one lower bound and one upper bound")
    metadata: dict[str, Any] = {"help": help, "path": path}
    if {at_least, above, at_most, below} != {None}:
        metadata["rule"] = Bounds(low=above if at_least is None else at_least, low_open=above is not None,
                                  high=below if at_most is None else at_most, high_open=below is not None,
                                  says=says)
    elif says:
        raise TypeError("`says` words a bound; give the bound too")
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_problems(cfg: Any, path: str = "") -> list[str]:
    """Every field of the config section `cfg`, of its sections and of the sections in its
    lists (train.eval_tasks, data.inputs), whose value breaks the rule declared on it
    (`_field`'s bounds), each named by its dotted path. Empty (None) fields are skipped."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), f.metadata.get("rule")
        dotted = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            problems += field_problems(value, dotted)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += field_problems(item, f"{dotted}[{i}]")
        elif rule and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not rule.allows(value):
            problems.append(f"{dotted}: must be {rule}, got {_show(value)}")
    return problems


# torch.manual_seed takes [-2**63, 2**64 - 1] and numpy's default_rng no negative seed:
# every seed both accept.
SEED_RANGE = (0, 2**64 - 1)
_SEED_RULE = {"at_least": SEED_RANGE[0], "at_most": SEED_RANGE[1],
              "says": "in [0, 2**64 - 1] (what both torch and numpy accept)"}


@dataclass
class DataSource:
    """One source of a weighted mixture (an entry of `data.inputs` written as a mapping)."""

    path: str = _field("", "What a plain `data.inputs` entry can be: file, folder, glob, `stdlib`, "
                           "or a directory written by `gptcli tokenize`.", path=True)
    weight: float | None = _field(None, "Share of the training windows, relative to the other sources.",
                                  above=0)
    name: str = _field("", "Short name in metrics (`val_loss/NAME`); empty: from the path.")


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a source's name is a metric key's suffix


@dataclass
class DataConfig:
    inputs: list[str | DataSource] = _field(
        [], "Raw text files, folders, globs, `stdlib` (the Python standard library), "
        "or one directory written by `gptcli tokenize`. Or a weighted mixture: a list of "
        "`{path, weight, name}` (name optional), each source tokenized on its own and "
        "training windows drawn from them in proportion to the weights.", path=True
    )
    tokenizer: str = _field(
        "gpt2", "`gpt2`, `r50k_base`, `p50k_base`, `cl100k_base`, `o200k_base`, a path to a "
        "`.tiktoken` file, `bytes` or `char`. Ignored for a tokenized directory (it records its own).",
        path=True,
    )
    val_fraction: float = _field(0.1, "Share of documents held out for validation, in (0, 1).",
                                 above=0, below=1)
    text_field: str = _field(
        "text", "Field (column) holding the text in `.jsonl`, `.parquet` and Hugging Face "
        "`save_to_disk` inputs. `jsonl_field` is its old name, still accepted."
    )

    @property
    def jsonl_field(self) -> str:
        """The old name of `text_field`, for code written before it was renamed."""
        return self.text_field

    @property
    def is_mixture(self) -> bool:
        """Whether `inputs` is a weighted mixture of sources (mappings) rather than plain paths."""
        return any(isinstance(entry, DataSource) for entry in self.inputs)

    def paths(self) -> list[str]:
        """Every input path, of plain inputs and of a mixture's sources alike."""
        return [entry.path if isinstance(entry, DataSource) else entry for entry in self.inputs]

    def resolved(self) -> DataConfig:
        """This config with every mixture source named (idempotent): explicit names are kept,
        the others come from their paths, made unique with -2, -3, ..."""
        if not self.is_mixture:
            return self
        taken = {s.name for s in self.inputs if s.name}
        named = []
        for source in self.inputs:
            name = source.name
            if not name:
                stem = _name_from_path(source.path)
                name, n = stem, 1
                while name in taken:
                    n += 1
                    name = f"{stem}-{n}"
                taken.add(name)
            named.append(dataclasses.replace(source, name=name))
        return dataclasses.replace(self, inputs=named)


def _name_from_path(path: str) -> str:
    """A short name for a source: the last part of its path that is not a glob, without
    its suffix (`data/web/` -> web, `code/*.py` -> code, `wiki.jsonl` -> wiki)."""
    parts = [p for p in re.split(r"[/\\]+", path) if p and p != "." and not any(c in p for c in "*?[")]
    stem = parts[-1].split(".")[0] if parts else ""
    return "-".join(SOURCE_NAME.findall(stem)) or "source"


# Keys renamed since configs were first written: old name -> current name, per section.
# Old names are still read (YAML, --set, the configs saved in older runs).
OLD_NAMES: dict[type, dict[str, str]] = {DataConfig: {"jsonl_field": "text_field"}}
# Choices renamed since: the setting's dotted key -> old value -> current value. Old values
# are still read (the configs saved in older runs say `compile: 'false'`).
OLD_VALUES: dict[str, dict[str, str]] = {"train.compile": {"true": "on", "false": "off"}}
# One vocabulary for every compile switch: train.compile and sample's --compile.
COMPILE_CHOICES = ("auto", "on", "off")


def _arch_help() -> str:
    """model.arch's help, one clause per family of gptcli/families/."""
    clauses = [f"`{name}` ({family.summary})" for name, family in FAMILIES.items()]
    listed = " or ".join(filter(None, [", ".join(clauses[:-1]), clauses[-1]]))  # "A, B or C"
    return f"Recipe: {listed}. Fills every component key below that is left empty."


# `model.arch` names a family of gptcli/families/ (the choices are that table's names, read
# when a config is loaded). Every component field left empty takes the family's value
# (`defaults`); each can also be set on its own (the ablations of BENCHMARKS.md do).
@dataclass
class ModelConfig:
    arch: Literal[tuple(FAMILIES)] = _field(DEFAULT_FAMILY, _arch_help())
    n_layer: int = _field(12, "Transformer blocks.", at_least=1)
    n_head: int = _field(12, "Attention (query) heads per block; must divide n_embd unless head_dim is set.",
                          at_least=1)
    n_embd: int = _field(768, "Width of the residual stream.", at_least=1)
    block_size: int = _field(1024, "Context length in tokens.", at_least=1)
    dropout: float = _field(0.0, "Dropout probability in [0, 1) for training.", at_least=0, below=1)
    vocab_size: int | None = _field(
        None, "Tokenizer vocabulary size; filled in from the tokenizer when left empty.", at_least=1
    )
    n_kv_head: int | None = _field(
        None, "Key/value heads (grouped-query attention: each serves n_head / n_kv_head query "
        "heads; a smaller KV cache); must divide n_head. Empty: n_head.", at_least=1
    )
    head_dim: int | None = _field(None, "Width of each attention head. Empty: n_embd / n_head.", at_least=1)
    position: Literal["learned", "rope"] | None = _field(
        None, "Position encoding: `learned` embeddings added to the input (gpt2) or `rope`, "
        "rotary embeddings of queries and keys (llama)."
    )
    rope_theta: float = _field(10000.0, "RoPE base: the longest wavelength, in positions.", above=0)
    norm: Literal["layernorm", "rmsnorm"] | None = _field(
        None, "Normalisation: `layernorm` (gpt2) or `rmsnorm` (llama)."
    )
    norm_eps: float = _field(1e-5, "Epsilon of every norm.", above=0)
    bias: bool | None = _field(
        None, "Biases in every linear layer and LayerNorm (gpt2: true, llama: false)."
    )
    attn_bias: bool = _field(
        False, "Biases on the query/key/value projections only (Qwen2 has them)."
    )
    qk_norm: bool = _field(
        False, "RMSNorm each head's queries and keys before attention (Qwen3, nanochat): "
        "steadier attention logits."
    )
    mlp: Literal["gelu", "relu2", "swiglu"] | None = _field(
        None, "MLP: `gelu` (gpt2), `relu2` (ReLU squared, nanochat) or `swiglu` (gated, llama)."
    )
    mlp_hidden: int | None = _field(
        None, "MLP hidden width. Empty: 4 x n_embd, or for swiglu 8/3 x n_embd rounded up to "
        "a multiple of 64 (about the parameters of 4 x n_embd ungated).", at_least=1
    )
    tie_embeddings: bool | None = _field(
        None, "Share one matrix between input embeddings and output head (gpt2: true, llama: false)."
    )
    logit_softcap: float = _field(
        0.0, "Squash logits smoothly into (-cap, cap) with cap * tanh(logits / cap) (nanochat "
        "uses 15); 0 disables it.", at_least=0, says="0 (off) or more"
    )
    zero_init: bool | None = _field(
        None, "Start each block's output projections (and an untied output head) at zero, so "
        "every block begins as the identity (gpt2: false, llama: true)."
    )

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 64: faster matrix products on every device."""
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set yet")
        return math.ceil(self.vocab_size / 64) * 64

    def resolved(self) -> ModelConfig:
        """This config with every empty component key filled from its arch (idempotent)."""
        fill = {name: value for name, value in FAMILIES[self.arch].defaults.items()
                if getattr(self, name) is None}
        if self.n_kv_head is None:
            fill["n_kv_head"] = self.n_head
        if self.head_dim is None:
            fill["head_dim"] = self.n_embd // max(self.n_head, 1)
        cfg = dataclasses.replace(self, **fill)
        if cfg.mlp_hidden is None:
            hidden = 4 * cfg.n_embd if cfg.mlp != "swiglu" else 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
            cfg = dataclasses.replace(cfg, mlp_hidden=hidden)
        return cfg


@dataclass
class EvalTask:
    """A task scored at every evaluation of a run (an entry of `train.eval_tasks`), as
    `gptcli eval --task` scores it: multiple choice, or generation (greedy)."""

    task: Literal["hellaswag", "choice", "generate"] = _field(
        "choice", "`hellaswag` (its official JSONL), `choice` (JSONL of context, choices, label) or `generate` "
        "(JSONL of prompt or messages, and reference or references).")
    data: str = _field("", "The items' file.", path=True)
    limit: int | None = _field(None, "Score only the first N items (each evaluation).", at_least=1)
    name: str = _field("", "Short name in metrics (`NAME/acc_norm`); empty: the task's name.")
    metrics: list[str] = _field(["exact_match"], "generate: the metrics logged as `NAME/METRIC` (exact_match, f1, "
                                "rouge1, rouge2, rougeL, bleu, chrf).")
    max_new_tokens: int = _field(64, "generate: the most tokens of an answer.", at_least=1)
    stop: list[str] = _field([], "generate: texts that end an answer (left out of it).")
    raw: bool = _field(False, "generate: continue the prompt as plain text even on a chat model.")

    @property
    def metric_name(self) -> str:
        return self.name or self.task


@dataclass
class TrainConfig:
    batch_size: int = _field(12, "Sequences per micro-batch (per device).", at_least=1)
    grad_accum: int = _field(1, "Micro-batches accumulated into one optimizer step.", at_least=1)
    max_steps: int = _field(2000, "Optimizer steps to train for.", at_least=1)
    lr: float = _field(6.0e-4, "Peak learning rate, reached after warmup.", above=0)
    min_lr: float = _field(6.0e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = _field(100, "Steps of linear warmup from 0 to lr.", at_least=0)
    lr_decay_steps: int | None = _field(
        None, "Step at which the cosine decay reaches min_lr (empty: max_steps). Fix it to "
        "lengthen a run later without changing the schedule of the steps already taken."
    )
    optimizer: Literal["adamw", "muon"] = _field(
        "adamw", "`adamw`, or `muon`: Muon (momentum orthogonalised by Newton-Schulz, as "
        "torch.optim.Muon) for the 2-D weights inside the blocks, AdamW at train.lr for the rest "
        "(LoRA's adapters included)."
    )
    muon_lr: float = _field(0.02, "Muon's peak learning rate (same warmup and decay as train.lr).", above=0)
    muon_momentum: float = _field(0.95, "Muon's (Nesterov) momentum.", at_least=0, below=1)
    weight_decay: float = _field(0.1, "Weight decay (decoupled), applied to matrices only.", at_least=0)
    beta1: float = _field(0.9, "AdamW beta1.", at_least=0, below=1)
    beta2: float = _field(0.95, "AdamW beta2.", at_least=0, below=1)
    grad_clip: float = _field(1.0, "Clip the global gradient norm to this; 0 disables clipping.", at_least=0)
    eval_every: int = _field(250, "Evaluate on the validation split every this many steps.", at_least=1)
    eval_batches: int = _field(20, "Micro-batches averaged for one validation loss.", at_least=1)
    eval_tasks: list[EvalTask] = _field(
        [], "Language models: tasks scored at every evaluation, a list of `{task, data, limit, name, ...}` "
        "(`task`: `hellaswag`, `choice` or `generate`; `limit`: the first N items; `name`: in metrics, default "
        "the task). Multiple choice logs `NAME/acc`, `NAME/acc_norm`; generate answers greedily and logs "
        "`NAME/METRIC` for each of its `metrics`, with its `max_new_tokens`, `stop` and `raw`.",
        path=True,
    )
    save_every: int = _field(250, "Save a checkpoint every this many steps (and at the end).", at_least=1)
    keep_last: int = _field(
        0, "Keep only the newest N step checkpoints (the best and latest are always kept); 0 keeps all.",
        at_least=0,
    )
    max_bad_steps: int = _field(
        3, "Stop after this many consecutive steps with a non-finite loss (their updates are skipped).",
        at_least=1,
    )
    log_every: int = _field(10, "Record training metrics every this many steps.", at_least=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _field(
        "auto", "`auto` picks bf16 on GPUs that support it, fp16 with loss scaling on older "
        "GPUs, and on CPU whichever of fp32 and bf16 runs this model faster."
    )
    compile: Literal[COMPILE_CHOICES] = _field(
        "auto", "torch.compile the model: `on`, `off`, or `auto`: on CUDA only (`true` and "
        "`false` are read as `on` and `off`)."
    )
    device: str = _field("auto", "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`.")
    parallel: Literal["ddp", "fsdp"] = _field(
        "ddp", "Under torchrun: `ddp` keeps a whole copy of the model in every process; `fsdp` "
        "(FSDP2) shards weights, gradients and optimizer state over the processes, for models "
        "that do not fit one device. Ignored in a single process."
    )
    checkpoint: Literal["full", "sharded"] = _field(
        "full", "`full`: whole weights and optimizer state in safetensors, gathered on rank 0 under fsdp; "
        "`sharded`: each process writes its own shards (torch.distributed.checkpoint), nothing gathered. "
        "Either resumes under any number of processes; `sample`, `eval`, `info` and `export-hf` read both."
    )
    async_checkpoint: bool = _field(
        False, "With `checkpoint: sharded`: write each checkpoint on a thread while training goes on (its "
        "state is copied aside first); `latest` moves once it is complete."
    )
    tensorboard: bool = _field(
        False, "Also log every metric for TensorBoard under OUT_DIR/tensorboard (needs the "
        "`tensorboard` package: pip install 'gptcli[tensorboard]')."
    )
    activation_checkpointing: bool = _field(
        False, "Recompute each block's activations during the backward pass instead of keeping "
        "them: much less memory for long contexts, for about one more forward pass of compute."
    )


@dataclass
class RunConfig:
    out_dir: str = _field("runs/gpt", "Run directory: config, metrics and checkpoints go here.", path=True)
    seed: int = _field(1337, "Seed for initialisation, data order and dropout.", **_SEED_RULE)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FreezeConfig:
    embeddings: bool = _field(False, "Freeze the input embeddings: wte and wpe (a tied lm_head with them; an untied one trains).")
    blocks: int = _field(0, "Freeze the first N transformer blocks.", at_least=0)


@dataclass
class LoRAConfig:
    rank: int = _field(0, "Adapter rank; 0 trains all weights instead (full finetuning).", at_least=0)
    alpha: float = _field(16.0, "Adapter scale numerator: updates are scaled by alpha / rank.")
    dropout: float = _field(0.05, "Dropout on the adapter input, in [0, 1).", at_least=0, below=1)
    targets: list[str] = _field(
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        "Linear layers that get adapters, by module-name suffix.",
    )


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "simpo"] = _field(
        "sigmoid", "`sigmoid` (DPO), `ipo`, or `simpo` (reference-free: log-probabilities averaged over each "
        "answer's tokens, a target margin gamma).")
    beta: float = _field(0.1, "How far the policy may move from the reference (DPO's and IPO's beta; SimPO's scale).",
                         above=0)
    label_smoothing: float = _field(0.0, "sigmoid, simpo: the assumed chance that a pair's labels are flipped "
                                         "(conservative DPO).", at_least=0, below=0.5)
    gamma: float = _field(0.5, "simpo: the target reward margin.", at_least=0)
    reference: Literal["precompute", "live"] = _field(
        "precompute", "The reference's log-probabilities: `precompute`d once before training (no second model in "
        "memory), or computed `live` with each batch (LoRA: the adapters switched off; full: a frozen copy).")
    rpo_alpha: float = _field(
        0.0, "Weight of the chosen answer's negative log-likelihood per token, added to the loss (RPO; TRL's "
        "rpo_alpha): keeps chosen answers likely while the margin grows; 0: off.", at_least=0)


@dataclass
class RewardConfig:
    """One reward a GRPO completion is scored by (an entry of `finetune.grpo.rewards`)."""

    name: str = _field("exact", "A built-in reward or a function of yours (GRPOConfig.rewards).")
    weight: float = _field(1.0, "What this reward counts in the sum a completion is scored by.")
    pattern: str = _field("", "regex: the pattern (Python's re.search) a completion must contain.")


@dataclass
class GRPOConfig:
    group_size: int = _field(8, "Completions sampled per prompt (G): each is scored against its group.",
                             at_least=2)
    max_new_tokens: int = _field(64, "The most tokens of a completion.", at_least=1)
    temperature: float = _field(1.0, "Sampling temperature of the rollouts.", above=0)
    top_p: float = _field(1.0, "Nucleus sampling of the rollouts (1: off).", above=0, at_most=1)
    loss: Literal["dapo", "grpo"] = _field(
        "dapo", "`dapo`: every token of the step weighs the same (token-level, DAPO); `grpo`: each completion's "
        "tokens are averaged first (DeepSeekMath).")
    clip_low: float = _field(0.2, "The ratio's floor is 1 - clip_low (reuse > 1).", at_least=0, below=1)
    clip_high: float = _field(0.28, "The ratio's ceiling is 1 + clip_high (DAPO's clip-higher; reuse > 1).",
                              at_least=0)
    beta: float = _field(0.0, "Weight of the KL to the starting model (0: none, and no reference kept; above 0: "
                              "LoRA runs switch their adapters off, full runs keep a frozen copy).", at_least=0)
    scale_rewards: bool = _field(True, "Divide each group's centred rewards by their std (false: Dr. GRPO).")
    dynamic_sampling: bool = _field(
        False, "DAPO's dynamic sampling: a micro-batch keeps only groups whose rewards differ (a group of equal "
        "rewards teaches nothing but still counts in the average), drawing more prompts, up to 4 draws in all, to "
        "fill batch_size; costs generation, not training.")
    reuse: int = _field(1, "Optimizer steps each batch of rollouts trains (more than 1 brings in the clipped "
                           "ratio); rollouts are drawn afresh every `reuse` steps.", at_least=1)
    rewards: list[RewardConfig] = _field(
        [RewardConfig()], "The rewards a completion's score sums, a list of `{name, weight, pattern}`; the first is the "
        "verifier `val_pass@1` counts (full marks: 1). `name`: `exact` (the final answer, the last number or "
        "\\boxed{}, equals the record's answer), `contains`, `exact_match`, `f1` (SQuAD's, against the answer), "
        "`regex` (1 when `pattern` matches the completion), `length` (minus the completion's share of "
        "max_new_tokens: a length penalty), or your function `FILE.py:FUNCTION` or `module:function`, called with "
        "(prompt, completion, answer) and returning a number.")


@dataclass
class FinetuneConfig:
    task: Literal["classify", "lm", "instruct", "dpo", "grpo"] = _field(
        "classify", "What to adapt the model to (`--task` on the command line overrides it)."
    )
    init_from: str = _field(
        "", "Run or checkpoint directory to start from; empty: the latest pretrained run under runs/.",
        path=True,
    )
    train_file: str = _field(
        "", "classify/instruct/dpo/grpo: CSV, TSV, JSONL (maybe .gz or .zst) or Parquet training data; "
        "`stdlib-packages`, `stdlib-docstrings`, `stdlib-preferences` and `later-letter` are the built-in examples. "
        "lm: use data.inputs instead.",
        path=True
    )
    val_file: str = _field("", "Validation data; empty: hold out val_fraction of train_file.", path=True)
    val_fraction: float = _field(0.1, "Share of train_file held out when there is no val_file.",
                                 above=0, below=1)
    text_column: str = _field("text", "classify: column (or JSONL field) with the text.")
    label_column: str = _field("label", "classify: column (or JSONL field) with the label.")
    truncate: Literal["keep_end", "keep_start"] = _field(
        "keep_end", "classify, long_text truncate: which part of a text longer than the context to keep."
    )
    long_text: Literal["truncate", "pool"] = _field(
        "truncate", "classify: a text longer than the context is cut to it (`truncate`, see truncate) or read "
        "whole as overlapping context-long windows whose class logits are averaged (`pool`: costs one "
        "window per pool_stride tokens). Stored with the checkpoint: eval and sample read texts the same way."
    )
    pool_stride: int = _field(
        0, "classify, long_text pool: tokens between the starts of consecutive windows, at most the "
        "context; 0: half the context.", at_least=0, says="0 (half the context) or more"
    )
    pooling: Literal["last", "mean"] = _field(
        "mean", "classify: the classifier reads the `mean` of the hidden states of all real (non-padding) "
        "tokens, or the hidden state of the `last` one (GPT-2's choice, and what `export-hf` writes for "
        "transformers). Mean measured better on the built-in example (BENCHMARKS.md, issue 19). Stored with "
        "the checkpoint."
    )
    aux_lm_weight: float = _field(
        0.0, "classify: weight of an auxiliary language-modelling loss (0.5 in the GPT paper).",
        at_least=0,
    )
    pack: bool = _field(False, "instruct: pack short conversations into full rows.")
    too_long: Literal["drop", "error"] = _field(
        "drop", "instruct, dpo, grpo: a conversation (a prompt with its longer answer; grpo: a prompt with "
        "max_new_tokens) longer than the context is "
        "`drop`ped (the count is reported; none left in training or validation is an error) or an `error` "
        "naming its file:line. Never cut: that would teach half answers."
    )
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    patience: int = _field(
        5, "Stop after this many evaluations without improving the validation metric; 0 never stops.",
        at_least=0,
    )
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    merge: bool = _field(
        True, "After LoRA training, also save `checkpoints/merged`: adapters folded into plain weights."
    )


# A finetune config's `model` section: ModelConfig's settings, each optional. The model keys
# a finetune may change from the checkpoint's (tasks/finetune.py), with what they mean there;
# every other key must agree with the checkpoint.
FINETUNE_MAY_CHANGE = {
    "dropout": "Dropout for finetuning (empty: the checkpoint's).",
    "block_size": "A shorter context than the checkpoint's (its first positions are kept); empty: the same.",
}
SAME = "Must equal the checkpoint's (or stay empty)."


def _finetune_model_config() -> type:
    """FinetuneModelConfig, derived from ModelConfig rather than copied: the same settings
    with the same types (made optional) and rules, every default None (the checkpoint's
    value); the keys a finetune may change come first, as the config reference lists them."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    order = [*FINETUNE_MAY_CHANGE, *(name for name in fields if name not in FINETUNE_MAY_CHANGE)]
    # The types stay text (`from __future__ import annotations`), read when a config is
    # loaded: `arch`'s choices are the family table's names at that moment.
    cls = dataclasses.make_dataclass("FinetuneModelConfig", [
        (name, f"{fields[name].type} | None",
         field(default=None, metadata={**fields[name].metadata, "help": FINETUNE_MAY_CHANGE.get(name, SAME)}))
        for name in order
    ])
    cls.__module__ = __name__  # where typing.get_type_hints reads the types' names
    cls.__doc__ = ("A finetune config's `model` section: the model comes from the checkpoint, so every "
                   "key is optional (None: the checkpoint's value) and must agree with it (so a "
                   "pretraining config's section can be copied in), except the two a finetune may "
                   "change (FINETUNE_MAY_CHANGE).")
    return cls


FinetuneModelConfig = _finetune_model_config()


@dataclass
class FinetuneRunConfig:
    out_dir: str = _field("runs/finetune", "Run directory: config, metrics and checkpoints go here.",
                          path=True)
    seed: int = _field(1337, "Seed for the head, adapters, data order and dropout.", **_SEED_RULE)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, lr=1e-4, min_lr=1e-5, warmup_steps=20, weight_decay=0.0, eval_every=25,
        eval_batches=20, save_every=100, log_every=5,
    ))


# ---------------------------------------------------------------------------------------
# Validation of values that types alone cannot express. A field's own range is declared on
# the field (`_field`) and checked by `field_problems`; what follows are the rules across
# fields. Each returns a list of problems.


def model_config_problems(m: ModelConfig) -> list[str]:
    """Problems with a model's shape: of a run config, or one stored in a checkpoint.
    Sizes too large for memory are left to the memory check made before building."""
    return field_problems(m, "model") + _model_shape_problems(m)


def _model_shape_problems(m: ModelConfig) -> list[str]:
    """The model's rules across fields (each field's own range is declared on it)."""
    problems = []
    if m.head_dim is None and m.n_head >= 1 and m.n_embd >= 1 and m.n_embd % m.n_head:
        problems.append(f"model.n_embd: {_show(m.n_embd)} is not divisible by "
                        f"model.n_head={_show(m.n_head)}; change one, or set model.head_dim")
    if m.n_kv_head is not None and m.n_kv_head >= 1 and m.n_head >= 1 and m.n_head % m.n_kv_head:
        problems.append(f"model.n_kv_head: {_show(m.n_kv_head)} does not divide "
                        f"model.n_head={_show(m.n_head)}")
    resolved = m.resolved()  # the arch's position encoding and the derived head width
    if resolved.position == "rope" and resolved.head_dim % 2:
        problems.append(f"model.head_dim: rotary embeddings rotate pairs, so the head width "
                        f"must be even, got {_show(resolved.head_dim)}")
    return problems


def _run_problems(cfg: RunConfig) -> list[str]:
    """Every field's rule, in field order, then the rules across fields."""
    return (field_problems(cfg) + _model_shape_problems(cfg.model)
            + _train_and_data_problems(cfg.train, cfg.data))


def _train_and_data_problems(t: TrainConfig, d: DataConfig) -> list[str]:
    """The rules across fields of the sections pretraining and finetuning share."""
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    if t.lr_decay_steps is not None:
        need(t.lr_decay_steps > t.warmup_steps, f"train.lr_decay_steps: must be greater than "
                                                f"train.warmup_steps, got {_show(t.lr_decay_steps)}")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr: must be in [0, train.lr={t.lr}], got {t.min_lr}")
    problems += mixture_problems(d)
    names = [task.metric_name for task in t.eval_tasks]
    for i, task in enumerate(t.eval_tasks):
        need(bool(task.data), f"train.eval_tasks[{i}].data: missing; name the task's JSONL file")
        need(names.count(task.metric_name) == 1, f"train.eval_tasks[{i}]: another task is also named "
                                                 f"'{task.metric_name}'; give each a unique name")
        need(not task.name or bool(SOURCE_NAME.fullmatch(task.name)),
             f"train.eval_tasks[{i}].name: use letters, digits, '_', '-' and '.' only, got {_describe(task.name)}")
        need(task.task == "generate" or (task.metrics, task.stop) == (["exact_match"], []),
             f"train.eval_tasks[{i}]: metrics and stop are for generate tasks; {task.task} logs acc and acc_norm")
        need(task.task != "generate" or bool(task.metrics),
             f"train.eval_tasks[{i}].metrics: name at least one metric to log")
        need(task.task != "generate" or t.parallel != "fsdp",
             f"train.eval_tasks[{i}]: generate tasks do not run under train.parallel=fsdp (each decoding step "
             f"would gather every shard); use ddp, or score the checkpoints with gptcli eval --task generate")
    need(bool(d.text_field), "data.text_field: must not be empty")
    need(not t.async_checkpoint or t.checkpoint == "sharded",
         "train.async_checkpoint: writes sharded checkpoints; set train.checkpoint=sharded too")
    return problems


def mixture_problems(d: DataConfig) -> list[str]:
    """Problems with a weighted mixture in `data.inputs` (none for plain paths) beyond each
    source's own field rules (a weight greater than 0)."""
    if not d.is_mixture:
        return []
    problems, names = [], {}
    for i, entry in enumerate(d.inputs):
        where = f"data.inputs[{i}]"
        if not isinstance(entry, DataSource):
            problems.append(f"{where}: expected a mapping {{path, weight}} like the other entries "
                            f"(a mixture's entries are all mappings), got {_describe(entry)}")
            continue
        if not entry.path:
            problems.append(f"{where}.path: missing; name the source's file, folder, glob or "
                            f"tokenized directory")
        if entry.weight is None:
            problems.append(f"{where}.weight: missing; give each source a weight greater than 0")
        if entry.name and not SOURCE_NAME.fullmatch(entry.name):
            problems.append(f"{where}.name: use letters, digits, '_', '-' and '.' only, got "
                            f"{_describe(entry.name)}")
        elif entry.name in names:
            problems.append(f"{where}.name: '{entry.name}' is already the name of "
                            f"data.inputs[{names[entry.name]}]; names must be unique")
        elif entry.name:
            names[entry.name] = i
    return problems


def _finetune_problems(cfg: FinetuneRunConfig) -> list[str]:
    """Field rules (the model section's included: those of ModelConfig), the rules of the
    sections shared with pretraining, and finetuning's own. The model's shape comes from
    the checkpoint: tasks/finetune.py checks the section against it."""
    problems = field_problems(cfg)
    if cfg.data.is_mixture:
        problems.append("data.inputs: a weighted mixture of sources is for pretraining; for "
                        "finetuning (--task lm) list plain paths")
    if cfg.finetune.lora.rank and not cfg.finetune.lora.targets:
        problems.append("finetune.lora.targets: name at least one layer")
    if cfg.finetune.task == "grpo" and cfg.train.parallel == "fsdp":
        problems.append("train.parallel: grpo generates its rollouts with whole weights on every process; use ddp")
    if cfg.finetune.task == "classify" and cfg.train.eval_tasks:
        problems.append("train.eval_tasks: tasks are scored by language models; a classifier logs its accuracy "
                        "(use --task lm or instruct, or leave them out)")
    return problems + _train_and_data_problems(cfg.train, cfg.data)


# ---------------------------------------------------------------------------------------
# Strict conversion from plain YAML data to dataclasses.


def _describe(value: Any) -> str:
    """A user's value as an error quotes it: its repr (shortened) and, unless text, its type."""
    text = shorten(repr(value))
    return text if isinstance(value, str) else f"{text} ({type(value).__name__})"


def _coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the type `hint`; return it converted, or record a problem."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = [o for o in options if o is not type(None)]
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        if sections and len(options) > 1:  # text or a mapping (a mixture source): by the value
            if isinstance(value, dict):
                return _build(sections[0], value, path, problems)
            options = [o for o in options if o not in sections]
        (inner,) = options
        return _coerce(value, inner, path, problems)
    if origin is Literal:
        choices = typing.get_args(hint)
        text = str(value).lower() if isinstance(value, bool) else value
        text = OLD_VALUES.get(".".join(path.split(".")[-2:]), {}).get(text, text)
        if text in choices:
            return text
        problems.append(f"{path}: expected one of {', '.join(choices)}; got {_describe(value)}")
        return None
    if dataclasses.is_dataclass(hint):  # a section inside a list (train.eval_tasks)
        if isinstance(value, dict):
            return _build(hint, value, path, problems)
        problems.append(f"{path}: expected a mapping of keys to values, got {_describe(value)}")
        return None
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return None
        return [_coerce(v, item_hint, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {_describe(value)}")
    elif hint is int:
        number = _as_number(value)
        if isinstance(number, int):  # as it is: a huge one is not a float (and is range-checked)
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        problems.append(f"{path}: expected a whole number, got {_describe(value)}")
    elif hint is float:
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            return number
        problems.append(f"{path}: expected a number, got {_describe(value)}")
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected text, got {_describe(value)}")
    else:  # pragma: no cover - a field type this loader was not taught
        raise TypeError(f"unsupported config type {hint!r} at {path}")
    return None


def _as_float(value: Any) -> float | None:
    """`_as_number` as a float; None for a whole number too large for one (over 1e308)."""
    number = _as_number(value)
    try:
        return None if number is None else float(number)
    except OverflowError:
        return None


def _as_number(value: Any) -> float | int | None:
    """Numbers, and strings such as '1e-3' that YAML 1.1 leaves as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build(cls: type, data: Any, path: str, problems: list[str], base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping over `base` (default: `cls()`), recording
    unknown keys and bad values. Sections start from their parent's defaults, so a
    finetune run's `train` keeps its own lower learning rate unless the YAML sets one."""
    where = f"{path}: " if path else ""
    base = cls() if base is None else base
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config: '}expected a mapping of keys to values, "
                        f"got {_describe(data)}")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = _renamed(cls, data, path, problems)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            problems.append(f"{shorten(dotted)}: unknown key{hint}")
            continue
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, dotted, problems, getattr(base, key))
            continue
        before = len(problems)
        converted = _coerce(value, hints[key], dotted, problems)
        if len(problems) == before:  # a rejected value leaves the default in place
            kwargs[key] = converted
    return dataclasses.replace(base, **kwargs)


def _renamed(cls: type, data: dict, path: str, problems: list[str]) -> dict:
    """`data` with old key names (OLD_NAMES) replaced by the current ones; an old and a
    current name given different values is a problem."""
    old_names = OLD_NAMES.get(cls, {})
    renamed = {}
    for key, value in data.items():
        new = old_names.get(key, key)
        if new != key and new in data:
            if data[new] != value:
                problems.append(f"{path}.{key}: the old name of {path}.{new}, which is also set, "
                                f"to something else ({_describe(value)} vs {_describe(data[new])}); "
                                f"keep only {path}.{new}")
            continue
        renamed[new] = value
    return renamed


# ---------------------------------------------------------------------------------------
# YAML reading and `--set` overrides.


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys (YAML would silently keep the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
            )
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{shorten(str(key))}' (line {line})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path` with the safe loader; one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise GptcliError(f"config file {path} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GptcliError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise GptcliError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    except ValueError as exc:  # a scalar YAML cannot build: a date 2024-13-45, a 5000-digit number
        raise GptcliError(f"{path}: invalid YAML value ({shorten(str(exc), 100)}); correct it, "
                          f"or quote it to make it text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptcliError(
            f"{path}: the top level must be a mapping of sections (out_dir, data, model, "
            f"train, ...), got {type(data).__name__}"
        )
    return data


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return " ".join(f"{problem}{where}".split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings onto YAML data; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise GptcliError(f"--set {shorten(repr(item))}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: a scalar YAML cannot build
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GptcliError(f"--set {shorten(repr(item))}: '{shorten(part)}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _expand_user_paths(cfg: Any) -> Any:
    """`~` in path fields (YAML and --set values never pass through a shell)."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _expand_user_paths(value)
        elif f.metadata.get("path") and isinstance(value, str):
            changes[f.name] = os.path.expanduser(value)
        elif f.metadata.get("path") and isinstance(value, list):
            changes[f.name] = [os.path.expanduser(v) if isinstance(v, str) else
                               _expand_user_paths(v) if dataclasses.is_dataclass(v) else v for v in value]
    return dataclasses.replace(cfg, **changes)


def config_from_dict(data: dict, cls: type = RunConfig) -> Any:
    """Build and validate a config from plain data; raise one error listing every problem."""
    problems: list[str] = []
    cfg = _expand_user_paths(_build(cls, data, "", problems))
    # The range checks run even after type problems (a value of the wrong type was left at
    # its default), so one try reports everything; a key reported already is not repeated.
    reported = {problem.partition(":")[0] for problem in problems}
    problems += [problem for problem in _value_problems(cfg) if problem.partition(":")[0] not in reported]
    if problems:
        raise GptcliError("; ".join(problems))
    # The arch fills the component keys left empty: what runs is written down in full.
    if isinstance(cfg, RunConfig):
        return dataclasses.replace(cfg, model=cfg.model.resolved(), data=cfg.data.resolved())
    return cfg.resolved() if isinstance(cfg, ModelConfig) else cfg


def _value_problems(cfg: Any) -> list[str]:
    """What the types cannot say about a built config: each field's range and the rules
    across fields. A model section alone is named as in a run config (`model.n_head`)."""
    if isinstance(cfg, RunConfig):
        return _run_problems(cfg)
    if isinstance(cfg, ModelConfig):
        return model_config_problems(cfg)
    if isinstance(cfg, FinetuneRunConfig):
        return _finetune_problems(cfg)
    return field_problems(cfg, "model" if isinstance(cfg, FinetuneModelConfig) else "")


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                cls: type = RunConfig) -> Any:
    """Defaults < YAML file < overrides, strictly checked."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, list(overrides or [])), cls)


def config_to_dict(cfg: Any) -> dict:
    """Plain data (for YAML and JSON) of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _is_section_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(dataclasses.is_dataclass(v) for v in value)


def field_docs(cls: type = RunConfig, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, recursing into sections: the config reference."""
    rows = []
    instance = cls() if instance is None else instance
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += field_docs(type(value), f"{prefix}{f.name}.", value)
        else:
            shown = [dataclasses.asdict(v) for v in value] if _is_section_list(value) else value
            rows.append((f"{prefix}{f.name}", repr(shown), f.metadata.get("help", "")))
    return rows
