"""What a run directory says about its run, written by rank 0 as it trains:

    metrics.jsonl   one JSON object per logged step and per evaluation
    run.json        task, size, plan, status (running, finished, interrupted, failed),
                    process, wall time, step; rewritten at every log step and at the
                    end of the session (with the last step done, which may be a later
                    one than the last logged: a Ctrl-C saves the step it finishes)
    tensorboard/    the same scalars for TensorBoard (with `train.tensorboard: true`)

`gptcli runs` and `gptcli plot` read them back.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from gptcli.atomic import write_text
from gptcli.errors import GptcliError
from gptcli.outputs import hidden_below

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
TENSORBOARD_DIR = "tensorboard"
STATUSES = ("running", "finished", "interrupted", "failed")


def require_tensorboard() -> None:
    """Fail early (before a run directory is touched) when TensorBoard is asked for but absent."""
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
    except ImportError:
        raise GptcliError("train.tensorboard: the tensorboard package is not installed; "
                          "pip install 'gptcli[tensorboard]' or set train.tensorboard=false") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl (a half-written last line, from a kill, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def trim_metrics(run_dir: Path, keep_through_step: int) -> None:
    """Drop metrics logged after `keep_through_step` (a resumed run logs them again)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= keep_through_step]
    if (run_dir / METRICS_FILE).is_file():
        write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


def read_run_file(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


class RunLog:
    """Rank 0's writer of metrics.jsonl, run.json and TensorBoard scalars; on other ranks
    (`enabled=False`) every method does nothing. run.json is best effort: a full disk must
    not turn the run's own error (or its success) into a different one."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, facts: dict,
                 started_at: float, first_step: int = 0):
        self.run_dir = run_dir
        self.enabled = enabled
        self.session_started = started_at  # the command's start: setup counts as wall time
        self.writer = None
        if not enabled:
            return
        before = read_run_file(run_dir)
        self.info = {
            **facts,  # task, parameters, max_steps, metric, higher_is_better
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": before.get("started_at", self.session_started),
            "session_started_at": self.session_started,
            "wall_seconds_before": before.get("wall_seconds", 0.0),  # earlier sessions (resumes)
        }
        self._write_run_file()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run logs the steps after its checkpoint again: drop their old events.
            self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=first_step + 1)

    def _write_run_file(self) -> None:
        now = time.time()
        self.info["updated_at"] = now
        self.info["wall_seconds"] = self.info["wall_seconds_before"] + now - self.session_started
        try:  # replaced atomically but not fsynced: a status file, rewritten every log step
            write_text(self.run_dir / RUN_FILE, json.dumps(self.info, indent=1) + "\n", fsync=False)
        except OSError:
            pass

    def append(self, record: dict) -> None:
        """One metrics record (a logged step or an evaluation); refreshes run.json."""
        if not self.enabled:
            return
        try:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise GptcliError(f"could not append to {self.run_dir / METRICS_FILE} ({exc.strerror or exc}); "
                              f"free disk space, then continue with --resume") from None
        self.info["step"] = record["step"]
        if "tokens_seen" in record:
            self.info["tokens_seen"] = record["tokens_seen"]
        self._write_run_file()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self, status: str, error: str | None = None, step: int | None = None) -> None:
        """Record how the session ended: finished, interrupted or failed (with the error),
        and `step`, the last step the run completed (the loop passes the step of its last
        save): run.json is otherwise rewritten only at log steps, and a Ctrl-C between two
        of them saves a later step than the last one logged. The step never goes back."""
        if not self.enabled:
            return
        self.info["status"] = status
        if step is not None:
            self.info["step"] = max(step, self.info.get("step", step))
        if error:
            self.info["error"] = error
        else:
            self.info.pop("error", None)
        self._write_run_file()
        if self.writer is not None:
            self.writer.close()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@dataclass
class RunSummary:
    """One row of `gptcli runs`."""

    path: Path
    task: str
    parameters: int | None
    step: int
    max_steps: int | None
    metric: str | None
    best: float | None
    tokens_seen: int | None
    wall_seconds: float | None
    status: str
    tokens_by_source: dict[str, int] | None = None  # a mixture's training tokens per source


def summarize_run(run_dir: Path) -> RunSummary:
    info = read_run_file(run_dir)
    records = read_metrics(run_dir)
    status = info.get("status", "unknown")
    wall = info.get("wall_seconds")
    if status == "running" and info.get("host") == socket.gethostname():
        if _process_alive(info.get("pid", -1)):
            wall = info["wall_seconds_before"] + time.time() - info["session_started_at"]
        else:
            status = "interrupted"  # killed without a chance to say so; resumable from its last checkpoint
    metric = info.get("metric")
    best_key = f"best_{metric}" if metric else None
    bests = [r[best_key] for r in records if best_key in r and r[best_key] is not None]
    steps = [r["step"] for r in records if "step" in r]
    if isinstance(info.get("step"), int):  # the step of a save after the last logged one
        steps.append(info["step"])
    tokens = [r["tokens_seen"] for r in records if "tokens_seen" in r]
    by_source = [r["tokens_by_source"] for r in records if "tokens_by_source" in r]
    return RunSummary(
        path=run_dir, task=info.get("task", "?"), parameters=info.get("parameters"),
        step=max(steps, default=0), max_steps=info.get("max_steps"), metric=metric,
        best=bests[-1] if bests else None, tokens_seen=tokens[-1] if tokens else None,
        wall_seconds=wall, status=status, tokens_by_source=by_source[-1] if by_source else None,
    )


def find_runs(root: str | Path) -> list[RunSummary]:
    """Every run directory (one holding run.json or metrics.jsonl) under `root`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise GptcliError(f"{root} is not a directory; name the folder that holds your runs "
                          f"(default: runs)")
    dirs = {p.parent for name in (RUN_FILE, METRICS_FILE) for p in root.rglob(name)
            if not hidden_below(p, root)}
    return [summarize_run(d) for d in sorted(dirs)]
