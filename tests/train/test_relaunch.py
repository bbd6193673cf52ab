"""Preemption and restarts in one process: a scheduler's SIGTERM or SIGUSR1 saves and exits
with the requeue code; the same command started again by its launcher (torchrun's restart,
Slurm's requeue: their environment variables) continues its own run without --resume and
ends where an uninterrupted run ends; anything else is refused as before. torchrun's own
restarts of killed workers are in test_multinode.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import step_losses as losses
from conftest import tiny_config

from gptcli.config import config_from_dict
from gptcli.errors import REQUEUE_EXIT, GptcliError
from gptcli.events import Notice
from gptcli.store.launch import launch_ids, relaunch_reason
from gptcli.store.rundir import read_pointer
from gptcli.tasks.pretrain import pretrain

LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """The tests run under no launcher, whatever the machine running them runs under."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_launch_ids_and_reasons(tmp_path):
    assert launch_ids({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "7"}) == {"slurm": "7"}
    (tmp_path / "run.json").write_text(json.dumps({"launch": {"torchrun": "abc", "slurm": "7"}}))
    restarted = {"TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert relaunch_reason(tmp_path, restarted) == "torchrun restarted its workers (restart 2)"
    assert relaunch_reason(tmp_path, {**restarted, "TORCHELASTIC_RESTART_COUNT": "0"}) is None  # a first start
    assert relaunch_reason(tmp_path, {**restarted, "TORCHELASTIC_RUN_ID": "other"}) is None  # another launch
    requeued = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "new-uuid"}
    assert relaunch_reason(tmp_path, requeued) == "Slurm requeued job 7 (restart 1)"
    assert relaunch_reason(tmp_path / "missing", requeued) is None


@pytest.mark.slow  # a subprocess and three runs: about 8 s
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_job_saves_exits_to_be_requeued_and_the_requeued_job_resumes_exactly(
        tmp_path, corpus_dir, monkeypatch, sig):
    """Slurm's job 7 is told to stop (SIGTERM on preemption, SIGUSR1 ahead of its time
    limit): it saves at the step boundary and exits 75. Requeued (same job id, restart
    count 1), the same command continues from that checkpoint: the losses of a run never
    stopped, bit for bit."""
    cfg = tiny_config([str(corpus_dir)], "run", max_steps=80, log_every=1, save_every=50, eval_every=40)
    cfg["model"]["dropout"] = 0.1
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": "7"}
    child = subprocess.Popen([sys.executable, "-m", "gptcli", "pretrain", "cfg.yaml"], cwd=tmp_path,
                             stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 12):
        time.sleep(0.05)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == REQUEUE_EXIT, err
    stopped = int(read_pointer(tmp_path / "run", "latest").name.split("-")[1])
    assert 12 <= stopped < 80
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    notices = []
    pretrain(config_from_dict({**cfg, "out_dir": str(tmp_path / "run")}),
             on_event=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
    assert f"Slurm requeued job 7 (restart 1): resuming from step-{stopped:06d}" in notices
    monkeypatch.delenv("SLURM_JOB_ID")
    pretrain(config_from_dict({**cfg, "out_dir": str(tmp_path / "straight")}))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_only_a_restart_of_the_launch_that_trained_the_run_continues_it(tmp_path, corpus_dir, monkeypatch):
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=4, save_every=2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "first")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    pretrain(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "second")  # another launch's restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(GptcliError, match="already holds a run; pass --resume"):
        pretrain(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "first")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first start is never a restart
    with pytest.raises(GptcliError, match="already holds a run; pass --resume"):
        pretrain(cfg)


def test_a_restart_before_the_first_checkpoint_starts_the_run_again(tmp_path, corpus_dir, monkeypatch):
    """The first attempt died before saving (here: its run.json and metrics, no checkpoint):
    the restarted one trains from step 0 in the same folder."""
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=4, save_every=2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    pretrain(cfg)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it died before its first save
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    notices = []
    pretrain(cfg, on_event=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
    assert "torchrun restarted its workers (restart 1): it saved no checkpoint, so it starts again" in notices
    assert read_pointer(tmp_path / "run", "latest").name == "step-000004"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    pretrain(config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "straight", max_steps=4, save_every=2)))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # one fresh run's log, not two
