"""`gptcli finetune`: adapt a checkpoint to a task (classify, lm, instruct, dpo, grpo), full or LoRA.

Each task (TASKS) turns the base model into its model (the trunk, or the trunk under a
classification head, or a preference or policy-gradient loss) and its `TrainData`; tasks/run.py does everything else (precision,
accumulation, evaluation, early stopping, checkpoints, resume) as for pretraining.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gptcli.config import (
    FINETUNE_MAY_CHANGE,
    FinetuneModelConfig,
    FinetuneRunConfig,
    ModelConfig,
    RunConfig,
    dump_yaml,
)
from gptcli.data.tokenizers.chat_format import CHAT_TOKENS, is_chat_model
from gptcli.data.training.dataset import TokenDataset, prepare_dataset
from gptcli.data.training.examples import STDLIB_PACKAGES, finetune_records, labelled_splits
from gptcli.data.training.labelled import TextReading
from gptcli.data.tokenizers.tokenizer import Tokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.events import EventSink, ignore
from gptcli.infer.load import checkpoint_kind
from gptcli.model import Model, get_arch
from gptcli.model.heads import GPTClassifier, Reference
from gptcli.model.lora import LoRASpec, apply_lora, merge_lora
from gptcli.outputs import input_paths
from gptcli.runtime import Distributed, seed_everything
from gptcli.store.checkpoint import (
    BEST,
    CHECKPOINTS,
    classifier_metadata,
    load_model,
    save_checkpoint,
)
from gptcli.store.rundir import find_latest_run, resolve_checkpoint, write_pointer
from gptcli.tasks.classify import ClassifyData, check_labels
from gptcli.tasks.dpo import PreferenceData, PreferenceModel, read_pairs, settings_of
from gptcli.tasks.grpo import PolicyModel, RolloutData, RolloutStats, Scorer, policy_settings
from gptcli.tasks.instruct import InstructData, conversations
from gptcli.tasks.pretrain import PretrainData
from gptcli.tasks.run import Built, Job, RunResult, run_job

MERGED = "merged"
_MAY_CHANGE = set(FINETUNE_MAY_CHANGE)  # what a finetune may set unlike its checkpoint


def builtin_example(task: str | None) -> list[str]:
    """The config overrides of `gptcli finetune` without a config: for classify, the
    built-in example (stdlib snippets -> their package) on the latest pretrained run. Other
    tasks have no built-in data: theirs comes from `--set` like any config value, and
    the config's own checks name what is missing (and an unknown task)."""
    if task not in (None, "classify"):
        return []
    # The settings of configs/finetune-classify.yaml (a test keeps the two equal), which
    # BENCHMARKS.md measured: whole snippets pooled in windows, the auxiliary LM loss, Muon,
    # no dropout.
    return [f"finetune.train_file={STDLIB_PACKAGES}", "out_dir=runs/classify-stdlib", "finetune.long_text=pool",
            "finetune.aux_lm_weight=0.25", "model.dropout=0.0", "train.optimizer=muon", "train.batch_size=32", "train.lr=1e-3",
            "train.min_lr=1e-4"]


def resolve_init(init_from: str) -> Path:
    """The checkpoint to start from; without one, the latest pretrained run under runs/."""
    if init_from:
        return resolve_checkpoint(init_from)
    run = find_latest_run(task="lm")
    if run is None:
        raise GptcliError("no pretrained run found under runs/ to finetune; run "
                          "`gptcli pretrain configs/demo.yaml` first, or set finetune.init_from")
    return resolve_checkpoint(run)


def _model_config(base: ModelConfig, section: FinetuneModelConfig) -> ModelConfig:
    """The checkpoint's model config with the section's dropout and (shorter) context; any
    other key must agree with the checkpoint. All contradictions are reported at once."""
    given = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
             if getattr(section, f.name) is not None}
    problems = [f"model.{key}: the checkpoint has {getattr(base, key)!r}, the config says {value!r}"
                for key, value in given.items() if key not in _MAY_CHANGE and getattr(base, key) != value]
    block = given.get("block_size", base.block_size)
    if block > base.block_size:
        problems.append(f"model.block_size: {block} is beyond the checkpoint's context of "
                        f"{base.block_size} tokens")
    if problems:
        raise GptcliError("; ".join(problems) + " (the shape comes from the checkpoint: remove those keys)")
    return dataclasses.replace(base, dropout=given.get("dropout", base.dropout), block_size=block)


def _classify(cfg: FinetuneRunConfig, base: Model, tokenizer: Tokenizer, model_cfg: ModelConfig,
              device: torch.device, dist: Distributed, on_event: EventSink
              ) -> tuple[GPTClassifier, ClassifyData, Tokenizer]:
    f = cfg.finetune
    splits = labelled_splits(cfg)
    names = check_labels(splits.train[1], splits.val[1], splits.train_source)
    if f.pool_stride > model_cfg.block_size:
        raise GptcliError(f"finetune.pool_stride: {f.pool_stride} is beyond the {model_cfg.block_size}-token "
                          f"context, so windows would skip text; set it to at most {model_cfg.block_size}")
    reading = TextReading.from_config(f)
    model = GPTClassifier(get_arch(base.arch).model(model_cfg), names, f.aux_lm_weight, f.pooling)
    model.load_state_dict(_trunk_state(base), strict=False)  # the head (`score`) starts fresh
    data = ClassifyData(tokenizer, names, splits.train, splits.val, model_cfg.block_size, cfg.train.batch_size,
                        reading, cfg.seed, device, cfg.train.grad_accum, dist)
    return model, data, tokenizer


def _trunk_state(model: Model) -> dict[str, torch.Tensor]:
    """The trunk weights every task model starts from (a classifier's head starts fresh)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}


def _trunk(base: Model, model_cfg: ModelConfig) -> Model:
    """A language model of `model_cfg` holding the base's trunk weights."""
    model = get_arch(base.arch).model(model_cfg)
    model.load_state_dict(_trunk_state(base), strict=False)
    return model


def _lm(cfg: FinetuneRunConfig, base: Model, tokenizer: Tokenizer, model_cfg: ModelConfig,
        device: torch.device, dist: Distributed, on_event: EventSink
        ) -> tuple[Model, PretrainData, Tokenizer]:
    if not cfg.data.inputs:
        raise GptcliError("data.inputs: name the new-domain text for --task lm")
    dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed, on_event, tokenizer=tokenizer, dist=dist))
    dataset.check_context(model_cfg.block_size)
    model = _trunk(base, model_cfg)
    view = RunConfig(seed=cfg.seed, data=cfg.data, train=cfg.train, model=model_cfg)
    return model, PretrainData(dataset, view, device, dist), tokenizer


def _instruct(cfg: FinetuneRunConfig, base: Model, tokenizer: Tokenizer, model_cfg: ModelConfig,
              device: torch.device, dist: Distributed, on_event: EventSink
              ) -> tuple[Model, InstructData, Tokenizer]:
    f = cfg.finetune
    train, val, source = finetune_records(cfg)
    train_conversations = conversations(train, source)
    val_conversations = conversations(val, f.val_file or source)
    if not is_chat_model(tokenizer):  # a base model learns gptcli's chat tokens; a chat model keeps its own
        tokenizer = WithAddedTokens(tokenizer, CHAT_TOKENS)
    model = _trunk(base, model_cfg)
    model.resize_vocab(tokenizer.vocab_size)
    data = InstructData(tokenizer, train_conversations, val_conversations, model_cfg.block_size,
                        cfg.train.batch_size, f.pack, cfg.seed, device, cfg.train.grad_accum, dist,
                        too_long=f.too_long, on_event=on_event, eval_tasks=cfg.train.eval_tasks)
    return model, data, tokenizer


def _dpo(cfg: FinetuneRunConfig, base: Model, tokenizer: Tokenizer, model_cfg: ModelConfig,
         device: torch.device, dist: Distributed, on_event: EventSink
         ) -> tuple[PreferenceModel, PreferenceData, Tokenizer]:
    f = cfg.finetune
    train, val, source = finetune_records(cfg)
    trunk = _trunk(base, model_cfg)
    settings = settings_of(f.dpo)
    live = f.dpo.reference == "live"
    data = PreferenceData(tokenizer, read_pairs(train, source, tokenizer), read_pairs(val, f.val_file or source, tokenizer),
                          trunk, settings, model_cfg.block_size, cfg.train.batch_size, cfg.seed, device,
                          cfg.train.grad_accum, dist, too_long=f.too_long, on_event=on_event,
                          eval_tasks=cfg.train.eval_tasks, precompute=not live)
    reference = Reference(trunk, lora=f.lora.rank > 0) if live and settings.needs_reference else None
    return PreferenceModel(trunk, settings, reference), data, tokenizer


def _grpo(cfg: FinetuneRunConfig, base: Model, tokenizer: Tokenizer, model_cfg: ModelConfig,
          device: torch.device, dist: Distributed, on_event: EventSink
          ) -> tuple[PolicyModel, RolloutData, Tokenizer]:
    f = cfg.finetune
    train, val, source = finetune_records(cfg)
    trunk = _trunk(base, model_cfg)
    scorer = Scorer(f.grpo.rewards, f.grpo.max_new_tokens)
    stats = RolloutStats(tuple(term.label for term in scorer.terms))
    data = RolloutData(trunk, tokenizer, train, val, source, f.val_file or source, f.grpo, scorer, stats,
                       cfg.train.batch_size, cfg.seed, device, cfg.train.grad_accum, dist, too_long=f.too_long,
                       lora=f.lora.rank > 0, on_event=on_event, eval_tasks=cfg.train.eval_tasks)
    return PolicyModel(trunk, policy_settings(f.grpo), stats), data, tokenizer


# Each task turns the base model into its own model and data: (model, data, tokenizer).
TASKS = {"classify": _classify, "lm": _lm, "instruct": _instruct, "dpo": _dpo, "grpo": _grpo}


def freeze(model: Model, embeddings: bool, blocks: int) -> None:
    if blocks > len(model.blocks):
        raise GptcliError(f"finetune.freeze.blocks: {blocks} is more than the model's "
                          f"{len(model.blocks)} blocks")
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)] if embeddings else []
    for module in frozen + list(model.blocks[:blocks]):
        module.requires_grad_(False)


def _adapt(model: Model, cfg: FinetuneRunConfig) -> None:
    """Freeze what the config says; with LoRA, only adapters and the task head train."""
    f = cfg.finetune
    freeze(model, f.freeze.embeddings, f.freeze.blocks)
    if f.lora.rank > 0:
        model.requires_grad_(False)
        wrapped = apply_lora(model, LoRASpec(f.lora.rank, f.lora.alpha, f.lora.dropout,
                                             tuple(f.lora.targets)))
        if wrapped == 0:
            raise GptcliError(f"finetune.lora.targets: {f.lora.targets} match no linear layer")
        if f.task == "classify":
            model.score.requires_grad_(True)


def finetune(cfg: FinetuneRunConfig, resume: bool = False, overwrite: bool = False,
             on_event: EventSink = ignore) -> RunResult:
    """`gptcli finetune`: adapt a checkpoint to `cfg.finetune.task` (see tasks/run.py)."""
    f = cfg.finetune
    init = resolve_init(f.init_from)
    # input_paths skips names that are not on disk, such as the built-in examples'.
    job = Job(task=f.task, cfg=cfg, inputs=input_paths([init, f.train_file, f.val_file, *cfg.data.inputs]),
              build=lambda dist, device, resume_from, on_event: build_finetune(cfg, init, dist, device,
                                                                               on_event),
              patience=f.patience, eval_at_start=f.task in ("lm", "dpo", "grpo"),
              finish=lambda run_dir, built: _save_merged(run_dir, built) if f.lora.rank and f.merge else None)
    return run_job(job, resume, overwrite, on_event)


def build_finetune(cfg: FinetuneRunConfig, init: Path, dist: Distributed, device: torch.device,
                   on_event: EventSink) -> Built:
    """The checkpoint `init` (LoRA adapters merged) turned into the task's model, with its data,
    frozen parts and adapters."""
    f = cfg.finetune
    base, tokenizer = load_model(init, device)
    if base.lora_spec is not None:
        merge_lora(base)  # start from the adapted weights as plain weights
    model_cfg = _model_config(base.config, cfg.model)
    if model_cfg.block_size < base.config.block_size:
        base.crop_context(model_cfg.block_size)
    get_arch(base.arch).check_fits(model_cfg, device, training=True, shards=dist.world_size if cfg.train.parallel == "fsdp" else 1,
               fix="use LoRA (finetune.lora.rank) or shard it over more GPUs (train.parallel=fsdp under torchrun)")
    seed_everything(cfg.seed)
    model, data, tokenizer = TASKS[f.task](cfg, base, tokenizer, model_cfg, device, dist, on_event)
    del base
    _adapt(model, cfg)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.num_params()
    metadata = classifier_metadata(f.pooling, TextReading.from_config(f)) if f.task == "classify" else {}
    return Built(model=model, data=data, tokenizer=tokenizer, config_yaml=dump_yaml(cfg), metadata=metadata,
                 check_resume=lambda checkpoint, state: _check_resume_task(checkpoint, f.task),
                 facts={
                     "task": f.task,
                     "init from": str(init),
                     "parameters": f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
                     "method": f"LoRA rank {f.lora.rank}" if f.lora.rank else "full finetuning",
                     "tokenizer": f"{tokenizer.name} ({tokenizer.vocab_size} ids)",
                 })


def _check_resume_task(checkpoint: Path, task: str) -> None:
    """A run resumes only as the task it trains: a classifier is not continued as an LM."""
    held = "classifier" if checkpoint_kind(checkpoint) == "classifier" else "lm"
    if held != ("classifier" if task == "classify" else "lm"):
        raise GptcliError(f"--resume: {checkpoint} holds a {held} model, "
                          f"not one for --task {task}")


def _save_merged(run_dir: Path, built: Built) -> None:
    """The best checkpoint with its adapters folded in: plain weights for sampling and export."""
    best = resolve_checkpoint(run_dir, prefer=BEST)
    model, _ = load_model(best)
    merge_lora(model)
    target = save_checkpoint(run_dir / CHECKPOINTS / f"{best.name}-{MERGED}", model, built.tokenizer,
                             built.config_yaml, metadata=built.metadata)
    write_pointer(run_dir, MERGED, target)
