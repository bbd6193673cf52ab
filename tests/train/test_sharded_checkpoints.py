"""Sharded checkpoints (train.checkpoint: sharded, torch.distributed.checkpoint) and their
asynchronous writing: a run saved either way resumes to the losses of a run never stopped,
bit for bit; sample, info and export-hf read them as they read full ones; a missing shard is
named in one line; under torchrun (FSDP, 2 processes) each process writes its own shards
and the run resumes in one process or two, with AdamW or Muon."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import run_cli, tiny_config
from conftest import step_losses as losses
from safetensors.torch import load_file

from gptcli.config import config_from_dict
from gptcli.errors import GptcliError
from gptcli.store.checkpoint import load_model
from gptcli.store.rundir import read_pointer
from gptcli.tasks.pretrain import pretrain

SAVES = {"full": {}, "sharded": {"checkpoint": "sharded"},
         "async": {"checkpoint": "sharded", "async_checkpoint": True}}


def config(corpus_dir, out_dir, save="full", **train):
    settings = {"max_steps": 12, "log_every": 1, "eval_every": 6, "save_every": 4, "lr_decay_steps": 12,
                **SAVES[save], **train}
    cfg = tiny_config([str(corpus_dir)], str(out_dir), **settings)
    cfg["model"]["dropout"] = 0.1  # the RNG state must resume too
    return cfg


@pytest.mark.parametrize("save", ["sharded", "async"])
def test_a_sharded_run_resumes_to_the_losses_of_a_run_never_stopped(tmp_path, corpus_dir, save):
    half = config(corpus_dir, tmp_path / "run", save, max_steps=6)
    pretrain(config_from_dict(half))
    assert (read_pointer(tmp_path / "run", "latest") / "sharded" / ".metadata").is_file()
    pretrain(config_from_dict(config(corpus_dir, tmp_path / "run", save)), resume=True)
    pretrain(config_from_dict(config(corpus_dir, tmp_path / "straight")))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    sharded, _ = load_model(tmp_path / "run" / "checkpoints" / "step-000012")
    full, _ = load_model(tmp_path / "straight" / "checkpoints" / "step-000012")
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), full.state_dict().values()))


def test_sample_info_and_export_read_a_sharded_checkpoint(tmp_path, corpus_dir, capsys):
    for save in ("full", "sharded"):
        pretrain(config_from_dict(config(corpus_dir, tmp_path / save, save, max_steps=4)))
    said = {}
    for save in ("full", "sharded"):
        code, out, err = run_cli(["sample", "-c", str(tmp_path / save), "-p", "ab", "-n", "12", "--seed", "3",
                                  "--json"], capsys)
        assert code == 0 and "Warning" not in err, err
        said[save] = json.loads(out)["text"]
        code, out, err = run_cli(["info", str(tmp_path / save), "--json"], capsys)
        assert code == 0, err
        said[save, "info"] = json.loads(out)["parameters"]
    assert said["full"] == said["sharded"] and said["full", "info"] == said["sharded", "info"] > 0
    code, out, err = run_cli(["export-hf", str(tmp_path / "sharded"), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    exported = load_file(tmp_path / "hf" / "model.safetensors")["transformer.wte.weight"]
    full, _ = load_model(tmp_path / "full" / "checkpoints" / "step-000004")
    assert torch.equal(exported, full.wte.weight[:len(exported)])


def test_a_missing_shard_is_named_in_one_line_and_nothing_is_touched(tmp_path, corpus_dir, capsys):
    pretrain(config_from_dict(config(corpus_dir, tmp_path / "run", "sharded", max_steps=4)))
    latest = read_pointer(tmp_path / "run", "latest")
    (latest / "sharded" / "__0_0.distcp").unlink()
    before = sorted(p.name for p in latest.rglob("*"))
    code, out, err = run_cli(["sample", "-c", str(tmp_path / "run"), "-p", "ab", "-n", "4"], capsys)
    assert code == 2 and err.count("\n") == 1 and "__0_0.distcp is missing" in err, err
    with pytest.raises(GptcliError, match="__0_0.distcp is missing"):
        pretrain(config_from_dict(config(corpus_dir, tmp_path / "run", "sharded", max_steps=8)), resume=True)
    assert sorted(p.name for p in latest.rglob("*")) == before


def test_async_checkpoints_need_sharded_ones(tmp_path, corpus_dir):
    with pytest.raises(GptcliError, match="train.async_checkpoint: writes sharded checkpoints; set "
                                          "train.checkpoint=sharded too"):
        config_from_dict(config(corpus_dir, tmp_path / "run", async_checkpoint=True))


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def torchrun(args, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptcli",
               *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("save, optimizer", [("sharded", "adamw"), ("async", "adamw"), ("sharded", "muon")])
def test_fsdp_processes_write_their_shards_and_resume_in_one_process_or_two(tmp_path, corpus_dir, save, optimizer):
    """2 FSDP processes x batch 4 save sharded at step 6 (each its own shard file, nothing
    gathered); resumed by 2 processes and, separately, by 1 process with batch 8: both end
    at the losses of one process straight through (within the DDP tests' tolerance; Muon's
    bf16 orthogonalisation of gradients summed in another order, as in test_muon.py)."""
    def run_config(out, max_steps, **train):
        cfg = config(corpus_dir, tmp_path / out, save, max_steps=max_steps, optimizer=optimizer, **train)
        cfg["model"].update(arch="llama", dropout=0.0)
        return cfg

    tolerance = 1e-5 if optimizer == "adamw" else 2e-3
    (tmp_path / "half.json").write_text(json.dumps(run_config("two", 6, parallel="fsdp")))
    done = torchrun(["pretrain", "half.json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = read_pointer(tmp_path / "two", "latest")
    assert sorted(p.name for p in (saved / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert load_file(saved / "model.safetensors") == {}  # metadata only: nothing was gathered
    for out in ("one",):
        subprocess.run(["cp", "-r", str(tmp_path / "two"), str(tmp_path / out)], check=True)
    (tmp_path / "full.json").write_text(json.dumps(run_config("two", 12, parallel="fsdp")))
    done = torchrun(["pretrain", "full.json", "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pretrain(config_from_dict(run_config("one", 12, batch_size=8)), resume=True)
    pretrain(config_from_dict(run_config("straight", 12, batch_size=8)))
    reference = losses(tmp_path / "straight")
    for out in ("two", "one"):
        got = losses(tmp_path / out)
        assert sorted(got) == list(range(1, 13))
        assert max(abs(got[s] - reference[s]) for s in got) < tolerance, out
