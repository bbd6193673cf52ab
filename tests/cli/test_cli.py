"""The command line: smoke runs of every command, and bad input giving one line and exit 2."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli


def _snapshot(root):
    """Every path under root with its size and modification time."""
    return {(p, p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def trained_run(tmp_path, corpus_dir, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"out_dir: runs/tiny\ndata: {{inputs: ['{corpus_dir}'], tokenizer: bytes}}\n"
        "model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 32}\n"
        "train: {batch_size: 4, max_steps: 20, eval_every: 10, eval_batches: 2, save_every: 10,"
        " log_every: 5, precision: fp32, device: cpu}\n"
    )
    code, out, err = run_cli(["pretrain", config, "--set", "train.lr=2e-3"], capsys)
    assert code == 0, err
    return config


def test_pretrain_and_sample_smoke(trained_run, tmp_path, capsys):
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "latest").is_file()
    code, out, err = run_cli(["sample", "--prompt", "def ", "-n", "20", "--seed", "0"], capsys)
    assert code == 0, err
    assert out.startswith("def ") and "checkpoint:" in err and "checkpoint" not in out
    code, out, _ = run_cli(["sample", "-c", "runs/tiny", "-p", "x", "-n", "8", "--json",
                            "--num-samples", "3", "--top-k", "5", "--top-p", "0.9", "--seed", "1"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all(len(r["tokens"]) <= 8 for r in rows)
    greedy = [run_cli(["sample", "-p", "x", "-n", "8", "--greedy", "--json"], capsys) for _ in range(2)]
    assert [code for code, _, _ in greedy] == [0, 0], greedy[0][2]
    assert greedy[0][1] == greedy[1][1] and json.loads(greedy[0][1])["tokens"]  # the same, not empty
    code, out, err = run_cli(["sample", "-p", "x", "-n", "8", "--precision", "bf16", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["tokens"]) <= 8, err


def test_long_prompt_is_cropped_with_notice(trained_run, capsys):
    code, out, err = run_cli(["sample", "-p", "a" * 100, "-n", "4", "--seed", "0"], capsys)
    assert code == 0 and "keeping its last 32" in err


def test_tokenize_smoke(corpus_dir, tmp_path, capsys):
    code, _, err = run_cli(["tokenize", corpus_dir, "--out", tmp_path / "tok", "--tokenizer", "char"], capsys)
    assert code == 0, err
    assert "train" in err and "MB/s" in err
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {".gptcli", "meta.json", "train-00000.bin", "val-00000.bin", "tokenizer"}


def test_python_dash_m_and_console_script(tmp_path):
    """The real entry points, in a subprocess: help works; a user error is one line, exit 2."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "gptcli", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "pretrain" in done.stdout
    done = subprocess.run([sys.executable, "-m", "gptcli", "pretrain", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


BAD = [
    (["pretrain", "{tmp}/missing.yaml"], "does not exist"),
    (["pretrain", "{tmp}/list.yaml"], "top level must be a mapping"),
    (["pretrain", "{tmp}/scalar.yaml"], "top level must be a mapping"),
    (["pretrain", "{tmp}/tabs.yaml"], "invalid YAML"),
    (["pretrain", "{tmp}/dupes.yaml"], "duplicate key"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "train.lr"], "expected KEY=VALUE"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "train.nope=1"], "train.nope: unknown key"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "train.lr=abc"], "train.lr: expected a number"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "model.n_embd=33"], "not divisible by model.n_head"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "model.block_size=0"], "block_size: must be at least 1"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "train.batch_size=-1"], "batch_size: must be at least 1"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.val_fraction=2"], "val_fraction: must be in (0, 1)"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.tokenizer=nope"], "unknown tokenizer 'nope'"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.inputs=[{tmp}/nothing]"], "has no text files"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.inputs=[{tmp}/empty.txt]"], "is empty"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.inputs=[{tmp}/latin1.txt]"], "invalid UTF-8 at byte 9"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "data.inputs=[{tmp}/notthere.txt]"], "does not exist"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "model.vocab_size=7"], "model.vocab_size is 7"),
    (["pretrain", "{tmp}/ok.yaml", "--set", "train.device=cuda:3"], "train.device"),
    (["pretrain", "{tmp}/ok.yaml", "--resume"], "no checkpoint to resume"),
    (["tokenize", "{tmp}/blob.bin", "--out", "{tmp}/o", "--tokenizer", "bytes"], "looks like a binary file"),
    (["tokenize", "{tmp}/notthere.txt", "--out", "{tmp}/o"], "does not exist"),
    (["tokenize", "{tmp}/good.txt", "--out", "{tmp}/afile", "--tokenizer", "bytes"], "is a file"),
    (["tokenize", "{tmp}/good.txt", "--out", "{tmp}/o", "--val-fraction", "0"], "--val-fraction"),
    (["tokenize", "{tmp}/good.txt", "--out", "{tmp}/o", "--tokenizer", "nope"], "unknown tokenizer"),
    (["tokenize", "{tmp}/good.txt", "--out", "{tmp}/o", "--train-bpe", "10"], "--train-bpe"),
    (["sample", "-c", "{tmp}/nowhere"], "does not exist"),
    (["sample", "-c", "{tmp}/nothing"], "neither a checkpoint nor a run directory"),
    (["sample"], "no trained run found"),
    (["sample", "-c", "{tmp}/nothing", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["sample", "-c", "{tmp}/nothing", "--temperature", "-1"], "--temperature must be 0"),
    (["sample", "-c", "{tmp}/nothing", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["sample", "-c", "{tmp}/nothing", "--top-k", "0"], "--top-k must be at least 1"),
    (["sample", "-c", "{tmp}/nothing", "--precision", "fp64"], "--precision must be auto, fp32, bf16, fp16"),
    (["sample", "-c", "{ckpt}", "--precision", "fp16"], "--precision: fp16 is for GPUs"),
    (["sample", "-c", "{ckpt}", "-p", "<|endoftext|>"], "contains the special token <|endoftext|>"),
    (["sample", "-c", "{tmp}/notok"], "tokenizer.json is missing"),
    (["sample", "-c", "{ckpt}", "--device", "cuda"], "no CUDA GPU is available"),
    (["finetune", "{tmp}/ft.yaml"], "does not exist"),
    (["finetune", "{tmp}/ft.yaml", "--task", "bogus"], "expected one of classify, lm, instruct"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.lora.rank=-1"], "lora.rank: must be 0 or more"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={ckpt}", "--set", "model.block_size=4096"],
     "beyond the checkpoint's context"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={ckpt}", "--set", "model.n_embd=64"],
     "model.n_embd: the checkpoint has 32"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={tmp}/nothing"], "neither a checkpoint"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={ckpt}", "--set", "finetune.train_file="],
     "finetune.train_file: required"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={ckpt}", "--set",
      "finetune.train_file={tmp}/onelabel.csv"], "1 class(es)"),
    (["finetune", "{tmp}/ft.yaml", "--set", "finetune.init_from={ckpt}", "--task", "instruct", "--set",
      "finetune.train_file={tmp}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    (["finetune", "--task", "lm"], "no pretrained run found under runs/"),
    (["finetune", "--task", "classify"], "no pretrained run found under runs/"),
    (["eval", "-c", "{ckpt}", "--data", "{tmp}/missing.csv"], "does not exist"),
    (["eval", "-c", "{ckpt}", "--split", "bogus"], "--split: 'bogus' is not one of all, train, val"),
    (["eval", "-c", "{ckpt}", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "-c", "{ckpt}", "--data", "{tmp}/good.txt", "--split", "val"], "raw text is evaluated whole"),
    (["eval", "-c", "{ckpt}", "--precision", "fp16"], "fp16 is for GPUs"),
    (["plot", "{tmp}/nothing"], "has no metrics.jsonl"),
    (["plot", "{run}", "--out", "{tmp}/loss.jpg"], "should end in .png"),
    (["plot", "{run}", "--x", "time"], "--x: 'time' is not one of step, tokens"),
    (["plot", "{run}", "--out", "{tmp}/afile/loss.png"], "--out: cannot write"),
    (["eval", "-c", "{ckpt}", "--data", "{tmp}/blank.jsonl"], "holds no text to evaluate"),
    (["runs", "{tmp}/good.txt"], "is not a directory"),
    (["info", "{tmp}/nowhere"], "does not exist"),
    (["info", "{tmp}/good.txt"], "neither a checkpoint nor a run directory"),
    (["import-hf", "{tmp}/pickled", "--out", "{tmp}/imported"], "only pytorch_model.bin"),
    (["import-hf", "{tmp}/good.txt", "--out", "{tmp}/imported"], "is not a directory"),
    (["import-hf", "{tmp}/pickled", "--out", "{tmp}/afile"], "is a file"),
    (["export-hf", "{tmp}/nowhere", "--out", "{tmp}/exported"], "does not exist"),
    (["export-hf", "{ckpt}", "--out", "{tmp}/afile"], "is a file"),
    (["export-hf", "{tmp}/notok", "--out", "{tmp}/exported"], "tokenizer.json is missing"),
]


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    """A tiny trained checkpoint, made once for the bad-input table."""
    from conftest import PY_SNIPPETS

    from gptcli.config import config_from_dict
    from gptcli.store.rundir import resolve_checkpoint
    from gptcli.tasks.pretrain import pretrain

    root = tmp_path_factory.mktemp("lm")
    for i in range(20):
        (root / f"f{i}.py").write_text("".join(PY_SNIPPETS) * 2)
    cfg = {"out_dir": str(root / "run"), "data": {"inputs": [str(root / "f*.py")], "tokenizer": "bytes"},
           "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
           "train": {"batch_size": 2, "max_steps": 2, "device": "cpu", "precision": "fp32"}}
    previous = os.environ.get("GPTCLI_CACHE")
    os.environ["GPTCLI_CACHE"] = str(root / "cache")
    try:
        pretrain(config_from_dict(cfg))
    finally:
        os.environ.pop("GPTCLI_CACHE")
        if previous is not None:
            os.environ["GPTCLI_CACHE"] = previous
    return resolve_checkpoint(root / "run")


def test_bad_input_table_covers_every_command():
    commands = {args[0] for args, _ in BAD}
    assert len(BAD) >= 40 and commands == {"tokenize", "pretrain", "finetune", "sample", "eval",
                                           "import-hf", "export-hf", "plot", "runs", "info"}


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:3]) + " " + m[:20] for a, m in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, lm_ckpt, args, message):
    import shutil

    shutil.copytree(lm_ckpt, tmp_path / "notok")
    shutil.rmtree(tmp_path / "notok" / "tokenizer")
    (tmp_path / "ft.yaml").write_text(f"out_dir: {tmp_path}/ft\nfinetune: {{task: classify, init_from: "
                                      f"{tmp_path}/nowhere, train_file: {tmp_path}/onelabel.csv}}\n")
    (tmp_path / "onelabel.csv").write_text("text,label\n" + "some text,a\n" * 20)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "scalar.yaml").write_text("hello\n")
    (tmp_path / "tabs.yaml").write_text("train:\n\tlr: 1\n")
    (tmp_path / "dupes.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "good.txt").write_text("hello world\n" * 50)
    (tmp_path / "ok.yaml").write_text(f"out_dir: {tmp_path}/run\ndata: {{inputs: ['{tmp_path}/good.txt'], "
                                      "tokenizer: bytes}\nmodel: {n_layer: 1, n_head: 2, n_embd: 32, "
                                      "block_size: 16}\ntrain: {device: cpu, precision: fp32}\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("hello café\n".encode("latin-1") * 20)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "nothing").mkdir()
    before = _snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(lm_ckpt))
            .replace("{run}", str(lm_ckpt.parent.parent)) for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, and the last
    assert message in errors[0]
    assert "Traceback" not in err and out == ""
    # Nothing created, changed or deleted (a finished tokenization cache entry may be kept).
    assert {s for s in _snapshot(tmp_path) if "cache" not in s[0].parts} == before
