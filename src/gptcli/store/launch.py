"""Which launch a training process belongs to, so that a process started again by its
launcher continues its own run by itself: no --resume to remember after a lost worker or a
preemption.

- torchrun (`--max-restarts N`) restarts every worker of the group when one dies. It sets
  TORCHELASTIC_RESTART_COUNT (0 at the first start, then 1, 2, ...) and
  TORCHELASTIC_RUN_ID (its --rdzv-id: a fresh uuid per `--standalone` launch, "none" by
  default on several nodes: pass `--rdzv-id $SLURM_JOB_ID` or any id shared by the nodes).
- Slurm requeues a job (`scontrol requeue`, or a preemption with PreemptMode=REQUEUE)
  under the same SLURM_JOB_ID and counts SLURM_RESTART_COUNT from 1.

run.json records the launch that trained the run last (`launch_ids`). A process started
again (its restart count above 0) whose launcher's id is the recorded one continues that run:
from its latest checkpoint, or from the start if it had saved none. Anything else (a new
launch, a restart of another launch) gets the usual rules: --resume or --overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gptcli.store.runlog import read_run_file

# (launcher, its run id's variable, its restart count's variable)
LAUNCHERS = (("torchrun", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
             ("slurm", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"))
UNNAMED = "none"  # torchrun's --rdzv-id when none is given: shared by every launch, so no id


def launch_ids(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The ids of the launchers this process runs under: {"torchrun": ..., "slurm": ...}."""
    ids = {}
    for launcher, id_variable, _ in LAUNCHERS:
        value = env.get(id_variable, "")
        if value and value != UNNAMED:
            ids[launcher] = value
    return ids


def relaunch_reason(run_dir: Path, env: Mapping[str, str] = os.environ) -> str | None:
    """Why this process continues the run in `run_dir` by itself ("torchrun restarted its
    workers (restart 1)"), or None: it is not a restart, or not of the launch that trained
    the run."""
    recorded = _recorded_launch(run_dir)
    for launcher, id_variable, count_variable in LAUNCHERS:
        restarts = _count(env.get(count_variable))
        own_id = env.get(id_variable, "")
        if restarts > 0 and own_id and own_id != UNNAMED and recorded.get(launcher) == own_id:
            what = "torchrun restarted its workers" if launcher == "torchrun" else f"Slurm requeued job {own_id}"
            return f"{what} (restart {restarts})"
    return None


def _recorded_launch(run_dir: Path) -> dict[str, str]:
    launch = read_run_file(run_dir).get("launch")
    return launch if isinstance(launch, dict) else {}


def _count(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
