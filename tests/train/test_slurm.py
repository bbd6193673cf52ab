"""examples/slurm/train.sbatch on a real one-machine Slurm (Debian's slurm-wlm, munge): a job
of two processes trains and finishes; a job told to stop ahead of its time limit (SIGUSR1 to
the batch script, as `--signal=B:USR1@120` sends) saves, requeues itself, and the requeued
job continues the run by itself to the losses of a job never stopped.

Opt-in (GPTCLI_SLURM_TEST=1): the set-up installs slurm-wlm and munge with apt-get when they
are missing, writes a one-node slurm.conf and starts munged, slurmctld and slurmd, all as
root; anywhere that cannot be done the tests skip, saying why. About 3 minutes.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import step_losses as losses
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.skipif(os.environ.get("GPTCLI_SLURM_TEST") != "1",
                       reason="opt-in: set GPTCLI_SLURM_TEST=1 to install and start a one-machine Slurm (root)"),
    pytest.mark.slow,
]


def run(*command, check=True, **kwargs):
    return subprocess.run(command, check=check, capture_output=True, text=True, **kwargs)


def slurm_conf(host: str, cpus: int, state: Path) -> str:
    return "\n".join([
        "ClusterName=gptcli-test", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "ReturnToService=2", "JobRequeue=1", f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/d",
        f"SlurmctldPidFile={state}/ctld.pid", f"SlurmdPidFile={state}/d.pid",
        f"SlurmctldLogFile={state}/ctld.log", f"SlurmdLogFile={state}/d.log",
        f"NodeName={host} CPUs={cpus} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on this machine, stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd needs root")
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
        installed = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                                   "slurm-wlm munge", shell=True, capture_output=True, text=True)
        if installed.returncode != 0:
            pytest.skip(f"could not install slurm-wlm: {installed.stderr[-300:]}")
    host = socket.gethostname()
    state = tmp_path_factory.mktemp("slurm-state")
    (state / "ctld").mkdir()
    (state / "d").mkdir()
    conf = Path("/etc/slurm/slurm.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(slurm_conf(host, os.cpu_count() or 2, state))
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    run("su", "-s", "/bin/sh", "munge", "-c", "munged --force", check=False)
    run("slurmctld")
    run("slurmd")
    deadline = time.time() + 60
    while time.time() < deadline:
        if "idle" in run("sinfo", "-h", "-o", "%t", check=False).stdout:
            break
        time.sleep(1)
    else:
        pytest.skip(f"slurmd did not come up: {(state / 'd.log').read_text()[-500:] if (state / 'd.log').exists() else ''}")
    yield state
    run("scontrol", "shutdown", check=False)


def submit(cwd: Path, *args: str) -> str:
    done = run("sbatch", "--parsable", "--nodes", "1", str(SBATCH), *args, cwd=cwd,
               env={**os.environ, "GPTCLI_NPROC_PER_NODE": "2", "GPTCLI_RDZV_PORT": str(free_port())})
    return done.stdout.strip().split(";")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_state(job: str) -> str:
    return run("scontrol", "show", "job", job, check=False).stdout


def wait_until_done(job: str) -> str:
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:
        shown = job_state(job)
        if "JobState=COMPLETED" in shown or "JobState=FAILED" in shown or "JobState=CANCELLED" in shown:
            return shown
        time.sleep(1)
    raise AssertionError(f"job {job} did not end: {job_state(job)}")


def config(tmp_path: Path, corpus_dir, name: str, steps: int) -> Path:
    cfg = tiny_config([str(corpus_dir)], str(tmp_path / name), max_steps=steps, log_every=1, save_every=10,
                      eval_every=steps, lr_decay_steps=steps)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_a_two_process_job_trains_to_the_end(slurm, tmp_path, corpus_dir):
    job = submit(tmp_path, "pretrain", str(config(tmp_path, corpus_dir, "run", 20)))
    shown = wait_until_done(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "JobState=COMPLETED" in shown, log[-3000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 21))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    assert "2 processes (ddp)" in log


def test_a_job_stopped_before_its_time_limit_is_requeued_and_continues_the_run(slurm, tmp_path, corpus_dir):
    job = submit(tmp_path, "pretrain", str(config(tmp_path, corpus_dir, "run", 400)))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000010"
    deadline = time.time() + JOB_TIMEOUT_S
    while not checkpoint.is_dir() and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_dir(), job_state(job)
    run("scancel", "--batch", "--signal", "USR1", job)  # what --signal=B:USR1@120 sends
    shown = wait_until_done(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "JobState=COMPLETED" in shown and "Restarts=1" in shown, log[-3000:]
    assert f"requeueing job {job}" in log
    stopped = re.search(r"stopped by signal 15 at step (\d+); saved", log)  # at a step boundary, not killed
    assert stopped, log[-3000:]
    assert f"resuming from step-{int(stopped.group(1)):06d}" in log
    assert f"Slurm requeued job {job} (restart 1): resuming from step-" in log
    straight = submit(tmp_path, "pretrain", str(config(tmp_path, corpus_dir, "straight", 400)))
    assert "JobState=COMPLETED" in wait_until_done(straight)
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
