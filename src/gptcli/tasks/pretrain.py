"""`gptcli pretrain`: the data and model a RunConfig describes, trained by tasks/run.py.

Run directory layout:

    OUT_DIR/
      config.yaml            the resolved config (defaults < YAML < --set, vocab filled in)
      metrics.jsonl          one JSON object per logged step and per evaluation
      checkpoints/
        step-000250/ ...     see checkpoint.py
        latest, best         text files naming a checkpoint directory
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from gptcli.config import RunConfig, dump_yaml, load_config
from gptcli.data.training.dataset import BatchSampler, TokenDataset, prepare_dataset
from gptcli.data.training.mixture import Mixture, MixtureSampler, Weights
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.evals.run_tasks import EvalTasks
from gptcli.evals.lm import mixture_validation, validation_loss
from gptcli.events import EventSink, Notice, ignore
from gptcli.model import Model, get_arch
from gptcli.outputs import input_paths
from gptcli.runtime import Distributed, Precision, seed_everything
from gptcli.store.checkpoint import CONFIG_YAML, read_metadata, read_model_config
from gptcli.tasks.run import Built, Job, RunResult, run_job


class PretrainData:
    """Random windows from the train split (this rank's share of each step's global batch);
    a fixed set of windows from the val split (the same on every rank), and the
    multiple-choice tasks of train.eval_tasks at every evaluation."""

    metric = "val_loss"
    higher_is_better = False

    def __init__(self, dataset: TokenDataset, cfg: RunConfig, device: torch.device,
                 dist: Distributed = Distributed()):
        t, block = cfg.train, cfg.model.block_size
        self.rank = dist.rank
        self.tasks = EvalTasks(t.eval_tasks, dataset.tokenizer)
        self.train = BatchSampler(dataset.splits["train"], t.batch_size, block, cfg.seed, "train",
                                  device, t.grad_accum, dist.world_size)
        self.val = BatchSampler(dataset.splits["val"], t.batch_size, block, cfg.seed, "val", device)
        self.eval_batches = t.eval_batches
        self.val_bytes_per_token = dataset.bytes_per_token["val"]

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        x, y = self.train.batch(step, micro, self.rank)
        return {"idx": x, "targets": y}

    def validate(self, model: Model, precision: Precision) -> dict[str, float]:
        tasks = self.tasks.scores(model, precision)  # first: under fsdp, before any forward gathers weights
        batches = ({"idx": x, "targets": y} for x, y in map(self.val.batch, range(self.eval_batches)))
        return {**validation_loss(model, batches, precision, self.val_bytes_per_token), **tasks}


class MixtureData:
    """A weighted mixture's training windows (data/training/mixture.py: each row's source and start a
    pure function of seed and step); validation on every source's val split, combined by
    the weights. Reports the training tokens each source has contributed."""

    metric = "val_loss"
    higher_is_better = False

    def __init__(self, mixture: Mixture, cfg: RunConfig, device: torch.device,
                 dist: Distributed = Distributed()):
        t = cfg.train
        self.rank, self.mixture, self.cfg, self.device = dist.rank, mixture, cfg, device
        self.tasks = EvalTasks(t.eval_tasks, mixture.tokenizer)
        self.train = MixtureSampler(mixture, t.batch_size, cfg.model.block_size, cfg.seed, device,
                                    t.grad_accum, dist.world_size)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        x, y = self.train.batch(step, micro, self.rank)
        return {"idx": x, "targets": y}

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        return self.train.tokens_by_source(steps)

    def validate(self, model: Model, precision: Precision) -> dict[str, float]:
        tasks = self.tasks.scores(model, precision)  # first, as above
        return {**mixture_validation(model, self.mixture, self.cfg, precision, self.device), **tasks}


def _check_resume_compatible(cfg: RunConfig, checkpoint: Path, tokenizer: Tokenizer,
                             on_event: EventSink) -> None:
    """Refuse changes that would break an exact continuation; note the harmless ones."""
    saved = read_model_config(checkpoint)
    if dataclasses.asdict(saved) != dataclasses.asdict(cfg.model):
        changed = [k for k, v in dataclasses.asdict(cfg.model).items() if getattr(saved, k) != v]
        raise GptcliError(f"--resume: model settings differ from the checkpoint ({', '.join(changed)}); "
                          f"resume with the original values or start a new run with --overwrite")
    metadata = read_metadata(checkpoint)
    if metadata.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        saved = json.loads(metadata["tokenizer"])["name"]
        raise GptcliError(f"--resume: the data's tokenizer ({tokenizer.name}) is not the checkpoint's "
                          f"({saved}, a different vocabulary); resume with the original data")
    before_cfg = load_config(checkpoint / CONFIG_YAML)
    mixture = [Weights.of(c.data.inputs) if c.data.is_mixture else None for c in (before_cfg, cfg)]
    if mixture[0] != mixture[1]:  # tokens per source are re-derived from the draws: keep them
        raise GptcliError("--resume: the mixture in data.inputs (source names and weights) differs "
                          "from the checkpoint's; resume with the original ones or start a new run")
    before = before_cfg.train
    changed = [f"{f.name} {getattr(before, f.name)} -> {getattr(cfg.train, f.name)}"
               for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(cfg.train, f.name)]
    if changed:
        on_event(Notice(f"resuming with changed train settings: {', '.join(changed)}"))


def pretrain(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
             on_event: EventSink = ignore) -> RunResult:
    """`gptcli pretrain`: train a GPT from scratch on `cfg.data` (see tasks/run.py)."""
    job = Job(task="pretrain", cfg=cfg, inputs=input_paths([*cfg.data.paths(), cfg.data.tokenizer]),
              build=lambda dist, device, resume_from, on_event: build_pretrain(cfg, dist, device, on_event))
    return run_job(job, resume, overwrite, on_event)


def build_pretrain(cfg: RunConfig, dist: Distributed, device: torch.device, on_event: EventSink) -> Built:
    """The tokenized data (made once into the cache from raw text), and a fresh model of the
    family model.arch names, sized by the config with the tokenizer's vocabulary."""
    if cfg.data.is_mixture:
        dataset = Mixture.open(cfg.data, cfg.seed, on_event, dist)
    else:
        dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed, on_event, dist=dist))
    vocab = dataset.tokenizer.vocab_size
    if cfg.model.vocab_size not in (None, vocab):
        where = "the data" if cfg.data.is_mixture else dataset.path
        raise GptcliError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer of "
                          f"{where} has {vocab} ids; remove model.vocab_size or retokenize")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    dataset.check_context(cfg.model.block_size)
    shards = dist.world_size if cfg.train.parallel == "fsdp" else 1
    arch = get_arch(cfg.model.arch)  # the family model.arch names (gptcli/families/)
    arch.check_fits(cfg.model, device, training=True, shards=shards,
                    fix="shrink model.n_layer, model.n_embd or model.block_size (or shard it over more "
                        "GPUs: train.parallel=fsdp under torchrun)")
    seed_everything(cfg.seed)
    model = arch.model(cfg.model).to(device)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size * cfg.model.block_size
    return Built(
        model=model, tokenizer=dataset.tokenizer,
        data=(MixtureData if cfg.data.is_mixture else PretrainData)(dataset, cfg, device, dist),
        config_yaml=dump_yaml(cfg), val_sha256=dataset.val_sha256,
        check_resume=lambda checkpoint, state: _check_resume_compatible(cfg, checkpoint, dataset.tokenizer,
                                                                        on_event),
        facts={
            "parameters": f"{model.num_params() / 1e6:.2f}M",
            "tokenizer": f"{dataset.tokenizer.name} ({vocab} ids)",
            "data": (dataset.describe() if cfg.data.is_mixture else
                     f"{len(dataset.splits['train']):,} train / {len(dataset.splits['val']):,} val tokens"),
            "tokens/step": f"{tokens_per_step:,}",
        })
