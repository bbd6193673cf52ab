"""`gptcli finetune`: adapt a checkpoint to a task (classify, lm, instruct), full or LoRA,
through the same training loop as pretrain.

Each task contributes a model (the GPT, or the GPT plus a classification head) and a
`TrainData`; everything else (precision, accumulation, evaluation, early stopping,
checkpoints, resume) is shared.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcli.config import FinetuneRunConfig, ModelConfig, RunConfig, dump_yaml
from gptcli.data.dataset import TokenDataset, prepare_dataset
from gptcli.data.examples import (
    STDLIB_DOCSTRINGS,
    STDLIB_PACKAGES,
    source_name,
    stdlib_docstring_pairs,
    stdlib_package_snippets,
)
from gptcli.data.records import Record, column, read_records
from gptcli.data.tokenizer import Tokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.events import EventSink, RunFinished, RunStarted, ignore
from gptcli.model.gpt import GPT, check_fits
from gptcli.model.heads import GPTClassifier
from gptcli.model.lora import LoRASpec, apply_lora, merge_lora
from gptcli.outputs import input_paths
from gptcli.runtime import (
    Distributed,
    configure_matmul,
    init_distributed,
    resolve_device,
    seed_everything,
)
from gptcli.store.checkpoint import (
    BEST,
    CHECKPOINTS,
    TrainerState,
    checkpoint_task,
    load_model,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from gptcli.store.rundir import (
    RunClaim,
    claim_run_dir,
    find_latest_run,
    resolve_checkpoint,
    write_pointer,
)
from gptcli.tasks.classify import ClassifyData, check_labels
from gptcli.tasks.instruct import CHAT_TOKENS, InstructData, conversations, has_chat_template
from gptcli.tasks.pretrain import PretrainData
from gptcli.train.loop import (
    check_global_batch,
    global_batch,
    prepare_loop,
    restore_rng_state,
    train_loop,
)
from gptcli.train.signals import terminate_as_interrupt

MERGED = "merged"
_MAY_CHANGE = {"dropout", "block_size"}  # model keys a finetune config may set differently


@dataclass
class FinetuneResult:
    run_dir: Path
    task: str
    steps: int
    metric: str
    best_metric: float | None
    before: dict  # validation metrics before training (lm task), else {}
    trainable_params: int
    total_params: int
    seconds: float


def resolve_init(init_from: str) -> Path:
    """The checkpoint to start from; without one, the latest pretrained run under runs/."""
    if init_from:
        return resolve_checkpoint(init_from)
    run = find_latest_run(task="lm")
    if run is None:
        raise GptcliError("no pretrained run found under runs/ to finetune; run "
                          "`gptcli pretrain configs/demo.yaml` first, or set finetune.init_from")
    return resolve_checkpoint(run)


def _model_config(base: ModelConfig, overrides: dict) -> ModelConfig:
    """The checkpoint's model config with the allowed overrides; contradictions are errors."""
    for key, value in overrides.items():
        if key not in _MAY_CHANGE and getattr(base, key) != value:
            raise GptcliError(f"model.{key}: the checkpoint has {getattr(base, key)!r}, the config "
                              f"says {value!r}; remove it (the shape comes from the checkpoint)")
    block = overrides.get("block_size", base.block_size)
    if not 1 <= block <= base.block_size:
        raise GptcliError(f"model.block_size: {block} is beyond the checkpoint's context of "
                          f"{base.block_size} tokens")
    return dataclasses.replace(base, dropout=overrides.get("dropout", base.dropout))


def _split(records: list, cfg: FinetuneRunConfig) -> tuple[list, list]:
    """Hold out finetune.val_fraction of the records (after a seeded shuffle)."""
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_val = max(1, round(len(records) * cfg.finetune.val_fraction))
    if n_val >= len(records):
        raise GptcliError(f"{cfg.finetune.train_file} has {len(records)} records: too few to "
                          f"hold out a validation set; add data or a val_file")
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def _records(cfg: FinetuneRunConfig) -> tuple[list[Record], list[Record], str]:
    """Training and validation records, and what messages call the training data."""
    f = cfg.finetune
    if not f.train_file:
        example = STDLIB_PACKAGES if f.task == "classify" else STDLIB_DOCSTRINGS
        raise GptcliError(f"finetune.train_file: required for --task {f.task} (CSV, TSV or JSONL; "
                          f"or {example} for the built-in example)")
    if f.train_file == STDLIB_PACKAGES:
        train, source = stdlib_package_snippets(seed=cfg.seed), source_name(f.train_file)
    elif f.train_file == STDLIB_DOCSTRINGS:
        train, source = stdlib_docstring_pairs(seed=cfg.seed), source_name(f.train_file)
    else:
        train, source = read_records(f.train_file), f.train_file
    if f.val_file:
        return train, read_records(f.val_file), source
    return (*_split(train, cfg), source)


def _classify(cfg: FinetuneRunConfig, base: GPT, tokenizer: Tokenizer, model_cfg: ModelConfig,
              device: torch.device, dist: Distributed) -> tuple[GPTClassifier, ClassifyData]:
    f = cfg.finetune
    train, val, source = _records(cfg)
    where_val = f.val_file or source
    texts = [str(t) for t in column(train, f.text_column, source, "finetune.text_column")]
    labels = [str(y) for y in column(train, f.label_column, source, "finetune.label_column")]
    val_texts = [str(t) for t in column(val, f.text_column, where_val, "finetune.text_column")]
    val_labels = [str(y) for y in column(val, f.label_column, where_val, "finetune.label_column")]
    names = check_labels(labels, val_labels, source)
    model = GPTClassifier(model_cfg, names, f.aux_lm_weight)
    model.load_state_dict(_trunk_state(base), strict=False)  # the head (`score`) starts fresh
    keep = "start" if f.truncate == "keep_start" else "end"
    data = ClassifyData(tokenizer, names, (texts, labels), (val_texts, val_labels),
                        model_cfg.block_size, cfg.train.batch_size, keep, cfg.seed, device,
                        cfg.train.grad_accum, dist)
    return model, data


def _trunk_state(model: GPT) -> dict[str, torch.Tensor]:
    """The weights every GPT-shaped model shares (no task head)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}


def _lm(cfg: FinetuneRunConfig, base: GPT, tokenizer: Tokenizer, model_cfg: ModelConfig,
        device: torch.device, dist: Distributed, on_event: EventSink) -> tuple[GPT, PretrainData]:
    if not cfg.data.inputs:
        raise GptcliError("data.inputs: name the new-domain text for --task lm")
    dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed, on_event, tokenizer=tokenizer, dist=dist))
    dataset.check_context(model_cfg.block_size)
    model = GPT(model_cfg)
    model.load_state_dict(_trunk_state(base), strict=False)
    view = RunConfig(seed=cfg.seed, data=cfg.data, train=cfg.train, model=model_cfg)
    return model, PretrainData(dataset, view, device, dist)


def _instruct(cfg: FinetuneRunConfig, base: GPT, tokenizer: Tokenizer, model_cfg: ModelConfig,
              device: torch.device, dist: Distributed, on_event: EventSink
              ) -> tuple[GPT, InstructData, Tokenizer]:
    f = cfg.finetune
    train, val, source = _records(cfg)
    train_conversations = conversations(train, source)
    val_conversations = conversations(val, f.val_file or source)
    if not has_chat_template(tokenizer):
        tokenizer = WithAddedTokens(tokenizer, CHAT_TOKENS)
    model = GPT(model_cfg)
    model.load_state_dict(_trunk_state(base), strict=False)
    model.resize_vocab(tokenizer.vocab_size)
    data = InstructData(tokenizer, train_conversations, val_conversations, model_cfg.block_size,
                        cfg.train.batch_size, f.pack, cfg.seed, device, cfg.train.grad_accum, dist,
                        too_long=f.too_long, on_event=on_event)
    return model, data, tokenizer


def freeze(model: GPT, embeddings: bool, blocks: int) -> None:
    if blocks > len(model.h):
        raise GptcliError(f"finetune.freeze.blocks: {blocks} is more than the model's {len(model.h)} blocks")
    frozen = [model.wte, model.wpe] if embeddings else []
    for module in frozen + list(model.h[:blocks]):
        module.requires_grad_(False)


def _adapt(model: GPT, cfg: FinetuneRunConfig) -> None:
    """Freeze what the config says; with LoRA, only adapters and the task head train."""
    f = cfg.finetune
    freeze(model, f.freeze.embeddings, f.freeze.blocks)
    if f.lora.rank > 0:
        model.requires_grad_(False)
        wrapped = apply_lora(model, LoRASpec(f.lora.rank, f.lora.alpha, f.lora.dropout,
                                             tuple(f.lora.targets)))
        if wrapped == 0:
            raise GptcliError(f"finetune.lora.targets: {f.lora.targets} match no linear layer")
        if isinstance(model, GPTClassifier):
            model.score.requires_grad_(True)


def finetune(cfg: FinetuneRunConfig, resume: bool = False, overwrite: bool = False,
             on_event: EventSink = ignore) -> FinetuneResult:
    started, started_at = time.perf_counter(), time.time()
    f = cfg.finetune
    dist, device = init_distributed(resolve_device(cfg.train.device))
    init = resolve_init(f.init_from)
    files = [name for name in (f.train_file, f.val_file) if name not in (STDLIB_PACKAGES, STDLIB_DOCSTRINGS)]
    claim = claim_run_dir(cfg.out_dir, resume=resume, overwrite=overwrite, dist=dist, on_event=on_event,
                          inputs=input_paths([init, *files, *cfg.data.inputs]))
    failed = True
    try:
        with terminate_as_interrupt():
            result = _finetune(cfg, claim, init, dist, device, started, started_at, on_event)
        failed = False
    finally:
        claim.close(failed)
    return result


def _finetune(cfg: FinetuneRunConfig, claim: RunClaim, init: Path, dist: Distributed,
              device: torch.device, started: float, started_at: float,
              on_event: EventSink) -> FinetuneResult:
    f = cfg.finetune
    run_dir, checkpoint = claim.path, claim.resume_from
    if checkpoint is not None and checkpoint_task(checkpoint) != ("classify" if f.task == "classify" else "lm"):
        raise GptcliError(f"--resume: {checkpoint} holds a {checkpoint_task(checkpoint)} model, "
                          f"not one for --task {f.task}")
    configure_matmul(device)
    base, tokenizer = load_model(init, device)
    if base.lora_spec is not None:
        merge_lora(base)  # start from the adapted weights as plain weights
    model_cfg = _model_config(base.config, cfg.model)
    check_fits(model_cfg, device, training=True, shards=dist.world_size if cfg.train.parallel == "fsdp" else 1,
               fix="use LoRA (finetune.lora.rank) or shard it over more GPUs (train.parallel=fsdp under torchrun)")

    seed_everything(cfg.seed)
    if f.task == "classify":
        model, data = _classify(cfg, base, tokenizer, model_cfg, device, dist)
    elif f.task == "lm":
        model, data = _lm(cfg, base, tokenizer, model_cfg, device, dist, on_event)
    else:
        model, data, tokenizer = _instruct(cfg, base, tokenizer, model_cfg, device, dist, on_event)
    del base
    _adapt(model, cfg)
    model.to(device)
    state = TrainerState(step=0, extra={"global_batch": global_batch(cfg.train, dist.world_size)})
    if checkpoint is not None:
        load_weights(model, checkpoint, device)
        state = load_trainer_state(checkpoint)
        check_global_batch(state, cfg.train, dist.world_size)
    setup = prepare_loop(model, data, tokenizer, cfg.train, claim, device, state,
                         config_yaml=dump_yaml(cfg), on_event=on_event, task=f.task, patience=f.patience,
                         eval_at_start=f.task == "lm", dist=dist, started_at=started_at)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.num_params()
    on_event(RunStarted(str(cfg.out_dir), {
        "task": f.task,
        "init from": str(init),
        "parameters": f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        "method": f"LoRA rank {f.lora.rank}" if f.lora.rank else "full finetuning",
        "tokenizer": f"{tokenizer.name} ({tokenizer.vocab_size} ids)",
        "device": dist.describe(device, cfg.train.parallel),
        "precision": setup.precision.name,
        "resumed from": f"step {state.step}" if checkpoint is not None else "-",
    }, cfg.train.max_steps, state.step))
    if checkpoint is not None:
        restore_rng_state(state.rng)
    state = train_loop(model, data, setup, state, on_event)
    if f.lora.rank and f.merge and dist.is_main:
        _save_merged(run_dir, tokenizer, dump_yaml(cfg))
    result = FinetuneResult(Path(cfg.out_dir), f.task, state.step, data.metric, state.best_metric,
                            state.extra.get("before", {}), trainable, total,
                            time.perf_counter() - started)
    on_event(RunFinished({"steps": state.step, data.metric: state.best_metric}))
    return result


def _save_merged(run_dir: Path, tokenizer: Tokenizer, config_yaml: str) -> None:
    """The best checkpoint with its adapters folded in: plain weights for sampling and export."""
    best = resolve_checkpoint(run_dir, prefer=BEST)
    model, _ = load_model(best)
    merge_lora(model)
    target = save_checkpoint(run_dir / CHECKPOINTS / f"{best.name}-{MERGED}", model, tokenizer, config_yaml)
    write_pointer(run_dir, MERGED, target)
