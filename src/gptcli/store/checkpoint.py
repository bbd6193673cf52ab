"""Checkpoint directories: save atomically, load without unpickling anything.

    step-000500/
      model.safetensors    weights; arch, model config and tokenizer spec in its metadata
      tokenizer/           the tokenizer (see tokenizer.py)
      config.yaml          the resolved run config
      trainer.safetensors  optimizer moments and RNG states      (absent in export-only
      trainer.json         step, tokens seen, best val, schedule   checkpoints)

A sharded checkpoint (train.checkpoint: sharded) keeps its weights and optimizer state in
`sharded/` instead, its weights file holding only the metadata (see sharded.py).

A run directory keeps them under `checkpoints/` next to `latest` and `best`: one-line text
files naming the checkpoint, replaced atomically. A checkpoint is written under a
temporary name and renamed into place, so a crash leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptcli.atomic import new_staging_dir, staging_dir
from gptcli.config import FinetuneRunConfig, config_from_dict
from gptcli.data.training.labelled import TextReading
from gptcli.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from gptcli.errors import GptcliError, shorten
from gptcli.model import DEFAULT_ARCH, Arch, Model, get_arch
from gptcli.model.heads import GPTClassifier
from gptcli.model.lora import LoRASpec, apply_lora
from gptcli.outputs import mark, marked_kind
from gptcli.store.sharded import is_sharded, load_model_shards

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"  # sha256 and size of every other file, checked on load
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
CONFIG_YAML = "config.yaml"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS = "checkpoints"
CLASSIFIER = "classifier"  # weights-metadata key: a classifier's pooling and reading of long texts
LATEST, BEST = "latest", "best"
_TIED = "lm_head.weight"  # with tied embeddings, the same tensor as wte.weight: stored once


def _tied_keys(model: Model) -> set[str]:
    return {_TIED} if model.config.tie_embeddings else set()


@dataclass
class TrainerState:
    """Everything beyond the weights needed to continue a run exactly."""

    step: int
    tokens_seen: int = 0
    best_metric: float | None = None  # best value of the task's evaluation metric so far
    evals_since_best: int = 0  # for early stopping
    optimizer: dict | None = None  # torch optimizer state_dict
    scaler: dict | None = None  # GradScaler state_dict (fp16 only)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    global_batch: int | None = None  # sequences per step over all processes: a resume must keep it
    precision: str | None = None  # what the run trains in: a resume and `gptcli eval` repeat it
    val_sha256: str | None = None  # pretraining: the validation split `gptcli eval` can repeat
    before: dict | None = None  # validation metrics before the first step (finetuning lm)
    last_eval: dict | None = None  # the last evaluation's record: `gptcli info` shows it
    # A sharded checkpoint's optimizer state stays in its shards until the optimizer exists
    # (sharded.load_optimizer_shards); its param groups are read from trainer.json.
    optimizer_shards: Path | None = None
    optimizer_groups: list[dict] | None = None


_RECORDED = ("global_batch", "precision", "val_sha256", "before", "last_eval")  # trainer.json keys


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def shard_staging(target: str | Path) -> Path:
    """The temporary directory a sharded checkpoint of `target` is written in (its processes
    write their shards there, then `save_checkpoint(..., shards=it)` completes it)."""
    target = Path(target)
    _remove_stale_staging(target)
    return new_staging_dir(target)


def _remove_stale_staging(target: Path) -> None:
    for stale in target.parent.glob(f".tmp-{glob.escape(target.name)}-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(target: str | Path, model: Model, tokenizer: Tokenizer, config_yaml: str,
                    trainer: TrainerState | None = None,
                    weights: dict[str, torch.Tensor] | None = None, mark_as: str | None = None,
                    metadata: dict[str, str] | None = None, shards: Path | None = None) -> Path:
    """Write a checkpoint directory at `target` atomically (temp dir, fsync, rename).
    `weights` (full tensors, e.g. gathered from shards) replace `model.state_dict()`;
    `mark_as` marks a checkpoint that is a command's whole output (see outputs.py);
    `metadata` adds entries to the weights' metadata (a classifier's reading, see
    classifier_metadata). `shards`: the `shard_staging` directory whose shards every
    process has written (sharded.py): the rest is written beside them, with a weights
    file of metadata only, and the whole moved into place."""
    target = Path(target)
    if shards is None:
        _remove_stale_staging(target)
    with staging_dir(target, shards) as tmp:
        tied = _tied_keys(model)
        weights = {} if shards is not None else {
            k: v.detach().contiguous() for k, v in (weights or model.state_dict()).items() if k not in tied}
        labels = getattr(model, "labels", None)  # a classification head names its classes
        extra, metadata = metadata, {
            "format": "gptcli/1",
            "arch": model.arch,
            "model_config": json.dumps(dataclasses.asdict(model.config)),
            "tokenizer": json.dumps(tokenizer.spec),
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "task": "lm" if labels is None else "classify",
        }
        if labels is not None:
            metadata["labels"] = json.dumps(labels)
        if model.lora_spec is not None:
            metadata["lora"] = json.dumps(dataclasses.asdict(model.lora_spec))
        save_file(weights, tmp / WEIGHTS, metadata={**metadata, **(extra or {})})
        tokenizer.save(tmp / TOKENIZER_DIR)
        (tmp / CONFIG_YAML).write_text(config_yaml)
        if trainer is not None:
            _save_trainer(tmp, trainer)
        if mark_as is not None:
            mark(tmp, mark_as)
        write_manifest(tmp)
    return target


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
                for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file against the manifest; a one-line error names the first bad one."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise GptcliError(f"{directory} has no {MANIFEST}; it is not a complete gptcli checkpoint") from None
    except ValueError:
        raise GptcliError(f"{directory / MANIFEST} is corrupted (not JSON)") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise GptcliError(f"checkpoint file {path} is missing")
        if path.stat().st_size != expected["bytes"] or _file_digest(path) != expected["sha256"]:
            raise GptcliError(f"checkpoint file {path} is corrupted (size or checksum differs from "
                              f"{MANIFEST}); use another checkpoint")


def _save_trainer(directory: Path, state: TrainerState) -> None:
    """Optimizer moments and RNG states go to safetensors, the rest to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    optimizer_json = state.optimizer_groups  # the groups alone: the moments are in shards
    if state.optimizer is not None:
        for index, slots in state.optimizer["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).contiguous()
        optimizer_json = state.optimizer["param_groups"]
    for name, value in state.rng.items():
        tensors[f"rng.{name}"] = value.contiguous()
    save_file(tensors, directory / TRAINER_TENSORS)
    info = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "best_metric": state.best_metric,
        "evals_since_best": state.evals_since_best,
        "optimizer_param_groups": optimizer_json,
        "scaler": state.scaler,
        **{name: getattr(state, name) for name in _RECORDED},
    }
    (directory / TRAINER_JSON).write_text(json.dumps(info, indent=1) + "\n")


def read_trainer_json(directory: str | Path) -> dict:
    """trainer.json of a checkpoint (no tensors). Checkpoints written before these fields were
    typed kept them in an `extra` mapping: they are read as top-level keys too."""
    info = json.loads((Path(directory) / TRAINER_JSON).read_text())
    return {**info.pop("extra", {}), **info}


def load_trainer_state(directory: str | Path) -> TrainerState:
    directory = Path(directory)
    verify_checkpoint(directory)
    try:
        info = read_trainer_json(directory)
        tensors = load_file(directory / TRAINER_TENSORS)
    except (OSError, ValueError, SafetensorError) as exc:
        raise GptcliError(f"{directory}: trainer state is missing or unreadable ({exc}); "
                          f"this checkpoint cannot be resumed") from None
    optimizer, sharded = None, is_sharded(directory)
    if info["optimizer_param_groups"] is not None and not sharded:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "optimizer":
                index, _, slot = rest.partition(".")
                state.setdefault(int(index), {})[slot] = value
        optimizer = {"state": state, "param_groups": info["optimizer_param_groups"]}
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainerState(step=info["step"], tokens_seen=info["tokens_seen"],
                        best_metric=info["best_metric"], evals_since_best=info["evals_since_best"],
                        optimizer=optimizer, scaler=info["scaler"], rng=rng,
                        optimizer_shards=directory if sharded else None,
                        optimizer_groups=info["optimizer_param_groups"],
                        **{name: info.get(name) for name in _RECORDED})


def read_metadata(directory: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint's weights file (model config, task, labels, LoRA)."""
    path = Path(directory) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise GptcliError(f"{path} is not a readable safetensors file ({exc})") from None
    if "model_config" not in metadata:
        raise GptcliError(f"{path} is not a gptcli model file (no model config in its metadata)")
    return metadata


def read_arch(directory: str | Path) -> Arch:
    """The model family of a checkpoint: `arch` in its weights metadata, gpt2 for checkpoints
    written before it was recorded."""
    return _arch_of(read_metadata(directory), Path(directory) / WEIGHTS)


def _arch_of(metadata: dict[str, str], path: Path) -> Arch:
    try:
        return get_arch(metadata.get("arch", DEFAULT_ARCH))
    except GptcliError as exc:
        raise GptcliError(f"{path}: {exc}") from None


def read_model_config(directory: str | Path) -> Any:
    """The model config (the arch's config dataclass) stored in a checkpoint's weights
    metadata, checked as a run's is."""
    return model_config_of(read_metadata(directory), Path(directory) / WEIGHTS)


def model_config_of(metadata: dict[str, str], path: Path) -> Any:
    """The checked model config in the weights metadata of the file at `path` (named in
    errors)."""
    arch = _arch_of(metadata, path)
    try:
        data = json.loads(metadata["model_config"])
    except (KeyError, ValueError) as exc:
        raise GptcliError(f"{path}: unreadable model config ({shorten(str(exc))})") from None
    try:
        cfg = config_from_dict(data, arch.config)
    except GptcliError as exc:
        raise GptcliError(f"{path}: invalid model config: {exc}") from None
    problems = arch.problems(cfg)
    if cfg.vocab_size is None:
        problems.append("model.vocab_size: missing")
    if problems:
        raise GptcliError(f"{path}: invalid model config: {'; '.join(problems)}; the checkpoint is "
                          f"damaged or was not written by gptcli")
    return cfg


_HEADER_LIMIT = 100_000_000  # bytes; safetensors refuses larger headers too


@dataclass(frozen=True)
class WeightsHeader:
    """What a safetensors file's header says, read without its tensors."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]  # every tensor's shape, by name
    problem: str | None  # why the tensors cannot all be read as described (None: the size fits)


def read_weights_header(path: Path) -> WeightsHeader:
    """The metadata and tensor shapes of a safetensors file from its header alone, and
    whether the file is as long as the header says. A truncated file, which `safe_open`
    refuses outright, can so still be described (`gptcli info`). Raises a GptcliError
    when the header itself cannot be read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")  # u64 header length, then the JSON header
            if size < 8 or length > min(size - 8, _HEADER_LIMIT):
                raise ValueError(f"its header length ({length:,} bytes) does not fit the file ({size:,} bytes)")
            header = json.loads(f.read(length))
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("the header is not a JSON object of tensors")
        metadata = header.pop("__metadata__", {})
        shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in header.items()}
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except OSError as exc:
        raise GptcliError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise GptcliError(f"{path} is not a readable safetensors file ({shorten(str(exc), 200)})") from None
    expected = 8 + length + end
    problem = None
    if size < expected:
        problem = f"{path} is truncated: {size:,} bytes where its header describes {expected:,}"
    elif size > expected:
        problem = f"{path} has {size - expected:,} bytes beyond the tensors its header describes"
    return WeightsHeader(metadata, shapes, problem)


def checkpoint_task(directory: str | Path) -> str:
    return read_metadata(directory).get("task", "lm")


def training_config(path: Path) -> FinetuneRunConfig | None:
    """The finetune config saved in a checkpoint, or None when it has none that loads. One
    saved before `finetune.pooling` existed trained on the last token, whatever today's
    default, and says so here."""
    try:
        data = yaml.safe_load((path / CONFIG_YAML).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("finetune"), dict):
            return None
        cfg = config_from_dict(data, FinetuneRunConfig)
    except (OSError, yaml.YAMLError, GptcliError):
        return None
    if "pooling" not in data["finetune"]:
        return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pooling="last"))
    return cfg


def classifier_metadata(pooling: str, reading: TextReading) -> dict[str, str]:
    """The weights-metadata entry of a classifier: how it pools a row's hidden states and
    reads a text longer than its context, in the finetune config's own terms."""
    settings = {"pooling": pooling, "long_text": reading.long_text, "truncate": f"keep_{reading.keep}",
                "pool_stride": reading.stride}
    return {CLASSIFIER: json.dumps(settings)}


def classifier_reading(directory: str | Path) -> tuple[str, TextReading]:
    """(pooling, reading) of a classifier checkpoint: from its weights' metadata; for one
    saved before they were stored there, from the finetune config in its config.yaml; for
    one with neither (an HF import), the last token of one window whose end is kept."""
    stored = read_metadata(directory).get(CLASSIFIER)
    if stored is not None:
        try:
            s = json.loads(stored)
            return s["pooling"], TextReading(s["long_text"], s["truncate"].removeprefix("keep_"), s["pool_stride"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GptcliError(f"{Path(directory) / WEIGHTS}: unreadable classifier settings "
                              f"({shorten(stored)}); the checkpoint is damaged") from None
    training = training_config(Path(directory))
    if training is None:
        return "last", TextReading()
    return training.finetune.pooling, TextReading.from_config(training.finetune)


def build_model(directory: str | Path) -> Model:
    """An untrained model of the checkpoint's family, shape, task head and LoRA adapters."""
    metadata = read_metadata(directory)
    arch = read_arch(directory)
    cfg = read_model_config(directory)
    arch.check_fits(cfg, torch.device("cpu"), training=False,  # built on the CPU, moved afterwards
                    fix=f"{directory} holds a model too large for this machine (or a damaged config)")
    model = arch.model(cfg)
    if metadata.get("task") == "classify":
        pooling, _ = classifier_reading(directory)
        model = GPTClassifier(model, json.loads(metadata["labels"]), pooling=pooling)
    if "lora" in metadata:
        spec = json.loads(metadata["lora"])
        apply_lora(model, LoRASpec(**{**spec, "targets": tuple(spec["targets"])}))
    return model


def load_weights(model: Model, directory: str | Path, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's weights into a model built for it (and on `device`); every weight
    must match."""
    if is_sharded(directory):
        load_model_shards(model, directory)
        return
    path = Path(directory) / WEIGHTS
    try:
        weights = load_file(path, device=str(device))
    except (OSError, SafetensorError) as exc:
        raise GptcliError(f"{path} is unreadable: {exc}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = sorted(set(missing) - _tied_keys(model))
    if missing or unexpected:
        raise GptcliError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def load_model(directory: str | Path, device: torch.device | str = "cpu", verified: bool = False,
               tokenizer: Tokenizer | None = None) -> tuple[Model, Tokenizer]:
    """The model (in eval mode, fp32) and tokenizer of a checkpoint directory, its files
    checked against its manifest first (unless the caller has just done so: `verified`).
    `tokenizer`: the checkpoint's own, when the caller has already read it."""
    directory = Path(directory)
    if not verified:
        verify_checkpoint(directory)
    model = build_model(directory)
    if tokenizer is None:
        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise GptcliError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model "
                          f"expects {model.config.vocab_size}")
    model.to(device)
    load_weights(model, directory, device)
    return model.eval(), tokenizer


def run_of(checkpoint: Path) -> Path:
    """The run directory that holds `checkpoint` (RUN/checkpoints/step-N), or the checkpoint
    itself when no run holds it (an import's `checkpoints/gpt2` is not inside a run)."""
    parent = checkpoint.parent
    if parent.name == CHECKPOINTS and marked_kind(parent.parent) == "run":
        return parent.parent
    return checkpoint


def is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS).is_file()


