"""One skeleton runs every task: pretrain and each finetune task only build their model,
data and tokenizer; claiming the run directory, distributed setup, resuming, the loop and
the result are the same for all.

    job = Job(task="classify", cfg=..., inputs=[...], build=...)
    result = run_job(job, resume=False, overwrite=False, on_event=display)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gptcli.config import FinetuneRunConfig, RunConfig
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.events import EventSink, RunFinished, RunStarted
from gptcli.runtime import (
    Distributed,
    configure_matmul,
    init_distributed,
    resolve_device,
)
from gptcli.store.checkpoint import TrainerState, load_trainer_state, load_weights
from gptcli.store.rundir import claim_run_dir
from gptcli.train.loop import (
    TrainData,
    check_global_batch,
    global_batch,
    prepare_loop,
    restore_rng_state,
    train_loop,
)
from gptcli.train.signals import terminate_as_interrupt


@dataclass
class Built:
    """What a task hands the loop. `facts` are its lines of the run header; `check_resume`
    refuses a checkpoint the task cannot continue exactly (after the shared checks)."""

    model: nn.Module
    data: TrainData
    tokenizer: Tokenizer
    facts: dict[str, str]
    config_yaml: str
    check_resume: Callable[[Path, TrainerState], None] = lambda checkpoint, state: None
    val_sha256: str | None = None  # pretraining: lets `gptcli eval` repeat the run's validation
    metadata: dict[str, str] = field(default_factory=dict)  # more weights metadata for its checkpoints


@dataclass
class Job:
    """A training run of one task. `build(dist, device, resume_from, on_event)` makes the
    model, data and tokenizer; `finish(run_dir, built)` runs on rank 0 after training."""

    task: str  # pretrain | classify | lm | instruct (recorded in run.json)
    cfg: RunConfig | FinetuneRunConfig
    inputs: list[Path]  # what the run directory may not overlap
    build: Callable[[Distributed, torch.device, Path | None, EventSink], Built]
    patience: int = 0
    eval_at_start: bool = False
    finish: Callable[[Path, Built], None] = lambda run_dir, built: None


@dataclass
class RunResult:
    run_dir: Path
    task: str
    steps: int
    metric: str
    best_metric: float | None
    seconds: float
    before: dict = field(default_factory=dict)  # validation before the first step (lm finetuning)
    trainable_params: int = 0
    total_params: int = 0


def run_job(job: Job, resume: bool, overwrite: bool, on_event: EventSink) -> RunResult:
    """Claim the run directory, build the task, train it, and release the directory: a
    run that fails before training leaves the folder as it was, and a replaced run is put
    back if the new one fails before its first checkpoint (see store/rundir.py)."""
    started, started_at = time.perf_counter(), time.time()
    dist, device = init_distributed(resolve_device(job.cfg.train.device, option="train.device"))
    claim = claim_run_dir(job.cfg.out_dir, resume=resume, overwrite=overwrite, dist=dist,
                          inputs=job.inputs, on_event=on_event)
    failed = True
    try:
        with terminate_as_interrupt():
            configure_matmul(device)
            built = job.build(dist, device, claim.resume_from, on_event)
            state = _trainer_state(job, built, claim.resume_from, dist, device)
            setup = prepare_loop(built.model, built.data, built.tokenizer, job.cfg.train, claim, device,
                                 state, config_yaml=built.config_yaml, dist=dist, on_event=on_event,
                                 checkpoint_metadata=built.metadata,
                                 task=job.task, patience=job.patience, eval_at_start=job.eval_at_start,
                                 started_at=started_at)
            on_event(RunStarted(str(job.cfg.out_dir), {
                **built.facts,
                "device": dist.describe(device, job.cfg.train.parallel),
                "precision": setup.precision.name,
                "compile": str(setup.compile).lower(),
                "resumed from": f"step {state.step}" if claim.resume_from is not None else "-",
            }, job.cfg.train.max_steps, state.step))
            if claim.resume_from is not None:
                restore_rng_state(state.rng)  # last, so nothing above shifts the dropout stream
            state = train_loop(built.model, built.data, setup, state, on_event)
            if dist.is_main:
                job.finish(claim.path, built)
        failed = False
    finally:
        claim.close(failed)
    model = built.model
    result = RunResult(Path(job.cfg.out_dir), job.task, state.step, built.data.metric, state.best_metric,
                       time.perf_counter() - started, state.before or {},
                       sum(p.numel() for p in model.parameters() if p.requires_grad), model.num_params())
    on_event(RunFinished({"steps": result.steps, result.metric: result.best_metric,
                          "seconds": result.seconds}))
    return result


def _trainer_state(job: Job, built: Built, checkpoint: Path | None, dist: Distributed,
                   device: torch.device) -> TrainerState:
    """A fresh state, or the checkpoint's (its weights loaded into the model) once the
    shared and the task's own resume checks pass."""
    batch = global_batch(job.cfg.train, dist.world_size)
    if checkpoint is None:
        return TrainerState(step=0, global_batch=batch, val_sha256=built.val_sha256)
    state = load_trainer_state(checkpoint)
    check_global_batch(state, job.cfg.train, dist.world_size)
    built.check_resume(checkpoint, state)
    load_weights(built.model, checkpoint, device)
    state.val_sha256 = built.val_sha256
    return state

