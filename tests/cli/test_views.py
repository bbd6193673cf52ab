"""Seeing runs: plot, runs, info, LM eval, TensorBoard, help and completion."""

import json
import math
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import (
    GPT2_TIKTOKEN,
    nan_on_calls,
    needs_gpt2_ranks,
    own_cache,
    run_cli,
    tiny_config,
    write_corpus,
)

from gptcli.config import FinetuneRunConfig, config_from_dict
from gptcli.errors import Interrupted
from gptcli.events import StepLogged
from gptcli.store.runlog import RUN_FILE, read_metrics
from gptcli.tasks.finetune import finetune
from gptcli.tasks.pretrain import pretrain


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished 20-step pretraining run, trained once for this module. Tests only read it;
    one that needs it beside runs of its own copies it."""
    root = tmp_path_factory.mktemp("views")
    cfg = tiny_config([str(write_corpus(root / "corpus"))], root / "runs" / "lm", max_steps=20)
    with own_cache(root):
        pretrain(config_from_dict(cfg))
    return root / "runs" / "lm"


def classify_run(tmp_path, base, lora_rank=0, name="cls"):
    rows = ["text,label"] + [f"{'aeiou' * 3 if i % 2 else 'zxqvk' * 3} {i},{'ab'[i % 2]}" for i in range(60)]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    cfg = {"out_dir": str(tmp_path / "runs" / name), "finetune": {
               "task": "classify", "init_from": str(base), "train_file": str(tmp_path / "cls.csv"),
               "patience": 0, "lora": {"rank": lora_rank}},
           "train": {"batch_size": 8, "max_steps": 10, "eval_every": 5, "save_every": 5, "log_every": 5,
                     "precision": "fp32", "device": "cpu", "lr": 1e-3}}
    finetune(config_from_dict(cfg, FinetuneRunConfig))
    return tmp_path / "runs" / name


def png_size(path):
    """Decode the PNG fully (a truncated or corrupt file raises) and return (width, height)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


# --- plot ---------------------------------------------------------------------------------

def test_training_writes_loss_png_and_plot_draws_one_run(tmp_path, corpus_dir, lm_run, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config([str(corpus_dir)], tmp_path / "runs" / "cli", max_steps=10)))
    assert run_cli(["pretrain", config], capsys)[0] == 0  # the CLI draws a finished run's curves
    assert png_size(tmp_path / "runs" / "cli" / "loss.png") == (2 * 660, 462)  # loss, val bpb; 6 x 4.2 in at 110 dpi
    code, _, err = run_cli(["plot", lm_run, "--out", tmp_path / "one.png", "--x", "tokens", "--log"], capsys)
    assert code == 0, err
    assert png_size(tmp_path / "one.png") == (2 * 660, 462)


def test_plot_several_runs_of_different_tasks(tmp_path, lm_run, corpus_dir, capsys):
    other = tiny_config([str(corpus_dir)], tmp_path / "runs" / "lm2", max_steps=10, lr=1e-3)
    pretrain(config_from_dict(other))
    cls = classify_run(tmp_path, lm_run)
    code, _, err = run_cli(["plot", lm_run, tmp_path / "runs" / "lm2", cls, "--out", tmp_path / "all.png"], capsys)
    assert code == 0, err
    assert png_size(tmp_path / "all.png") == (3 * 660, 462)  # loss, val bpb and val accuracy


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, lm_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, out, err = run_cli(["plot", lm_run, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "pip install 'gptcli[plot]'" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# --- runs ---------------------------------------------------------------------------------

def runs_json(root, capsys):
    code, out, err = run_cli(["runs", root, "--json"], capsys)
    assert code == 0, err
    return {os.path.basename(r["path"]): r for r in map(json.loads, out.splitlines())}


def test_runs_lists_finished_interrupted_failed_and_killed(tmp_path, lm_run, corpus_dir, capsys, monkeypatch):
    lm_run = shutil.copytree(lm_run, tmp_path / "runs" / "lm")  # beside the runs made here

    def interrupt_at_step_10(event):
        if isinstance(event, StepLogged) and event.metrics["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    cut = tiny_config([str(corpus_dir)], tmp_path / "runs" / "cut", max_steps=20)
    with pytest.raises(Interrupted):
        pretrain(config_from_dict(cut), on_event=interrupt_at_step_10)

    from gptcli.errors import GptcliError

    with monkeypatch.context() as patch:
        nan_on_calls(patch, bad_calls=set(range(8, 1000)))
        nan = tiny_config([str(corpus_dir)], tmp_path / "runs" / "nan", max_steps=20)
        with pytest.raises(GptcliError, match="non-finite"):
            pretrain(config_from_dict(nan))
    killed = tiny_config([str(corpus_dir)], tmp_path / "runs" / "killed", max_steps=10)
    pretrain(config_from_dict(killed))
    record = json.loads((tmp_path / "runs" / "killed" / RUN_FILE).read_text())
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that no longer runs, as after kill -9
    (tmp_path / "runs" / "killed" / RUN_FILE).write_text(json.dumps({**record, "status": "running", "pid": dead}))

    runs = runs_json(tmp_path / "runs", capsys)
    assert {name: r["status"] for name, r in runs.items()} == {
        "lm": "finished", "cut": "interrupted", "nan": "failed", "killed": "interrupted"}
    lm = runs["lm"]
    assert lm["task"] == "pretrain" and lm["step"] == 20 and lm["max_steps"] == 20
    assert lm["metric"] == "val_loss"
    assert lm["best"] == min(r["val_loss"] for r in read_metrics(lm_run) if "val_loss" in r)
    assert lm["tokens_seen"] == 20 * 4 * 32 and lm["wall_seconds"] > 0
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    assert lm["parameters"] == load_model(resolve_checkpoint(lm_run))[0].num_params()
    # SIGINT came after step 10's log line: the step under way finished and was saved
    assert runs["cut"]["step"] == 11 and runs["cut"]["max_steps"] == 20
    code, _, err = run_cli(["runs", tmp_path / "runs"], capsys)  # the rich table renders
    assert code == 0 and "interrupted" in err and "finished" in err and "failed" in err


def test_a_resumed_run_is_finished_and_adds_up_wall_time(tmp_path, corpus_dir, capsys):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "runs" / "r", max_steps=10)
    pretrain(config_from_dict(cfg))
    first = json.loads((tmp_path / "runs" / "r" / RUN_FILE).read_text())["wall_seconds"]
    cfg["train"]["max_steps"] = 20
    pretrain(config_from_dict(cfg), resume=True)
    run = runs_json(tmp_path / "runs", capsys)["r"]
    assert run["status"] == "finished" and run["step"] == 20 and run["wall_seconds"] > first


# --- info ---------------------------------------------------------------------------------

def info_json(path, capsys):
    code, out, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_info_on_pretrain_classify_lora_merged_and_imported(tmp_path, lm_run, capsys):
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    lm = info_json(lm_run, capsys)
    assert lm["kind"] == "pretrain" and lm["step"] == 20 and lm["tokens_seen"] == 20 * 4 * 32
    assert lm["parameters"] == load_model(resolve_checkpoint(lm_run))[0].num_params()
    assert lm["model"]["n_layer"] == 2 and lm["tokenizer"] == "bytes"
    last_val = [r for r in read_metrics(lm_run) if "val_loss" in r][-1]
    assert lm["metrics"]["val_loss"] == last_val["val_loss"] and lm["checksums"].startswith("ok")
    assert lm["files"]["model.safetensors"] == (lm_run / "checkpoints" / "step-000020" / "model.safetensors").stat().st_size

    cls = info_json(classify_run(tmp_path, lm_run), capsys)
    assert cls["kind"] == "finetune classify, classifier" and cls["labels"] == ["a", "b"]
    assert "val_accuracy" in cls["metrics"]

    lora_run = classify_run(tmp_path, lm_run, lora_rank=4, name="lora")
    lora = info_json(lora_run / "checkpoints" / "step-000010", capsys)
    assert lora["kind"] == "finetune classify, LoRA adapters (not merged), classifier"
    assert lora["lora"]["rank"] == 4 and 0 < lora["lora"]["adapter_parameters"] < lora["parameters"]
    from gptcli.store.rundir import read_pointer

    merged = info_json(read_pointer(lora_run, "merged"), capsys)
    assert merged["kind"] == "finetune classify, LoRA adapters merged into the weights, classifier"
    assert "not resumable" in merged["training"]



@needs_gpt2_ranks
def test_info_on_an_imported_hugging_face_model(tmp_path, capsys):
    from gptcli.config import ModelConfig
    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.model.gpt import GPT
    from gptcli.store.checkpoint import save_checkpoint
    from gptcli.store.hf import export_hf

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    hf_dir = export_hf(save_checkpoint(tmp_path / "ckpt", model, tiktoken_from_file(GPT2_TIKTOKEN), "# t\n"),
                       tmp_path / "hf")
    code, _, err = run_cli(["import-hf", hf_dir, "--out", tmp_path / "imported"], capsys)
    assert code == 0, err
    imported = info_json(tmp_path / "imported", capsys)
    assert imported["kind"] == f"imported from Hugging Face ({hf_dir})"
    assert imported["parameters"] == model.num_params() and imported["tokenizer"] == "gpt2"
    assert "not resumable" in imported["training"] and imported["checksums"].startswith("ok")
    direct = info_json(hf_dir, capsys)  # an HF directory itself: imported once into the cache
    assert direct["kind"].startswith("imported from Hugging Face") and direct["parameters"] == model.num_params()


def test_info_reports_a_corrupted_file(tmp_path, lm_run, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lm_run / "checkpoints" / "step-000020", copy)
    with open(copy / "trainer.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    described = info_json(copy, capsys)
    assert described["checksums"].startswith("FAILED") and "trainer.safetensors" in described["checksums"]
    code, _, err = run_cli(["info", copy], capsys)
    assert code == 0 and "FAILED" in err
    (copy / "config.yaml").write_text("train: [unclosed\n")  # not YAML any more
    described = info_json(copy, capsys)
    assert described["kind"] == "unknown (config.yaml unreadable)" and described["checksums"].startswith("FAILED")


# --- eval of a language model ---------------------------------------------------------------

def eval_json(args, capsys):
    code, out, err = run_cli(["eval", *args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_eval_repeats_the_runs_validation_exactly(tmp_path, lm_run, capsys):
    logged = [r for r in read_metrics(lm_run) if "val_loss" in r][-1]
    got = eval_json(["-c", lm_run], capsys)
    assert got["loss"] == pytest.approx(logged["val_loss"], abs=1e-6)
    assert got["bpb"] == pytest.approx(logged["val_bpb"], abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(logged["val_loss"]), rel=1e-6)


def test_eval_refuses_to_repeat_a_validation_whose_data_changed(tmp_path, corpus_dir, capsys):
    run = tmp_path / "runs" / "own"  # its own run: the corpus it read is edited here
    pretrain(config_from_dict(tiny_config([str(corpus_dir)], run, max_steps=2, eval_every=2, save_every=2)))
    assert math.isfinite(eval_json(["-c", run], capsys)["loss"])  # unchanged data: the validation repeats
    for path in corpus_dir.rglob("*.py"):
        path.write_text(path.read_text() + "# edited after training\n")
    code, out, err = run_cli(["eval", "-c", run], capsys)
    assert code == 2 and "is not what it was during training" in err and out == ""


def test_eval_on_text_scores_every_token_once(tmp_path, lm_run, capsys):
    """Against a direct computation: one forward over each block_size window by hand."""
    from gptcli.store.checkpoint import load_model
    from gptcli.store.rundir import resolve_checkpoint

    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(40))  # 1,000+ bytes
    (tmp_path / "eval.txt").write_text(text)
    model, tok = load_model(resolve_checkpoint(lm_run))
    ids = torch.tensor(tok.encode(text) + [tok.eot_id])
    nats, block = 0.0, model.config.block_size
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            window = ids[start:start + block + 1]
            logits = model(window[None, :-1])
            nats += torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum").item()
    expected = nats / (len(ids) - 1)
    got = eval_json(["-c", lm_run, "--data", tmp_path / "eval.txt", "--batch-size", "3"], capsys)
    assert got["tokens"] == len(ids) and got["bytes"] == len(text.encode())
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)  # all nats / all bytes


def test_eval_on_a_tokenized_split(tmp_path, lm_run, capsys):
    from gptcli.config import load_config
    from gptcli.data.training.dataset import TokenDataset, prepare_dataset

    cfg = load_config(lm_run / "config.yaml")
    dataset = TokenDataset.open(prepare_dataset(cfg.data, cfg.seed))
    val = eval_json(["-c", lm_run, "--data", dataset.path, "--split", "val"], capsys)
    assert val["tokens"] == len(dataset.splits["val"])
    whole = eval_json(["-c", lm_run, "--data", dataset.path], capsys)
    assert whole["tokens"] == len(dataset.splits["val"]) + len(dataset.splits["train"])
    assert np.isfinite(val["loss"]) and val["loss"] != whole["loss"]


# --- TensorBoard, help, completion ---------------------------------------------------------------

def test_tensorboard_logs_every_metric(tmp_path, corpus_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config([str(corpus_dir)], tmp_path / "tb", max_steps=20, tensorboard=True)
    pretrain(config_from_dict(cfg))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "tb") if "loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in logged]
    assert np.allclose([v for _, v in losses], [v for _, v in logged])
    assert [e.step for e in events.Scalars("val_bpb")] == [10, 20]


def test_tensorboard_missing_is_a_clear_error(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = tiny_config([str(corpus_dir)], tmp_path / "tb", max_steps=5, tensorboard=True)
    (tmp_path / "tb.yaml").write_text(json.dumps(cfg))
    code, _, err = run_cli(["pretrain", tmp_path / "tb.yaml"], capsys)
    assert code == 2 and "pip install 'gptcli[tensorboard]'" in err
    assert not (tmp_path / "tb").exists()


COMMANDS = ["tokenize", "pretrain", "finetune", "eval", "sample", "plot", "runs", "info", "import-hf", "export-hf"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "Example" in out and f"gptcli {command}" in out


def test_shell_completion_is_offered(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
