"""`gptcli info`: what a checkpoint holds, read from its files without building the model:
shape, parameter count, tokenizer, origin, training progress, metrics at save time, file
sizes, and whether every file still matches its checksum.

Damage is described, never fatal: a weights file cut short (or otherwise unreadable) is
described from its header, or, without one, from the run's config.yaml, and the
description's `problems` say what is wrong, beside the failed checksums line; so does a
`latest` pointer that names no usable checkpoint (rundir.read_pointer)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import yaml

from gptcli.config import RunConfig, load_config
from gptcli.data.tokenizers.tokenizer import load_tokenizer
from gptcli.data.training.mixture import tokens_by_source
from gptcli.errors import GptcliError
from gptcli.events import Notice
from gptcli.model import get_arch
from gptcli.store.checkpoint import (
    CONFIG_YAML,
    LATEST,
    MANIFEST,
    TOKENIZER_DIR,
    TRAINER_JSON,
    WEIGHTS,
    model_config_of,
    read_trainer_json,
    read_weights_header,
    verify_checkpoint,
)
from gptcli.store.rundir import resolve_checkpoint
from gptcli.store.runlog import read_metrics
from gptcli.store.sharded import is_sharded, shard_shapes

_MERGED_SUFFIX = "-merged"  # finetune.py names merged LoRA copies step-NNNNNN-merged


def checkpoint_info(path: str | Path) -> dict:
    """A JSON-ready description of the checkpoint at `path` (a run directory: its latest).
    `problems` (present only when there are some) lists damage found on the way; `model`
    and `parameters` are None only when neither the weights nor config.yaml give them."""
    source = Path(path)
    problems: list[str] = []
    checkpoint = resolve_checkpoint(source, prefer=LATEST,
                                    on_event=lambda e: isinstance(e, Notice) and problems.append(e.message))
    weights = _weights(checkpoint, problems)
    metadata = weights.metadata
    info = {
        "checkpoint": str(checkpoint),
        "kind": _kind(source, checkpoint, metadata),
        "model": None if weights.cfg is None else dataclasses.asdict(weights.cfg),  # resolved: arch and every component
        "parameters": weights.parameters,
        "tokenizer": _tokenizer_name(checkpoint, metadata),
    }
    if "labels" in metadata:
        info["labels"] = json.loads(metadata["labels"])
    if weights.adapter_parameters:
        info["lora"] = {**json.loads(metadata["lora"]), "adapter_parameters": weights.adapter_parameters}
    info.update(_training(checkpoint))
    info["files"] = {str(p.relative_to(checkpoint)): p.stat().st_size
                     for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    try:
        verify_checkpoint(checkpoint)
        info["checksums"] = f"ok ({len(info['files']) - 1} files match {MANIFEST})"
    except GptcliError as exc:
        info["checksums"] = f"FAILED: {exc}"
    if problems:
        info["problems"] = problems
    return info


@dataclasses.dataclass(frozen=True)
class _Weights:
    """What the weights file tells about the model, as far as it can be read."""

    metadata: dict[str, str]  # empty when the header is unreadable
    cfg: object | None  # the model config (the arch's dataclass)
    parameters: int | None  # stored parameters (a tied head counted once)
    adapter_parameters: int  # of them, LoRA adapters'


def _weights(checkpoint: Path, problems: list[str]) -> _Weights:
    """The model described from the weights file's header (which a truncated file still
    has); without a readable header, from config.yaml. What is wrong goes to `problems`."""
    path = checkpoint / WEIGHTS
    try:
        header = read_weights_header(path)
        cfg = model_config_of(header.metadata, path)
    except GptcliError as exc:
        problems.append(str(exc))
        cfg = _model_from_run_config(checkpoint)
        if cfg is None:
            problems.append(f"{CONFIG_YAML} does not give the model's shape either (only a pretraining "
                            f"run's does)")
            return _Weights({}, None, None, 0)
        problems.append(f"the model's shape is read from {CONFIG_YAML} instead")
        return _Weights({}, cfg, _parameters_of(cfg), 0)
    if header.problem is not None:
        problems.append(f"{header.problem}; the model cannot be loaded from it")
    shapes = header.shapes
    if is_sharded(checkpoint):  # the weights are in the shards; the file holds their metadata
        shapes = {n: s for n, s in shard_shapes(checkpoint).items()
                  if not (cfg.tie_embeddings and n.endswith("lm_head.weight"))}
    total = sum(math.prod(shape) for shape in shapes.values())
    adapters = sum(math.prod(shape) for name, shape in shapes.items() if ".lora_" in name)
    return _Weights(header.metadata, cfg, total, adapters)


def _model_from_run_config(checkpoint: Path) -> object | None:
    """A pretraining run's config.yaml holds the resolved model config; a finetune's holds
    only the settings it changed, and an import's none."""
    try:
        cfg = load_config(checkpoint / CONFIG_YAML)
    except (GptcliError, OSError):
        return None
    return cfg.model if isinstance(cfg, RunConfig) and cfg.model.vocab_size else None


def _parameters_of(cfg: object) -> int:
    """Parameters of a model of `cfg`, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return get_arch(cfg.arch).model(cfg).num_params()


def _tokenizer_name(checkpoint: Path, metadata: dict[str, str]) -> str:
    """The tokenizer's name, from the weights' metadata or else the tokenizer folder."""
    try:
        return json.loads(metadata["tokenizer"]).get("name", "?")
    except (KeyError, ValueError, AttributeError):
        pass
    try:
        return load_tokenizer(checkpoint / TOKENIZER_DIR).name
    except (GptcliError, OSError):
        return "?"


def _kind(source: Path, checkpoint: Path, metadata: dict) -> str:
    """pretrain / finetune TASK / imported from Hugging Face, and how LoRA stands."""
    try:
        config_text = (checkpoint / CONFIG_YAML).read_text()
        config = {} if config_text.startswith("#") else yaml.safe_load(config_text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a damaged file: the checksums line says which
        config_text, config = "", None
    if config_text.startswith("# imported from Hugging Face"):
        kind = f"imported from Hugging Face ({config_text.split('directory', 1)[-1].strip()})"
    elif not isinstance(config, dict):
        kind = f"unknown ({CONFIG_YAML} unreadable)"
    else:
        finetune = config.get("finetune")
        kind = f"finetune {finetune.get('task', '?')}" if isinstance(finetune, dict) else "pretrain"
    if "lora" in metadata:
        kind += ", LoRA adapters (not merged)"
    elif checkpoint.name.endswith(_MERGED_SUFFIX):
        kind += ", LoRA adapters merged into the weights"
    if metadata.get("task") == "classify":
        kind += ", classifier"
    return kind


def _training(checkpoint: Path) -> dict:
    """Step, tokens seen, best metric and the last evaluation before this save."""
    path = checkpoint / TRAINER_JSON
    if not path.is_file():
        return {"training": "no trainer state (an export or merged copy: not resumable)"}
    try:
        trainer = read_trainer_json(checkpoint)
    except ValueError:
        return {"training": f"{path} is unreadable"}
    result = {"step": trainer["step"], "tokens_seen": trainer["tokens_seen"],
              "best_metric": trainer["best_metric"]}
    if trainer.get("precision"):
        result["precision"] = trainer["precision"]
    by_source = _tokens_by_source(checkpoint, trainer)
    if by_source:
        result["tokens_by_source"] = by_source
    evaluation = trainer.get("last_eval") or _eval_record_from_run(checkpoint, trainer["step"])
    if evaluation:
        result["metrics_step"] = evaluation["step"]  # the last evaluation may predate this save
        result["metrics"] = {k: v for k, v in evaluation.items()
                             if isinstance(v, (int, float)) and k not in ("step", "tokens_seen")}
    return result


def _tokens_by_source(checkpoint: Path, trainer: dict) -> dict[str, int] | None:
    """A mixture run's training tokens per source up to this checkpoint's step, re-derived
    from its config (the draws are a function of seed and step; data/training/mixture.py)."""
    try:
        cfg = load_config(checkpoint / CONFIG_YAML)
    except GptcliError:  # a finetune's or an import's config: no mixture
        return None
    if not isinstance(cfg, RunConfig) or not cfg.data.is_mixture or not trainer.get("global_batch"):
        return None
    return tokens_by_source(cfg.data, cfg.seed, trainer["step"], trainer["global_batch"], cfg.model.block_size)


def _eval_record_from_run(checkpoint: Path, step: int) -> dict | None:
    """For checkpoints written before trainer state kept the last evaluation: the run's
    metrics.jsonl record of that step, when the checkpoint sits in its run directory."""
    records = [r for r in read_metrics(checkpoint.parent.parent) if r.get("step") == step and
               any(k.startswith("val_") for k in r)]
    return records[-1] if records else None
