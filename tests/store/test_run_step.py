"""run.json, and so `gptcli runs`, count the steps a run really did, not only those it
logged (issue 26, item 17): a Ctrl-C between log steps saves a later step than the last
logged one."""

import os
import signal

import pytest
from conftest import tiny_config

from gptcli.config import config_from_dict
from gptcli.errors import Interrupted
from gptcli.store.rundir import read_pointer
from gptcli.store.runlog import read_run_file, summarize_run
from gptcli.tasks.pretrain import pretrain


def signal_at_step(monkeypatch, at_step: int, signum=signal.SIGINT) -> None:
    """Send `signum` to this process while step `at_step` (0-based) draws its batch."""
    from gptcli.tasks.pretrain import PretrainData

    real_batch = PretrainData.train_batch
    sent = {"done": False}

    def batch_then_signal(self, step, micro):
        if step == at_step and not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signum)
        return real_batch(self, step, micro)

    monkeypatch.setattr(PretrainData, "train_batch", batch_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_records_the_step_it_saved(tmp_path, corpus_dir, monkeypatch, signum):
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=50, log_every=10,
                                       save_every=100, eval_every=100))
    signal_at_step(monkeypatch, 23, signum)  # step 24 finishes, is saved; the last log was step 20
    with pytest.raises(Interrupted):
        pretrain(cfg)
    assert read_pointer(tmp_path / "run", "latest").name == "step-000024"
    info = read_run_file(tmp_path / "run")
    assert (info["status"], info["step"]) == ("interrupted", 24)
    summary = summarize_run(tmp_path / "run")
    assert (summary.status, summary.step) == ("interrupted", 24)


def test_finished_run_records_its_last_step(tmp_path, corpus_dir):
    pretrain(config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=7, log_every=5,
                                          save_every=100, eval_every=100)))
    info = read_run_file(tmp_path / "run")
    assert (info["status"], info["step"]) == ("finished", 7)
    assert summarize_run(tmp_path / "run").step == 7


def test_runs_reads_the_step_from_run_json(tmp_path):
    """A run.json that knows a later step than metrics.jsonl (the save after the last log)."""
    from gptcli.store.runlog import RunLog

    run = tmp_path / "run"
    run.mkdir()
    log = RunLog(run, enabled=True, tensorboard=False, started_at=0.0,
                 facts={"task": "pretrain", "max_steps": 50, "metric": "val_loss"})
    log.append({"step": 20, "loss": 1.0, "tokens_seen": 100})
    log.close("interrupted", step=24)
    assert read_run_file(run)["step"] == 24
    assert summarize_run(run).step == 24
    log.close("interrupted", step=10)  # never back: the logged step stands
    assert read_run_file(run)["step"] == 24
