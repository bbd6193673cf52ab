"""Beyond one torchrun: two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1,
gloo) train as one process with the same global batch, rank 0 of node 0 alone writes, and
the run resumes on one node or two; a worker killed with SIGKILL under --max-restarts is
restarted by torchrun and the run continues by itself, ending bit-identical to a run never
interrupted."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import step_losses as losses
from conftest import tiny_config
from conftest import write_json_config as write_config
from safetensors.torch import load_file

from gptcli.config import config_from_dict
from gptcli.store.rundir import read_pointer
from gptcli.tasks.pretrain import pretrain

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with the gloo backend"),
              pytest.mark.slow]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")


def clean_env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], cwd: Path, nproc: int = 1) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2` started twice, as on two machines, meeting at one endpoint."""
    port, run_id = free_port(), f"test-{time.monotonic_ns()}"
    command = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "-m", "gptcli", *args]
    nodes = [subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env()) for _ in range(2)]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(command, node.returncode, out, err))
    return done


@pytest.fixture
def base(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], str(tmp_path / "nodes"), max_steps=12, log_every=1,
                      eval_every=6, save_every=6, batch_size=4, grad_accum=1, lr_decay_steps=12)
    return cfg


def test_two_nodes_train_as_one_process_and_resume_on_one_or_two(tmp_path, base):
    half = {**base, "train": {**base["train"], "max_steps": 6}}
    first = two_nodes(["pretrain", str(write_config(tmp_path / "half.yaml", half))], tmp_path)
    assert [n.returncode for n in first] == [0, 0], first[0].stderr[-2000:] + first[1].stderr[-2000:]
    assert sum("2 processes (ddp)" in n.stderr for n in first) == 1  # one node's rank 0 speaks
    # One writer: one line per logged step and evaluation, one checkpoint.
    assert len((tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()) == 6 + 1
    assert read_pointer(tmp_path / "nodes", "latest").name == "step-000006"
    # The same global batch (2 nodes x 1 process x 4) in one process, straight through.
    straight = {**base, "out_dir": str(tmp_path / "straight"), "train": {**base["train"], "batch_size": 8}}
    pretrain(config_from_dict(straight))
    reference = losses(tmp_path / "straight")
    assert max(abs(losses(tmp_path / "nodes")[s] - reference[s]) for s in range(1, 7)) < 1e-5
    # Resumed on two nodes ...
    second = two_nodes(["pretrain", str(write_config(tmp_path / "full.yaml", base)), "--resume"], tmp_path)
    assert [n.returncode for n in second] == [0, 0], second[0].stderr[-2000:]
    two = losses(tmp_path / "nodes")
    assert sorted(two) == list(range(1, 13))
    assert max(abs(two[s] - reference[s]) for s in two) < 1e-5
    # ... and the first half resumed on one node, one process (batch 8: the same global batch).
    (tmp_path / "one").mkdir()
    again = two_nodes(["pretrain", str(write_config(tmp_path / "half2.yaml", {**half, "out_dir": str(tmp_path / "one")}))],
                      tmp_path)
    assert [n.returncode for n in again] == [0, 0]
    pretrain(config_from_dict({**straight, "out_dir": str(tmp_path / "one")}), resume=True)
    one = losses(tmp_path / "one")
    assert sorted(one) == list(range(1, 13))
    assert max(abs(one[s] - reference[s]) for s in one) < 1e-5


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_interrupted(tmp_path, base):
    """torchrun --max-restarts 1, 2 workers; SIGKILL to one after the step-20 checkpoint:
    torchrun restarts both, they find their run (no --resume) and continue from its latest
    checkpoint. Losses and final weights equal an uninterrupted 2-process run, bit for bit."""
    cfg = {**base, "train": {**base["train"], "max_steps": 200, "save_every": 20, "eval_every": 100,
                             "lr_decay_steps": 200}}
    path = write_config(tmp_path / "run.yaml", cfg)
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "gptcli",
               "pretrain", str(path)]
    # torchrun's shared rendezvous store can hand restarted workers their predecessors'
    # addresses (pytorch/pytorch#135712): the README tells users to turn the sharing off.
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    checkpoints = tmp_path / "nodes" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints / "step-000020").is_dir():
        time.sleep(0.02)
    workers = children(launcher.pid)
    assert len(workers) == 2 and launcher.poll() is None, "the run ended before a worker could be killed"
    os.kill(workers[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "torchrun restarted its workers (restart 1): resuming from step-0000" in err
    straight = write_config(tmp_path / "straight.yaml", {**cfg, "out_dir": str(tmp_path / "straight")})
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "gptcli", "pretrain",
                           str(straight)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "nodes") == losses(tmp_path / "straight")
    a = load_file(checkpoints / "step-000200" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "checkpoints" / "step-000200" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rendezvous_that_cannot_complete_ends_with_torchruns_timeout(tmp_path, base):
    """A node whose peer never comes ends (not hangs) once torchrun's join timeout passes,
    with its RendezvousTimeoutError: the rendezvous is torchrun's, before gptcli starts, so
    the README names --rdzv_conf join_timeout. Two nodes that disagree on --nnodes end too."""
    path = write_config(tmp_path / "run.yaml", base)
    port = free_port()

    def node(nnodes: int, log: Path) -> subprocess.Popen:  # a file, not a pipe: a full pipe would stall it
        return subprocess.Popen([*TORCHRUN, "--nnodes", str(nnodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lonely",
                                 "--rdzv-conf", "join_timeout=5", "-m", "gptcli", "pretrain", str(path)],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=clean_env())

    start = time.monotonic()
    alone = node(2, tmp_path / "alone.log")
    assert alone.wait(timeout=120) != 0 and "RendezvousTimeoutError" in (tmp_path / "alone.log").read_text()
    assert not (tmp_path / "nodes").exists()  # gptcli never started: nothing written
    # Disagreeing nodes: torchrun's c10d rendezvous either never completes (the timeout) or
    # completes with the first node's count, and then the two train as one run.
    mismatched = [node(2, tmp_path / "two.log"), node(3, tmp_path / "three.log")]
    codes = [n.wait(timeout=120) for n in mismatched]
    assert time.monotonic() - start < 120
    assert codes == [0, 0] or 0 not in codes, codes
    if codes == [0, 0]:
        assert json.loads((tmp_path / "nodes" / "run.json").read_text())["status"] == "finished"
