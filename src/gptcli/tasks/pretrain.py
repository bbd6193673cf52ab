"""`gptcli pretrain`: build data, model and optimizer from a RunConfig and run the loop.

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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptcli.config import RunConfig, dump_yaml, load_config
from gptcli.data.dataset import BatchSampler, TokenDataset, prepare_dataset
from gptcli.data.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.evals.lm import lm_evaluate
from gptcli.events import EventSink, Notice, RunFinished, RunStarted, ignore
from gptcli.model.gpt import GPT, check_fits
from gptcli.outputs import input_paths
from gptcli.runtime import (
    Distributed,
    Precision,
    configure_matmul,
    init_distributed,
    resolve_device,
    seed_everything,
)
from gptcli.store.checkpoint import (
    CONFIG_YAML,
    TrainerState,
    load_trainer_state,
    load_weights,
    read_metadata,
    read_model_config,
)
from gptcli.store.rundir import RunClaim, claim_run_dir
from gptcli.train.loop import (
    check_global_batch,
    global_batch,
    prepare_loop,
    restore_rng_state,
    train_loop,
)
from gptcli.train.signals import terminate_as_interrupt


class PretrainData:
    """Random windows from the train split (this rank's share of each step's global batch);
    a fixed set of windows from the val split (the same on every rank)."""

    metric = "val_loss"
    higher_is_better = False

    def __init__(self, dataset: TokenDataset, cfg: RunConfig, device: torch.device,
                 dist: Distributed = Distributed()):
        t, block = cfg.train, cfg.model.block_size
        self.rank = dist.rank
        self.train = BatchSampler(dataset.splits["train"], t.batch_size, block, cfg.seed, "train",
                                  device, t.grad_accum, dist.world_size)
        self.val = BatchSampler(dataset.splits["val"], t.batch_size, block, cfg.seed, "val", device)
        self.eval_batches = t.eval_batches
        self.val_bytes_per_token = dataset.bytes_per_token["val"]

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        x, y = self.train.batch(step, micro, self.rank)
        return {"idx": x, "targets": y}

    def evaluate(self, model: GPT, precision: Precision) -> dict[str, float]:
        batches = ({"idx": x, "targets": y} for x, y in map(self.val.batch, range(self.eval_batches)))
        return lm_evaluate(model, batches, precision, self.val_bytes_per_token)


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float | None
    seconds: float


def _check_resume_compatible(cfg: RunConfig, checkpoint: Path, state: TrainerState,
                             tokenizer: Tokenizer, world_size: int, on_event: EventSink) -> None:
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
    check_global_batch(state, cfg.train, world_size)
    before = load_config(checkpoint / CONFIG_YAML).train
    changed = [f"{f.name} {getattr(before, f.name)} -> {getattr(cfg.train, f.name)}"
               for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(cfg.train, f.name)]
    if changed:
        on_event(Notice(f"resuming with changed train settings: {', '.join(changed)}"))


def pretrain(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
             on_event: EventSink = ignore) -> PretrainResult:
    started, started_at = time.perf_counter(), time.time()
    dist, device = init_distributed(resolve_device(cfg.train.device))
    claim = claim_run_dir(cfg.out_dir, resume=resume, overwrite=overwrite, dist=dist,
                          inputs=input_paths([*cfg.data.inputs, cfg.data.tokenizer]), on_event=on_event)
    failed = True
    try:
        with terminate_as_interrupt():
            result = _pretrain(cfg, claim, dist, device, started, started_at, on_event)
        failed = False
    finally:
        claim.close(failed)
    return result


def _pretrain(cfg: RunConfig, claim: RunClaim, dist: Distributed, device: torch.device,
              started: float, started_at: float, on_event: EventSink) -> PretrainResult:
    checkpoint = claim.resume_from
    configure_matmul(device)
    dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed, on_event, dist=dist))
    vocab = dataset.tokenizer.vocab_size
    if cfg.model.vocab_size not in (None, vocab):
        raise GptcliError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer of "
                          f"{dataset.path} has {vocab} ids; remove model.vocab_size or retokenize")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    dataset.check_context(cfg.model.block_size)
    shards = dist.world_size if cfg.train.parallel == "fsdp" else 1
    check_fits(cfg.model, device, training=True, shards=shards,
               fix="shrink model.n_layer, model.n_embd or model.block_size (or shard it over more "
                   "GPUs: train.parallel=fsdp under torchrun)")

    seed_everything(cfg.seed)
    model = GPT(cfg.model).to(device)
    state = TrainerState(step=0, extra={"global_batch": global_batch(cfg.train, dist.world_size)})
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        _check_resume_compatible(cfg, checkpoint, state, dataset.tokenizer, dist.world_size, on_event)
        load_weights(model, checkpoint, device)
    state.extra["val_sha256"] = dataset.val_sha256  # lets `gptcli eval` check it repeats this validation
    data = PretrainData(dataset, cfg, device, dist)
    setup = prepare_loop(model, data, dataset.tokenizer, cfg.train, claim, device, state,
                         config_yaml=dump_yaml(cfg), dist=dist, on_event=on_event,
                         started_at=started_at)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size * cfg.model.block_size
    on_event(RunStarted(str(cfg.out_dir), {
        "parameters": f"{model.num_params() / 1e6:.2f}M",
        "tokenizer": f"{dataset.tokenizer.name} ({vocab} ids)",
        "data": f"{len(dataset.splits['train']):,} train / {len(dataset.splits['val']):,} val tokens",
        "device": dist.describe(device, cfg.train.parallel),
        "precision": setup.precision.name,
        "compile": str(setup.compile).lower(),
        "tokens/step": f"{tokens_per_step:,}",
        "resumed from": f"step {state.step}" if checkpoint is not None else "-",
    }, cfg.train.max_steps, state.step))
    if checkpoint is not None:
        restore_rng_state(state.rng)  # last, so nothing above shifts the dropout stream
    state = train_loop(model, data, setup, state, on_event)
    result = PretrainResult(Path(cfg.out_dir), state.step, state.best_metric, time.perf_counter() - started)
    on_event(RunFinished({"steps": result.steps, "best_val_loss": result.best_val_loss,
                          "seconds": result.seconds}))
    return result
