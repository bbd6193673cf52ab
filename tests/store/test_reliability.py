"""Crash safety, signals, corruption, non-finite losses, full disks, changed data."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import nan_on_calls, own_cache, tiny_config, write_corpus
from conftest import step_losses as losses

from gptcli.config import config_from_dict
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.data.training.dataset import TokenDataset
from gptcli.errors import REQUEUE_EXIT, GptcliError, Interrupted
from gptcli.events import Notice
from gptcli.model.gpt import GPT
from gptcli.store import checkpoint as checkpoint_module
from gptcli.store.checkpoint import load_model
from gptcli.store.rundir import read_pointer, resolve_checkpoint
from gptcli.tasks.pretrain import pretrain

SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from gptcli.store.checkpoint import save_checkpoint, step_name
    from gptcli.store.rundir import write_pointer
    from gptcli.config import ModelConfig
    from gptcli.model.gpt import GPT
    from gptcli.data.tokenizers.tokenizer import BytesTokenizer
    run = Path(sys.argv[1])
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=257))
    for step in range(1, 10_000):
        with torch.no_grad():
            model.wte.weight.fill_(step)  # each checkpoint's weights say which step it is
        path = save_checkpoint(run / "checkpoints" / step_name(step), model, BytesTokenizer(), "# t\\n")
        write_pointer(run, "latest", path)
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31])
def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path, delay):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "1"  # one checkpoint is complete
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    latest = read_pointer(tmp_path / "run", "latest")
    model, _ = load_model(latest)  # verifies every file against the manifest
    step = int(latest.name.split("-")[1])
    assert torch.all(model.wte.weight == step)


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], "run", max_steps=80, log_every=1, save_every=50, eval_every=40)
    cfg["model"]["dropout"] = 0.1
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    child = subprocess.Popen([sys.executable, "-m", "gptcli", "pretrain", "cfg.yaml"], cwd=tmp_path,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 12):
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == REQUEUE_EXIT, err  # saved: a scheduler may run it again
    assert "continue with: gptcli pretrain cfg.yaml --resume" in err
    stopped = read_pointer(tmp_path / "run", "latest")
    assert 12 <= int(stopped.name.split("-")[1]) < 80
    pretrain(config_from_dict({**cfg, "out_dir": str(tmp_path / "run")}), resume=True)
    pretrain(config_from_dict({**cfg, "out_dir": str(tmp_path / "straight")}))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_signal_in_process_saves_and_raises(tmp_path, corpus_dir, monkeypatch):
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=50, save_every=100))
    sent = {"done": False}
    real_batch = __import__("gptcli.tasks.pretrain", fromlist=["PretrainData"]).PretrainData.train_batch

    def batch_then_signal(self, step, micro):
        if step == 7 and not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, step, micro)

    monkeypatch.setattr("gptcli.tasks.pretrain.PretrainData.train_batch", batch_then_signal)
    with pytest.raises(Interrupted) as info:
        pretrain(cfg)
    assert info.value.step == 8 and info.value.exit_code == 130
    assert read_pointer(tmp_path / "run", "latest").name == "step-000008"


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory):
    """A finished 10-step run beside its corpus, trained once for this module; tests that
    damage or extend it work on copies."""
    root = tmp_path_factory.mktemp("intact")
    with own_cache(root):
        pretrain(config_from_dict(tiny_config([str(write_corpus(root / "corpus"))], root / "run", max_steps=10)))
    return root / "run"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_tokenizer", "manifest"])
def test_corrupted_checkpoint_is_detected(tmp_path, intact_run, damage):
    ckpt = shutil.copytree(resolve_checkpoint(intact_run), tmp_path / "ckpt")
    load_model(ckpt)  # the copy itself is sound
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_tokenizer":
        (ckpt / "tokenizer" / "tokenizer.json").unlink()
    else:
        (ckpt / "manifest.json").write_text("{oops")
    expected = {"truncate": "model.safetensors is corrupted", "flip": "model.safetensors is corrupted",
                "delete_tokenizer": "tokenizer.json is missing", "manifest": "manifest.json is corrupted"}
    with pytest.raises(GptcliError, match=expected[damage]):
        load_model(ckpt)


def test_non_finite_steps_are_skipped(tmp_path, corpus_dir, monkeypatch):
    nan_on_calls(monkeypatch, bad_calls={5, 6})
    events = []
    pretrain(config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=20)),
             on_event=events.append)
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert len([n for n in notes if "non-finite" in n]) == 2
    model, _ = load_model(resolve_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_stops_and_keeps_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch):
    nan_on_calls(monkeypatch, bad_calls=set(range(12, 1000)))
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=30, save_every=10))
    with pytest.raises(GptcliError, match="non-finite for 3 consecutive steps"):
        pretrain(cfg)
    assert read_pointer(tmp_path / "run", "latest").name == "step-000010"
    model, _ = load_model(read_pointer(tmp_path / "run", "latest"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_disk_full_on_save_is_a_clear_error(tmp_path, corpus_dir, monkeypatch):
    real_save = checkpoint_module.save_file
    count = {"n": 0}

    def save_file(*args, **kwargs):
        count["n"] += 1
        if count["n"] > 2:  # weights + trainer state of the first checkpoint succeed
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=30, save_every=10))
    with pytest.raises(GptcliError, match="could not save the checkpoint of step 20 .*No space left.*--resume"):
        pretrain(cfg)
    assert read_pointer(tmp_path / "run", "latest").name == "step-000010"
    load_model(read_pointer(tmp_path / "run", "latest"))
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))


def test_keep_last_prunes_but_keeps_best(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=60, save_every=10, eval_every=10,
                      keep_last=2)
    pretrain(config_from_dict(cfg))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    best = read_pointer(tmp_path / "run", "best").name
    assert kept[-2:] == ["step-000050", "step-000060"] and best in kept and len(kept) <= 3


@pytest.mark.parametrize("change", ["flip", "truncate"])
def test_changed_token_file_is_detected(tmp_path, corpus_dir, change):
    out = tmp_path / "tok"
    tokenize_corpus([str(corpus_dir)], out, tokenizer="bytes")
    TokenDataset.open(out)  # verifies and remembers the checksum
    train = out / "train-00000.bin"
    data = bytearray(train.read_bytes())
    if change == "flip":
        data[100] ^= 1
        train.write_bytes(bytes(data))
    else:
        train.write_bytes(bytes(data[:-2]))
    with pytest.raises(GptcliError, match="train-00000.bin (does not match the checksum|is missing or has the wrong size)"):
        TokenDataset.open(out)


def test_out_of_memory_advice(tmp_path, corpus_dir, monkeypatch):
    def oom(self, idx, targets=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", batch_size=8, grad_accum=2)
    with pytest.raises(GptcliError, match=r"batch_size=8; try --set train.batch_size=4 --set train.grad_accum=4 "
                                          r"\(the same 16 sequences per step\)"):
        pretrain(config_from_dict(cfg))


def test_resume_notes_changed_settings(tmp_path, intact_run):
    run = shutil.copytree(intact_run, tmp_path / "run")  # trained with max_steps=10, eval_every=10
    cfg = tiny_config([str(intact_run.parent / "corpus")], run, max_steps=12, eval_every=6)
    events = []
    pretrain(config_from_dict(cfg), resume=True, on_event=events.append)
    notes = " ".join(e.message for e in events if isinstance(e, Notice))
    assert "max_steps 10 -> 12" in notes and "eval_every 10 -> 6" in notes


def test_resume_refuses_other_tokenizer(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=4)
    cfg["data"]["tokenizer"] = "char"
    pretrain(config_from_dict(cfg))
    other = tmp_path / "other"
    other.mkdir()
    chars = sorted(set("".join(p.read_text() for p in corpus_dir.rglob("*.py"))))
    shifted = "".join(chr(ord(c) + 1) if c.isalpha() else c for c in "".join(chars))
    for i in range(20):  # the same number of distinct characters, different ones
        (other / f"f{i}.txt").write_text(shifted * 3)
    cfg["data"]["inputs"] = [str(other)]
    with pytest.raises(GptcliError, match="not the checkpoint's"):
        pretrain(config_from_dict(cfg), resume=True)


def test_nothing_left_half_written_after_a_failed_tokenize(tmp_path, corpus_dir, monkeypatch):
    import gptcli.data.tokenized.shards as shards

    def explode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards._Run, "write", explode)
    with pytest.raises(GptcliError, match="could not write .*No space left on device.*nothing was written"):
        tokenize_corpus([str(corpus_dir)], tmp_path / "tok", tokenizer="bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
