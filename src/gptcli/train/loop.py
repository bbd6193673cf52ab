"""The one training loop, shared by pretrain and every finetune task.

A task plugs in through `TrainData` (its batches, its evaluation and the metric that
decides the best checkpoint) and gets: gradient accumulation with
the loss normalised by the number of target tokens of the whole optimizer step, mixed
precision (autocast; loss scaling for fp16), gradient clipping, the LR schedule,
periodic evaluation, early stopping, metrics.jsonl, checkpoints with `latest`/`best`
pointers, and events for a progress display. The host syncs with the device only at log and eval steps.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from torch import nn

from gptcli import atomic
from gptcli.config import TrainConfig
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError, Interrupted
from gptcli.events import CheckpointSaved, EvalDone, EventSink, Notice, StepLogged, ignore
from gptcli.model.gpt import IGNORE_INDEX
from gptcli.runtime import Distributed, Precision, peak_flops, resolve_precision, should_compile
from gptcli.store.checkpoint import (
    CHECKPOINTS,
    CONFIG_YAML,
    LATEST,
    TrainerState,
    save_checkpoint,
    shard_staging,
    step_name,
)
from gptcli.store.launch import launch_ids
from gptcli.store.rundir import RunClaim, prune_checkpoints, read_pointer, write_pointer
from gptcli.store.runlog import RunLog, require_tensorboard, trim_metrics
from gptcli.store.sharded import load_optimizer_shards, save_shards
from gptcli.train.muon import RUN_SETTINGS
from gptcli.train.optim import build_optimizer, lr_at
from gptcli.train.parallel import (
    full_optimizer_state,
    full_state_dict,
    gathered,
    gradient_sync,
    load_optimizer_state,
    shard,
    wrap_for_steps,
)
from gptcli.train.signals import StopRequest

# A batch is the keyword arguments of the model's forward: at least `idx` (B, T) and
# `targets` (IGNORE_INDEX where no loss is taken); the forward returns the summed loss.
Batch = dict[str, torch.Tensor]


class TrainData(Protocol):
    metric: str  # the evaluation key that picks the best checkpoint and drives early stopping
    higher_is_better: bool

    def train_batch(self, step: int, micro: int) -> Batch:
        """The micro-batch `micro` of optimizer step `step` (deterministic)."""

    def validate(self, model: nn.Module, precision: Precision) -> dict:
        """Validation metrics, including `metric`; the same data at every evaluation."""


@dataclass
class _PendingSave:
    """A sharded checkpoint whose shards are being written (by every process, on a thread
    when asynchronous); `_finish_save` completes it."""

    staging: Path
    state: TrainerState  # as it was when the save began
    future: Future | None  # None: written already
    new_best: bool

    @property
    def written(self) -> bool:
        """This process sees the shards all written (on rank 0: every process's)."""
        return self.future is None or self.future.done()


@dataclass
class LoopSetup:
    """What the loop needs besides the model and data; built by pretrain/finetune."""

    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device
    run_dir: Path
    save: Callable[..., Path]  # writes a checkpoint: (state, full weights) or (state, None, shards=staging dir)
    point_to: Callable[[str, Path], None]  # point `latest` / `best` at a checkpoint
    flops_per_token: float
    peak_flops: float  # the device's at the start (MFU's denominator)
    compile: bool = False
    dist: Distributed = Distributed()
    task: str = "pretrain"  # pretrain | classify | lm | instruct: for run.json
    started_at: float = field(default_factory=time.time)  # when the command began: wall time
    patience: int = 0  # stop after this many evaluations without improvement; 0 never stops
    eval_at_start: bool = False  # evaluate before the first step (finetuning: "before" numbers)
    save_group: object = None  # the process group async sharded saves use (under torchrun)
    pending: _PendingSave | None = None  # a sharded checkpoint still being written


def prepare_loop(model: nn.Module, data: TrainData, tokenizer: Tokenizer, cfg: TrainConfig,
                 claim: RunClaim, device: torch.device, state: TrainerState, *, config_yaml: str,
                 dist: Distributed = Distributed(), on_event: EventSink = ignore,
                 checkpoint_metadata: dict[str, str] | None = None, **options) -> LoopSetup:
    """What pretrain and finetune both do between building the model and training it: the
    optimizer (restored when resuming), the precision (a resumed run keeps its own), the
    run directory (an old run is moved aside only now, once every input has been
    validated), and how to save checkpoints."""
    resuming = claim.resume_from is not None
    precision = _run_precision(cfg.precision, device, model, data,
                               state.precision if resuming else None, on_event)
    precision = Precision(dist.from_main(precision.name), precision.device_type)  # timed per rank
    state.precision = precision.name
    if cfg.tensorboard:
        require_tensorboard()
    model.activation_checkpointing = cfg.activation_checkpointing
    if dist.active and cfg.parallel == "fsdp":
        shard(model, precision)  # before the optimizer: it must hold the sharded parameters
    optimizer = build_optimizer(model, cfg, device)
    if state.optimizer is not None:
        _check_same_optimizer(state.optimizer["param_groups"], optimizer, cfg.optimizer)
        restore_moments(optimizer, lambda: load_optimizer_state(optimizer, state.optimizer))
    elif state.optimizer_shards is not None:
        _check_same_optimizer(state.optimizer_groups, optimizer, cfg.optimizer)
        restore_moments(optimizer, lambda: load_optimizer_shards(model, optimizer, state.optimizer_shards))
    # Async saves talk over a process group of their own: the steps' collectives run meanwhile.
    save_group = torch.distributed.new_group(backend="gloo") if cfg.async_checkpoint and dist.active else None
    dist.barrier()  # every rank has checked the run directory before rank 0 changes it
    run_dir = claim.path
    if dist.is_main:
        claim.start()
        try:
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            atomic.write_text(run_dir / CONFIG_YAML, config_yaml)
        except OSError as exc:
            raise GptcliError(f"cannot write to {run_dir} ({exc.strerror or exc}); free disk "
                              f"space or choose a writable out_dir") from None
        if resuming:
            trim_metrics(run_dir, state.step)

    def point_to(name: str, path: Path) -> None:
        write_pointer(run_dir, name, path)
        if name == LATEST:
            claim.saved()  # a resumable new run exists: a replaced old one may go

    return LoopSetup(
        cfg=cfg, optimizer=optimizer, precision=precision, device=device, run_dir=run_dir,
        save=lambda s, weights, shards=None: save_checkpoint(
            run_dir / CHECKPOINTS / step_name(s.step), model, tokenizer, config_yaml, s, weights=weights,
            metadata=checkpoint_metadata, shards=shards),
        save_group=save_group,
        point_to=point_to,
        flops_per_token=model.flops_per_token(), peak_flops=peak_flops(device, precision),
        compile=should_compile(cfg.compile, device), dist=dist, **options,
    )


def _run_precision(setting: str, device: torch.device, model: nn.Module, data: TrainData,
                   resumed: str | None, on_event: EventSink) -> Precision:
    """The precision to train in. A resumed run keeps the one it started with: `auto` is
    not decided again (a CPU timing trial could flip fp32 and bf16 and break exact
    resume); an explicit different one is honoured with a note."""
    if resumed is not None and setting in ("auto", resumed):
        try:
            return resolve_precision(resumed, device)
        except GptcliError as exc:  # e.g. fp16 from a GPU, resumed on a CPU
            on_event(Notice(f"the run trained in {resumed}, which this device cannot use ({exc}); "
                            f"choosing again"))
    elif resumed is not None:
        on_event(Notice(f"the run trained in {resumed}; continuing in {setting} as asked (the "
                        f"losses will not match an uninterrupted run exactly)"))
    return resolve_precision(setting, device, announced(cpu_step_timer(model, data), on_event))


def announced(trial: Callable[[Precision], float], on_event: EventSink) -> Callable[[Precision], float]:
    """`trial`, saying once, before it first runs, why the run has not started yet."""
    said = False

    def run(precision: Precision) -> float:
        nonlocal said
        if not said:
            on_event(Notice("precision auto: timing a training step in fp32 and in bf16 to train in "
                            "the faster (set train.precision to skip this)"))
            said = True
        return trial(precision)

    return run


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Sequences per optimizer step over all processes: what a resume must keep."""
    return cfg.batch_size * cfg.grad_accum * world_size


def check_global_batch(state: TrainerState, cfg: TrainConfig, world_size: int) -> None:
    """Resuming needs the same sequences per step (the data position is re-derived from it)."""
    saved, now = state.global_batch, global_batch(cfg, world_size)
    if saved != now:
        raise GptcliError(f"--resume: the global batch (batch_size x grad_accum x processes) was "
                          f"{saved}, now {now}; keep it the same to resume (e.g. double "
                          f"grad_accum when halving the processes)")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = s
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def cpu_step_timer(model: nn.Module, data: TrainData) -> Callable[[Precision], float]:
    """A trial for `precision: auto` on CPU: seconds per forward+backward of the real model
    on a real batch, in a given precision (the best of 4 after one warm-up)."""
    batch = data.train_batch(0, 0)

    def seconds_per_step(precision: Precision) -> float:
        with torch.random.fork_rng():  # dropout draws must not shift the run's RNG stream
            times = []
            for _ in range(5):
                start = time.perf_counter()
                with precision.autocast():
                    model(**batch).backward()
                times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        return min(times[1:])  # the first call pays one-off set-up costs

    return seconds_per_step


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def train_loop(model: nn.Module, data: TrainData, setup: LoopSetup, state: TrainerState,
               on_event: EventSink) -> TrainerState:
    """Train `model` from `state.step` to `setup.cfg.max_steps`; returns the final state.

    `model` is the plain module (saved as is); a compiled wrapper is used for the steps
    when `setup.compile` is set, falling back to eager if compilation fails. A SIGINT or
    SIGTERM finishes the current step, saves, and raises `Interrupted`. run.json records
    how the session ended, and the step of the last save (`_save` sets `state.step`; a
    save after the last log step would otherwise go uncounted).
    """
    log = RunLog(setup.run_dir, enabled=setup.dist.is_main, tensorboard=setup.cfg.tensorboard,
                 started_at=setup.started_at, first_step=state.step, facts={
                     "task": setup.task, "parameters": model.num_params(), "max_steps": setup.cfg.max_steps,
                     "metric": data.metric, "higher_is_better": data.higher_is_better,
                     "launch": launch_ids()})
    try:
        state = _train(model, data, setup, state, on_event, log)
    except (Interrupted, KeyboardInterrupt):  # a checkpointed stop, or a second Ctrl-C
        log.close("interrupted", step=state.step)
        raise
    except BaseException as exc:
        log.close("failed", f"{type(exc).__name__}: {exc}", step=state.step)
        raise
    log.close("finished", step=state.step)
    return state


def _train(model: nn.Module, data: TrainData, setup: LoopSetup, state: TrainerState,
           on_event: EventSink, log: RunLog) -> TrainerState:
    cfg, opt, precision = setup.cfg, setup.optimizer, setup.precision
    scaler = torch.amp.GradScaler(setup.device.type, enabled=precision.needs_grad_scaler)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    dist = setup.dist
    eager = wrap_for_steps(model, dist, setup.cfg.parallel, setup.device)
    compiled, first_step = setup.compile, state.step  # (a save moves state.step on)
    step_model = torch.compile(eager) if compiled else eager
    model.train()
    def eval_model() -> nn.Module:
        """Evaluation needs no gradient sync: under DDP the plain module (the same weights on
        every rank; under FSDP the sharded module, which every rank runs on the same data),
        otherwise whatever trains (compiled, if it compiled)."""
        return model if dist.active else step_model

    if setup.eval_at_start and state.step == 0:
        record = {"step": 0, **data.validate(eval_model(), precision)}
        state.before = record
        log.append(record)
        on_event(EvalDone({**record, "best": False, "metric": data.metric}))
    interval_start, interval_tokens = time.perf_counter(), 0
    bad_steps = 0  # consecutive steps with a non-finite loss or gradient
    peak, peak_remeasured = setup.peak_flops, False  # the peak may be measured again (CPU)
    with StopRequest() as stop:
        for step in range(state.step, cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:  # Muon's groups at their own height (optim.py)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batches = [data.train_batch(step, micro) for micro in range(cfg.grad_accum)]
            try:
                loss = _forward_backward(step_model, batches, precision, scaler, dist)
            except torch.OutOfMemoryError:
                raise GptcliError(_oom_advice(cfg)) from None
            except Exception as exc:  # compile errors surface at the first call, as many types
                if not compiled or step != first_step:
                    raise
                on_event(Notice(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                f"continuing without compile"))
                opt.zero_grad(set_to_none=True)
                step_model, compiled = eager, False  # still DDP-wrapped under ddp
                loss = _forward_backward(step_model, batches, precision, scaler, dist)
            grad_norm = _clip(model, opt, scaler, cfg.grad_clip)
            pending = setup.pending
            finite, stop_now, written = _agree(loss, grad_norm, stop.signum is not None,
                                               pending is not None and pending.written, dist)
            if written:
                _finish_save(setup, on_event)
            if scaler.is_enabled() or finite:  # the scaler skips bad steps itself
                scaler.step(opt)
                scaler.update()
                bad_steps = 0
            else:
                bad_steps += 1
                on_event(Notice(f"step {step + 1}: non-finite loss or gradient, update skipped "
                                f"({bad_steps} in a row)"))
                if bad_steps >= cfg.max_bad_steps:
                    raise GptcliError(
                        f"the loss was non-finite for {bad_steps} consecutive steps (up to step "
                        f"{step + 1}); no weights were updated by them and the last checkpoint is "
                        f"kept. Lower train.lr, check the data, or use precision fp32")
            opt.zero_grad(set_to_none=True)

            done = step + 1
            step_tokens = sum(b["idx"].numel() for b in batches) * dist.world_size
            state.tokens_seen += step_tokens
            interval_tokens += step_tokens
            last = done == cfg.max_steps
            if done % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - interval_start
                achieved = setup.flops_per_token * interval_tokens / elapsed / dist.world_size  # per device
                if achieved > peak and setup.device.type != "cuda" and not peak_remeasured:
                    # The start-up measurement of a CPU's peak ran while the host was busy:
                    # measure once more, so MFU stays a fraction of the best seen.
                    peak = max(achieved, peak_flops(setup.device, precision, fresh=True))
                    peak_remeasured = True
                record = {
                    "step": done,
                    "loss": dist.all_reduce(loss.detach().clone()).item(),  # the mean over all ranks
                    "lr": lr,
                    "tokens_seen": state.tokens_seen,
                    **_by_source(data, done),
                    **_step_metrics(model, dist),
                    "tokens_per_sec": interval_tokens / elapsed,
                    "mfu": achieved / peak,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                log.append(record)
                on_event(StepLogged(record))
                interval_start, interval_tokens = time.perf_counter(), 0

            paused_at = time.perf_counter()
            new_best = stop_early = False
            if done % cfg.eval_every == 0 or last:
                new_best, stop_early = _validate(eval_model(), data, setup, state, done, on_event, log)
            if done % cfg.save_every == 0 or last or new_best or stop_early or stop_now:
                path = _save(model, state, done, setup, opt, scaler, new_best, on_event)
                if stop_now:
                    _finish_save(setup, on_event)
                    raise Interrupted(stop.signum or signal.SIGTERM, done, str(path))
            interval_start += time.perf_counter() - paused_at  # keep eval and saving out of tokens/s
            if stop_early:
                break
    _finish_save(setup, on_event)
    return state


def restore_moments(optimizer: torch.optim.Optimizer, load: Callable[[], None]) -> None:
    """Load a resumed run's optimizer state (`load` does, from a full or sharded checkpoint),
    keeping the settings the config gives now
    (learning-rate scales, momentum, betas, weight decay): loading would put back the
    saved ones, and a changed setting would be reported but silently not used. Settings
    the run chose for itself (Muon's `ns_dtype`, by the machine's speed) stay as saved, so
    the resumed steps compute what the uninterrupted run would."""
    settings = [{k: v for k, v in group.items() if k not in ("params", *RUN_SETTINGS)}
                for group in optimizer.param_groups]
    load()
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def _check_same_optimizer(saved_groups: list[dict], built: torch.optim.Optimizer, name: str) -> None:
    """A resumed run keeps its optimizer: the saved state must hold the moments of the one
    this run built (`name` is train.optimizer; under it, a LoRA run's optimizer is AdamW)."""
    was, now = _optimizer_kind(saved_groups), _optimizer_kind(built.param_groups)
    if was == now and len(saved_groups) == len(built.param_groups):
        return
    if was != now and was != name:
        raise GptcliError(f"the run was trained with train.optimizer={was}, so it resumes with "
                          f"it (its saved state holds {was}'s moments); set train.optimizer={was} (drop "
                          f"--set train.optimizer={name}), or start a new run")
    raise GptcliError(f"the run's saved optimizer state ({len(saved_groups)} parameter groups of "
                      f"{was}) does not fit the optimizer this version of gptcli builds for it "
                      f"({len(built.param_groups)} of {now}; since LoRA adapters take AdamW under "
                      f"train.optimizer=muon); start a new run")


def _optimizer_kind(param_groups: list[dict]) -> str:
    return "muon" if any("ns_steps" in group for group in param_groups) else "adamw"


def _clip(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm (after unscaling fp16 gradients); return the norm."""
    if max_norm <= 0:
        return None
    scaler.unscale_(opt)
    return gathered(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def _agree(loss: torch.Tensor, grad_norm: torch.Tensor | None, stop_requested: bool, save_written: bool,
           dist: Distributed) -> tuple[bool, bool, bool]:
    """Whether this step may update the weights, whether to stop after it, and whether a
    pending checkpoint is written (rank 0's view, which covers every rank's), agreed by all
    ranks (a signal to one rank stops all). One host sync per step: the price of never
    writing NaN into the model, and so never saving it."""
    bad = ~torch.isfinite(loss)
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm)
    flags = torch.stack([bad.float().cpu(), torch.tensor(float(stop_requested)),
                         torch.tensor(float(save_written and dist.is_main))])
    bad_anywhere, stop_anywhere, written = dist.all_reduce(flags, op="max").tolist()
    return not bad_anywhere, bool(stop_anywhere), bool(written)


def _oom_advice(cfg: TrainConfig) -> str:
    half = max(cfg.batch_size // 2, 1)
    accum = cfg.grad_accum * cfg.batch_size // half
    return (f"CUDA out of memory at train.batch_size={cfg.batch_size}; try --set "
            f"train.batch_size={half} --set train.grad_accum={accum} (the same "
            f"{cfg.batch_size * cfg.grad_accum} sequences per step)")


def _validate(model: nn.Module, data: TrainData, setup: LoopSetup, state: TrainerState,
              done: int, on_event: EventSink, log: RunLog) -> tuple[bool, bool]:
    """Evaluate, update the best metric and patience; return (new best, stop early)."""
    metrics = data.validate(model, setup.precision)  # every rank, same data: same verdict
    new_best = is_better(metrics[data.metric], state.best_metric, data.higher_is_better)
    if new_best:
        state.best_metric = metrics[data.metric]
    state.evals_since_best = 0 if new_best else state.evals_since_best + 1
    stop_early = 0 < setup.patience <= state.evals_since_best
    record = {"step": done, "tokens_seen": state.tokens_seen, **_by_source(data, done), **metrics,
              f"best_{data.metric}": state.best_metric}
    state.last_eval = record
    log.append(record)
    on_event(EvalDone({**record, "best": new_best, "metric": data.metric}))
    if stop_early:
        on_event(Notice(f"early stop: {data.metric} has not improved for "
                        f"{state.evals_since_best} evaluations"))
    return new_best, stop_early


def _by_source(data: TrainData, done: int) -> dict:
    """Data drawn from several sources (a mixture) may report the training tokens each gave
    in steps 0 .. done - 1 (`tokens_by_source(steps)`): logged with `tokens_seen`."""
    counts = getattr(data, "tokens_by_source", None)
    return {"tokens_by_source": counts(done)} if counts is not None else {}


def _save(model: nn.Module, state: TrainerState, done: int, setup: LoopSetup,
          opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, new_best: bool,
          on_event: EventSink) -> Path:
    """Checkpoint after step `done`, move the pointers, prune; a failed write is a clear
    error that leaves the previous checkpoint in place. Full: every rank takes part in
    gathering the whole weights and optimizer state (shards, under fsdp) and rank 0 writes
    them. Sharded: every rank writes its own shards (on a thread, with async_checkpoint:
    the checkpoint is completed at a later step, `_finish_save`). Returns its path."""
    state.step = done
    state.scaler = scaler.state_dict() if scaler.is_enabled() else None
    state.rng = rng_state(setup.device)
    if setup.cfg.checkpoint == "sharded":
        return _start_sharded_save(model, state, setup, opt, new_best, on_event)
    dist = setup.dist
    weights = full_state_dict(model, keep=dist.is_main)
    state.optimizer = full_optimizer_state(opt, keep=dist.is_main)
    path = _publish(setup, done, new_best, on_event, lambda: setup.save(state, weights))
    state.optimizer = None  # a full copy in host memory until the next save would be waste
    return path


def _start_sharded_save(model: nn.Module, state: TrainerState, setup: LoopSetup, opt: torch.optim.Optimizer,
                        new_best: bool, on_event: EventSink) -> Path:
    """Every rank writes its shards into a staging directory rank 0 made; the rest of the
    checkpoint follows once they are written (now, or later when asynchronous)."""
    _finish_save(setup, on_event)  # one save at a time
    dist, target = setup.dist, setup.run_dir / CHECKPOINTS / step_name(state.step)
    staging, problem = None, None
    if dist.is_main:
        try:
            staging = shard_staging(target)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    staging, problem = dist.from_main((staging, problem))
    if problem is not None:
        _save_failed(setup, state.step, problem)
    snapshot = dataclasses.replace(state, optimizer=None, optimizer_groups=opt.state_dict()["param_groups"])
    future = save_shards(staging, model, opt, setup.cfg.async_checkpoint, setup.save_group)
    setup.pending = _PendingSave(staging, snapshot, future, new_best)
    if future is None:
        _finish_save(setup, on_event)
    return target


def _finish_save(setup: LoopSetup, on_event: EventSink) -> None:
    """Complete the pending sharded checkpoint, if there is one (every rank calls this at
    the same step): wait for this rank's shards, then rank 0 writes the rest, moves it into
    place and points `latest` at it."""
    pending, setup.pending = setup.pending, None
    if pending is None:
        return
    if pending.future is not None:
        pending.future.result()
    _publish(setup, pending.state.step, pending.new_best, on_event,
             lambda: setup.save(pending.state, None, shards=pending.staging))


def _publish(setup: LoopSetup, done: int, new_best: bool, on_event: EventSink, write: Callable[[], Path]) -> Path:
    """Rank 0 writes the checkpoint of step `done` (`write`), points `latest` (and `best`)
    at it and prunes; every rank learns whether it could (a failed write stops every rank,
    none waits forever)."""
    dist = setup.dist
    path = setup.run_dir / CHECKPOINTS / step_name(done)
    problem = None
    if dist.is_main:
        try:
            path = write()
            setup.point_to("latest", path)
            if new_best:
                setup.point_to("best", path)
            if setup.cfg.keep_last:
                prune_checkpoints(setup.run_dir, setup.cfg.keep_last)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk its own way
            problem = getattr(exc, "strerror", None) or str(exc)
    problem = dist.from_main(problem)
    if problem is not None:
        _save_failed(setup, done, problem)
    on_event(CheckpointSaved(str(path), done, best=new_best))
    return path


def _save_failed(setup: LoopSetup, done: int, problem: str) -> None:
    previous = read_pointer(setup.run_dir, LATEST) if setup.dist.is_main else None
    then = (f"then continue with --resume (the checkpoint {previous.name} is intact)" if previous
            else "then start again (no checkpoint of this run was saved)")
    raise GptcliError(f"could not save the checkpoint of step {done} in {setup.run_dir} "
                      f"({problem}); free disk space or make the directory writable, {then}")


def _step_metrics(model: nn.Module, dist: Distributed) -> dict[str, float]:
    """What a task's model measured over the steps since the last log (DPO's rewards), if
    it measures anything."""
    step_metrics = getattr(model, "step_metrics", None)
    return step_metrics(dist) if step_metrics is not None else {}


def _forward_backward(model: nn.Module, batches: list[Batch], precision: Precision,
                      scaler: torch.amp.GradScaler, dist: Distributed = Distributed()) -> torch.Tensor:
    """Accumulate gradients over the micro-batches; return this rank's share of the mean
    loss per target (a device tensor: reading it would sync; summed over ranks it is the
    global mean). Each micro-batch's summed loss is divided by the target count of the
    whole step on all ranks, so every target weighs the same however the step is split
    (instruct data: response tokens; classify: examples). DDP averages gradients over
    ranks (so does FSDP's reduce-scatter), hence the factor world_size; they sync only on
    the last micro-batch."""
    total_targets = sum((b["targets"] != IGNORE_INDEX).sum() for b in batches)
    total_targets = dist.all_reduce(total_targets.clone())
    total_loss = torch.zeros((), device=batches[0]["idx"].device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with gradient_sync(model, enabled=last):
            with precision.autocast():
                loss = model(**batch) / total_targets
            scaler.scale(loss * dist.world_size).backward()
        total_loss += loss.detach()
    return total_loss
