"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 each equal one process with the same
global batch, resume across world sizes, rank 0 alone writes, one error message."""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import step_losses as losses
from conftest import tiny_config
from conftest import write_json_config as write_config

from gptcli.config import config_from_dict
from gptcli.tasks.pretrain import pretrain

# Started as `python -m torch.distributed.run`, so no torchrun script is needed: only a torch
# built with distributed support and its CPU backend.
pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with the gloo backend"),
              pytest.mark.slow]  # several processes each: about 75 s in all


def torchrun(args, cwd, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gptcli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def base(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], str(tmp_path / "ddp"), max_steps=12, log_every=1,
                      eval_every=6, save_every=6, batch_size=4, grad_accum=2, lr_decay_steps=12)
    cfg["model"]["dropout"] = 0.0
    return cfg


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_losses_match_single_process_with_same_global_batch(tmp_path, base, parallel):
    base["train"]["parallel"] = parallel
    done = torchrun(["pretrain", write_config(tmp_path / "ddp.yaml", base)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(json.dumps(base))
    single["out_dir"] = str(tmp_path / "single")
    single["train"]["batch_size"] = 8  # 2 processes x 4 = 8 sequences per micro-step
    pretrain(config_from_dict(single))
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(ddp) == list(range(1, 13))
    assert max(abs(ddp[s] - one[s]) for s in ddp) < 1e-5
    # Rank 0 alone wrote: one line per logged step and evaluation, no stray files.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 + 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        ".gptcli", ".gptcli.lock", "checkpoints", "config.yaml", "loss.png", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "best", "latest", "step-000006", "step-000012"]
    assert f"2 processes ({parallel})" in done.stderr


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_save_with_two_processes_resume_with_one(tmp_path, base, parallel):
    half = json.loads(json.dumps(base))
    half["train"]["parallel"] = parallel
    half["train"]["max_steps"] = 6
    done = torchrun(["pretrain", write_config(tmp_path / "half.yaml", half)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads(json.dumps(base))
    resumed["train"]["grad_accum"] = 4  # 1 process x 4 x 4 = the same 16 sequences per step
    pretrain(config_from_dict(resumed), resume=True)
    straight = json.loads(json.dumps(base))
    straight["out_dir"] = str(tmp_path / "straight")
    straight["train"].update(batch_size=8, grad_accum=2)
    pretrain(config_from_dict(straight))
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "straight")
    assert sorted(a) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


def test_resume_with_a_different_global_batch_is_refused(tmp_path, base):
    from gptcli.errors import GptcliError

    half = json.loads(json.dumps(base))
    half["train"]["max_steps"] = 2
    done = torchrun(["pretrain", write_config(tmp_path / "half.yaml", half)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(GptcliError, match="global batch .* was 16, now 8"):
        pretrain(config_from_dict(base), resume=True)


def test_an_error_is_reported_once(tmp_path, base):
    bad = json.loads(json.dumps(base))
    bad["train"]["lr"] = -1
    done = torchrun(["pretrain", write_config(tmp_path / "bad.yaml", bad)], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("error: train.lr: must be greater than 0") == 1
    # torchrun adds its own ChildFailedError summary; no frame of gptcli's is in it.
    assert "gptcli/" not in "".join(line for line in done.stderr.splitlines() if "File " in line)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_finetune_under_torchrun_matches_single_process(tmp_path, base, parallel):
    from gptcli.config import FinetuneRunConfig
    from gptcli.tasks.finetune import finetune

    pretrain(config_from_dict({**base, "out_dir": str(tmp_path / "base")}))
    rows = ["text,label"] + [f"{'aeiou' * 3 if i % 2 else 'zxqvk' * 3} {i},{i % 2}" for i in range(80)]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    cfg = {"out_dir": str(tmp_path / "ft2"), "seed": 5,
           "finetune": {"task": "classify", "init_from": str(tmp_path / "base"),
                        "train_file": str(tmp_path / "cls.csv"), "patience": 0},
           "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 8, "log_every": 1, "eval_every": 4,
                     "save_every": 4, "lr": 1e-3, "precision": "fp32", "device": "cpu",
                     "parallel": parallel}}
    done = torchrun(["finetune", write_config(tmp_path / "ft.yaml", cfg)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(json.dumps(cfg))
    single["out_dir"] = str(tmp_path / "ft1")
    single["train"]["batch_size"] = 8
    finetune(config_from_dict(single, FinetuneRunConfig))
    two, one = losses(tmp_path / "ft2"), losses(tmp_path / "ft1")
    assert sorted(two) == list(range(1, 9)) and max(abs(two[s] - one[s]) for s in two) < 1e-5
    # The checkpoint holds whole tensors whatever the sharding: the same keys and shapes.
    from safetensors.torch import load_file

    saved = [load_file(tmp_path / run / "checkpoints" / "step-000008" / "model.safetensors")
             for run in ("ft1", "ft2")]
    assert {k: v.shape for k, v in saved[0].items()} == {k: v.shape for k, v in saved[1].items()}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_eval_tasks_under_torchrun_score_as_one_process(tmp_path, base, parallel):
    """train.eval_tasks under DDP and FSDP2 (where scoring's trunk and head calls gather the
    sharded weights themselves) give the single process's acc and acc_norm."""
    items = [{"context": f"line {i}: the", "choices": [" cat", " sat on", " the mat.", " x" * (i + 1)],
              "label": i % 4} for i in range(12)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    base["train"].update(parallel=parallel, max_steps=6, eval_every=3,
                         eval_tasks=[{"task": "choice", "data": str(data), "name": "toy"}])
    done = torchrun(["pretrain", write_config(tmp_path / "run.yaml", base)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(json.dumps(base))
    single["out_dir"] = str(tmp_path / "single")
    single["train"]["batch_size"] = 8
    pretrain(config_from_dict(single))

    def scores(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["toy/acc"], r["toy/acc_norm"]) for r in rows if "toy/acc" in r]

    assert [step for step, *_ in scores(tmp_path / "ddp")] == [3, 6]
    assert scores(tmp_path / "ddp") == scores(tmp_path / "single")


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_post_training_under_torchrun_matches_single_process(tmp_path, base, task):
    """DPO pairs and GRPO rollouts split over 2 processes as over one process's batch: the
    same prompts, the same sampling seeds per prompt, the same losses and rewards."""
    from gptcli.config import FinetuneRunConfig
    from gptcli.tasks.finetune import finetune

    pretrain(config_from_dict({**base, "out_dir": str(tmp_path / "base")}))
    rows = [{"prompt": f"x{i} = ", "answer": "0", "chosen": f" {i}", "rejected": f" {'ab' * (i % 3 + 1)}"}
            for i in range(40)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"out_dir": str(tmp_path / "two"), "seed": 5,
           "finetune": {"task": task, "init_from": str(tmp_path / "base"), "train_file": str(tmp_path / "data.jsonl"),
                        "patience": 0, "grpo": {"group_size": 4, "max_new_tokens": 4,
                                                "rewards": [{"name": "regex", "pattern": "[0-9]"}]}},
           "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 4, "log_every": 1, "eval_every": 4,
                     "save_every": 4, "lr": 1e-3, "precision": "fp32", "device": "cpu"}}
    done = torchrun(["finetune", write_config(tmp_path / "ft.yaml", cfg)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(json.dumps(cfg))
    single["out_dir"] = str(tmp_path / "one")
    single["train"]["batch_size"] = 4
    finetune(config_from_dict(single, FinetuneRunConfig))
    key = "reward" if task == "grpo" else "rewards/margins"
    logged = lambda run: {r["step"]: (r["loss"], r[key]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                                         .read_text().splitlines()) if "loss" in r}
    two, one = logged("two"), logged("one")
    assert sorted(two) == [1, 2, 3, 4]
    assert all(abs(two[s][0] - one[s][0]) < 1e-5 and abs(two[s][1] - one[s][1]) < 1e-5 for s in two), (two, one)
