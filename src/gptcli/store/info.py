"""`gptcli info`: what a checkpoint holds, read from its files without building the model:
shape, parameter count, tokenizer, origin, training progress, metrics at save time, file
sizes, and whether every file still matches its checksum."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import yaml
from safetensors import safe_open

from gptcli.config import RunConfig, load_config
from gptcli.data.mixture import tokens_by_source
from gptcli.errors import GptcliError
from gptcli.store.checkpoint import (
    CONFIG_YAML,
    LATEST,
    MANIFEST,
    TRAINER_JSON,
    WEIGHTS,
    read_metadata,
    read_model_config,
    read_trainer_json,
    verify_checkpoint,
)
from gptcli.store.rundir import resolve_checkpoint
from gptcli.store.runlog import read_metrics

_MERGED_SUFFIX = "-merged"  # finetune.py names merged LoRA copies step-NNNNNN-merged


def checkpoint_info(path: str | Path) -> dict:
    """A JSON-ready description of the checkpoint at `path` (a run directory: its latest)."""
    source = Path(path)
    checkpoint = resolve_checkpoint(source, prefer=LATEST)
    metadata = read_metadata(checkpoint)
    cfg = read_model_config(checkpoint)
    parameters, adapter_parameters = _count_parameters(checkpoint / WEIGHTS)
    info = {
        "checkpoint": str(checkpoint),
        "kind": _kind(source, checkpoint, metadata),
        "model": dataclasses.asdict(cfg),  # resolved: arch and every component
        "parameters": parameters,
        "tokenizer": json.loads(metadata["tokenizer"]).get("name", "?"),
    }
    if "labels" in metadata:
        info["labels"] = json.loads(metadata["labels"])
    if adapter_parameters:
        info["lora"] = {**json.loads(metadata["lora"]), "adapter_parameters": adapter_parameters}
    info.update(_training(checkpoint))
    info["files"] = {str(p.relative_to(checkpoint)): p.stat().st_size
                     for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    try:
        verify_checkpoint(checkpoint)
        info["checksums"] = f"ok ({len(info['files']) - 1} files match {MANIFEST})"
    except GptcliError as exc:
        info["checksums"] = f"FAILED: {exc}"
    return info


def _count_parameters(weights: Path) -> tuple[int, int]:
    """(all stored parameters, LoRA adapter parameters), from the safetensors header."""
    total = adapters = 0
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            count = math.prod(f.get_slice(name).get_shape())
            total += count
            if ".lora_" in name:
                adapters += count
    return total, adapters


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
    from its config (the draws are a function of seed and step; data/mixture.py)."""
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
