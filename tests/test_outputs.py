"""Never lose a user's data: what --overwrite may replace, overlaps with inputs, the run lock,
file outputs, precision kept on resume, full and read-only filesystems."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, tiny_config

from gptcli.config import config_from_dict
from gptcli.data.tokenized.shards import tokenize_corpus
from gptcli.errors import GptcliError
from gptcli.events import Notice
from gptcli.model.gpt import GPT
from gptcli.outputs import LOCK_FILE, MARKER
from gptcli.store.rundir import read_pointer
from gptcli.tasks.pretrain import pretrain

SRC = Path(__file__).resolve().parents[1] / "src"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, which gptcli did not create."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work\n")
    (path / "notes" / "ideas.md").write_text("more work\n")
    return path


def quick(corpus_dir, out_dir, **train):
    return config_from_dict(tiny_config([str(corpus_dir)], out_dir, **{"max_steps": 4, "save_every": 4,
                                                                        "eval_every": 4, **train}))


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- what --overwrite may replace --------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_gptcli_did_not_create_is_never_touched(tmp_path, corpus_dir, capsys, flags):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    config = write_config(tmp_path / "c.yaml", tiny_config([str(corpus_dir)], folder))
    code, _, err = run_cli(["pretrain", config, *flags], capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "did not create" in err and "--overwrite" not in err
    assert snapshot(folder) == before


def test_current_directory_and_its_ancestors_are_never_replaced(tmp_path, corpus_dir, monkeypatch):
    run = tmp_path / "work" / "run"
    pretrain(quick(corpus_dir, run))
    before = snapshot(run)
    monkeypatch.chdir(run)
    with pytest.raises(GptcliError, match="cannot be replaced: it is the current directory"):
        pretrain(quick(corpus_dir, "."), overwrite=True)
    (tmp_path / "work" / MARKER).write_text(json.dumps({"kind": "run"}))  # even if it looks like a run
    with pytest.raises(GptcliError, match="cannot be replaced: it contains the current directory"):
        pretrain(quick(corpus_dir, ".."), overwrite=True)
    assert snapshot(run) == before


def test_home_directory_is_never_replaced(tmp_path, corpus_dir, monkeypatch):
    home = tmp_path / "home"
    pretrain(quick(corpus_dir, home))  # a marked run that happens to be $HOME
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(GptcliError, match="it is your home directory"):
        pretrain(quick(corpus_dir, "~"), overwrite=True)
    assert read_pointer(home, "latest") is not None


def test_the_filesystem_root_is_never_replaced(tmp_path, corpus_dir):
    from gptcli.outputs import protected_reason

    with pytest.raises(GptcliError, match="contains the input"):
        pretrain(quick(corpus_dir, "/"), overwrite=True)
    assert protected_reason(Path("/")) == "it is the filesystem root"  # even if it were marked


def test_an_output_never_overlaps_an_input(tmp_path, corpus_dir):
    before = snapshot(corpus_dir)
    with pytest.raises(GptcliError, match="contains the input"):
        tokenize_corpus([str(corpus_dir)], corpus_dir, tokenizer="bytes", overwrite=True)
    with pytest.raises(GptcliError, match="is inside the input"):
        tokenize_corpus([str(corpus_dir)], corpus_dir / "tokens", tokenizer="bytes")
    with pytest.raises(GptcliError, match="is inside the input"):
        pretrain(quick(corpus_dir, corpus_dir / "run"))
    with pytest.raises(GptcliError, match="contains the input"):
        pretrain(quick(corpus_dir, tmp_path), overwrite=True)
    assert snapshot(corpus_dir) == before and not (corpus_dir / "tokens").exists()
    data = tmp_path / "data"
    tokenize_corpus([str(corpus_dir)], data, tokenizer="bytes")
    cfg = tiny_config([str(data)], data)
    with pytest.raises(GptcliError, match="contains the input"):
        pretrain(config_from_dict(cfg), overwrite=True)
    assert (data / "meta.json").is_file()


def test_glob_and_stdlib_inputs_count_as_inputs(tmp_path, corpus_dir):
    with pytest.raises(GptcliError, match="contains the input"):
        tokenize_corpus([f"{corpus_dir}/**/*.py"], corpus_dir / "pkg", tokenizer="bytes", overwrite=True)
    tokenize_corpus([f"{corpus_dir}/*.py"], corpus_dir / "pkg" / "out", tokenizer="bytes")  # beside its files
    import sysconfig

    with pytest.raises(GptcliError, match="is inside the input"):
        tokenize_corpus(["stdlib"], Path(sysconfig.get_paths()["stdlib"]) / "gptcli-out", tokenizer="bytes")


def test_finetune_refuses_to_replace_its_own_base_run(tmp_path, corpus_dir, capsys):
    base = tmp_path / "runs" / "demo"
    pretrain(quick(corpus_dir, base))
    before = snapshot(base)
    lm = {"out_dir": str(base), "finetune": {"task": "lm", "init_from": str(base)},
          "data": {"inputs": [str(corpus_dir)]},
          "train": {"max_steps": 2, "device": "cpu", "precision": "fp32", "compile": "off"}}
    code, _, err = run_cli(["finetune", write_config(tmp_path / "ft.yaml", lm), "--overwrite"], capsys)
    assert code == 2 and "contains the input" in err and "Traceback" not in err
    assert snapshot(base) == before


def test_tokenize_replaces_only_a_tokenized_directory(tmp_path, corpus_dir):
    out = tmp_path / "tokens"
    tokenize_corpus([str(corpus_dir)], out, tokenizer="bytes")
    assert json.loads((out / MARKER).read_text())["kind"] == "tokenized"
    with pytest.raises(GptcliError, match="already holds a tokenized dataset; pass --overwrite"):
        tokenize_corpus([str(corpus_dir)], out, tokenizer="char")
    tokenize_corpus([str(corpus_dir)], out, tokenizer="char", overwrite=True)
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["name"].startswith("char")
    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run))
    with pytest.raises(GptcliError, match="holds a training run, not a tokenized dataset"):
        tokenize_corpus([str(corpus_dir)], run, tokenizer="bytes", overwrite=True)
    assert read_pointer(run, "latest") is not None


def test_export_and_import_replace_only_their_own_output(tmp_path, corpus_dir):
    from gptcli.store.hf import export_hf, import_hf
    from gptcli.store.rundir import resolve_checkpoint

    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run))
    checkpoint = resolve_checkpoint(run)
    export_hf(checkpoint, tmp_path / "hf")
    export_hf(checkpoint, tmp_path / "hf", overwrite=True)
    with pytest.raises(GptcliError, match="already holds a Hugging Face export; pass --overwrite"):
        export_hf(checkpoint, tmp_path / "hf")
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(GptcliError, match="did not create"):
        export_hf(checkpoint, mine, overwrite=True)
    with pytest.raises(GptcliError, match="is inside the input"):
        export_hf(checkpoint, run / "checkpoints" / "hf")
    assert snapshot(mine) == before
    with pytest.raises(GptcliError, match="did not create"):
        import_hf(tmp_path / "hf", mine, overwrite=True)
    assert snapshot(mine) == before


# --- replacing a run: built beside, never leaving the user with neither -----------------


def test_overwrite_replaces_a_run_and_leaves_no_backup(tmp_path, corpus_dir):
    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run, max_steps=4))
    pretrain(quick(corpus_dir, run, max_steps=8, save_every=8, eval_every=8), overwrite=True)
    assert read_pointer(run, "latest").name == "step-000008"
    assert not (run / "checkpoints" / "step-000004").exists()
    assert not list(tmp_path.glob(".run.replaced-*"))
    assert json.loads((run / MARKER).read_text())["kind"] == "run"


def test_a_failed_overwrite_puts_the_old_run_back(tmp_path, corpus_dir, monkeypatch):
    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run))
    before = snapshot(run)

    def explode(self, idx, targets=None):
        raise RuntimeError("a bug in the new run")

    monkeypatch.setattr(GPT, "forward", explode)
    events = []
    with pytest.raises(RuntimeError, match="a bug in the new run"):
        pretrain(quick(corpus_dir, run, precision="fp32"), overwrite=True, on_event=events.append)
    after = snapshot(run)
    after.pop(LOCK_FILE, None), before.pop(LOCK_FILE, None)  # holds the pid of the last holder
    assert after == before
    assert any("was put back" in e.message for e in events if isinstance(e, Notice))
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_a_refused_config_leaves_no_folder_behind(tmp_path, corpus_dir):
    cfg = tiny_config([str(corpus_dir)], tmp_path / "new" / "run", max_steps=4)
    cfg["model"]["block_size"] = 100_000  # longer than the corpus: refused after the claim
    with pytest.raises(GptcliError, match="too few for model.block_size"):
        pretrain(config_from_dict(cfg))
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg["out_dir"] = str(empty)
    with pytest.raises(GptcliError, match="too few for model.block_size"):
        pretrain(config_from_dict(cfg))
    assert list(empty.iterdir()) == []


def test_symlinked_out_dir_is_resolved(tmp_path, corpus_dir):
    real = tmp_path / "disk" / "run"
    pretrain(quick(corpus_dir, real))
    link = tmp_path / "link"
    link.symlink_to(real)
    pretrain(quick(corpus_dir, link, max_steps=8, save_every=8, eval_every=8), overwrite=True)
    assert link.is_symlink() and read_pointer(link, "latest").name == "step-000008"
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    (tmp_path / "to-mine").symlink_to(mine)
    with pytest.raises(GptcliError, match="did not create"):
        pretrain(quick(corpus_dir, tmp_path / "to-mine"), overwrite=True)
    assert snapshot(mine) == before
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(GptcliError, match="cannot be resolved"):
        pretrain(quick(corpus_dir, loop), overwrite=True)


def test_tilde_in_yaml_and_set_is_expanded(tmp_path, corpus_dir, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = write_config(tmp_path / "c.yaml", tiny_config([str(corpus_dir)], "~/runs/a", max_steps=2))
    code, _, err = run_cli(["pretrain", config], capsys)
    assert code == 0, err
    assert read_pointer(tmp_path / "home" / "runs" / "a", "latest") is not None
    code, _, err = run_cli(["pretrain", config, "--set", "out_dir=~/runs/b"], capsys)
    assert code == 0 and read_pointer(tmp_path / "home" / "runs" / "b", "latest") is not None
    assert not (tmp_path / "~").exists()


# --- file outputs never overwrite an input ----------------------------------------------


def test_file_outputs_never_overwrite_inputs(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run))
    code, _, err = run_cli(["plot", run, "--out", tmp_path], capsys)
    assert code == 2 and "should end in .png" in err
    (tmp_path / "dir.png").mkdir()
    code, _, err = run_cli(["plot", run, "--out", tmp_path / "dir.png"], capsys)
    assert code == 2 and "is a directory" in err
    from gptcli.outputs import check_output_file, input_paths

    data = tmp_path / "test.csv"
    data.write_text("text,label\na,x\n")
    with pytest.raises(GptcliError, match="would overwrite the input"):
        check_output_file(data, input_paths([data, run]), "--predictions")
    with pytest.raises(GptcliError, match="would overwrite the input"):
        check_output_file(run / "checkpoints" / "p.csv", input_paths([data, run]), "--predictions")
    assert data.read_text() == "text,label\na,x\n"


# --- one writer per run -----------------------------------------------------------------


def test_a_second_process_on_a_running_run_is_refused(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    cfg = tiny_config([str(corpus_dir)], run, max_steps=100_000, save_every=5, eval_every=1000)
    config = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    trainer = subprocess.Popen([sys.executable, "-m", "gptcli", "pretrain", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while read_pointer(run, "latest") is None:  # training, with a checkpoint to resume from
            assert trainer.poll() is None, trainer.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.2)
        for flags in ([], ["--resume"], ["--overwrite"]):
            code, _, err = run_cli(["pretrain", config, *flags], capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert f"is in use: pid {trainer.pid} on host" in err
        assert read_pointer(run, "latest") is not None
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    cfg["train"]["max_steps"] = int(read_pointer(run, "latest").name.removeprefix("step-")) + 1
    code, _, err = run_cli(["pretrain", write_config(config, cfg), "--resume"], capsys)
    assert code == 0, err  # kill -9 left no stale lock


# --- resume keeps its precision ---------------------------------------------------------


def test_resume_keeps_the_precision_the_run_started_with(tmp_path, corpus_dir, monkeypatch):
    from gptcli.train import loop as train_module

    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run, precision="bf16"))
    # From now on the CPU timing trial of `auto` would pick fp32.
    monkeypatch.setattr(train_module, "cpu_step_timer",
                        lambda model, data: lambda p: 1.0 if p.name == "fp32" else 2.0)
    events = []
    pretrain(quick(corpus_dir, run, precision="auto", max_steps=6), resume=True, on_event=events.append)
    trainer = json.loads((read_pointer(run, "latest") / "trainer.json").read_text())
    assert trainer["precision"] == "bf16"
    pretrain(quick(corpus_dir, run, precision="fp32", max_steps=8), resume=True, on_event=events.append)
    trainer = json.loads((read_pointer(run, "latest") / "trainer.json").read_text())
    assert trainer["precision"] == "fp32"
    assert any("trained in bf16; continuing in fp32" in e.message for e in events if isinstance(e, Notice))


# --- full and read-only filesystems (real ones: a small tmpfs, mounted as root) ---------


def mounted(path: Path, options: str):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "gptcli-test", str(path)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        mounted(path, options)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, corpus_dir, capsys, tmpfs):
    disk = tmpfs("small", "size=2m")
    cfg = tiny_config([str(corpus_dir)], disk / "run", max_steps=40, save_every=1, eval_every=1000)
    cfg["model"].update(n_embd=64, n_head=2)  # 0.12M parameters: ~1.5 MB per checkpoint with its moments
    code, _, err = run_cli(["pretrain", write_config(tmp_path / "c.yaml", cfg)], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "--resume" in errors[0]
    from gptcli.store.checkpoint import load_model

    load_model(read_pointer(disk / "run", "latest"))  # the last good checkpoint is intact


def test_read_only_out_dir_is_one_line(tmp_path, corpus_dir, capsys, tmpfs):
    disk = tmpfs("ro", "ro,size=64k")
    config = write_config(tmp_path / "c.yaml", tiny_config([str(corpus_dir)], disk / "run"))
    code, _, err = run_cli(["pretrain", config], capsys)
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err, err
    code, _, err = run_cli(["tokenize", corpus_dir, "--out", disk / "tokens", "--tokenizer", "bytes"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err, err


def test_a_run_left_aside_by_a_killed_overwrite_is_named_but_never_listed(tmp_path, corpus_dir):
    import shutil

    from gptcli.store.rundir import find_latest_run
    from gptcli.store.runlog import find_runs

    runs = tmp_path / "runs"
    pretrain(quick(corpus_dir, runs / "a"))
    shutil.copytree(runs / "a", runs / ".a.replaced-4242")  # what kill -9 mid --overwrite leaves
    os.utime(runs / ".a.replaced-4242" / "checkpoints" / "latest")  # newest: still not picked
    assert [r.path.name for r in find_runs(runs)] == ["a"]
    assert find_latest_run(runs) == runs / "a"
    events = []
    pretrain(quick(corpus_dir, runs / "a"), overwrite=True, on_event=events.append)
    assert any(".a.replaced-4242 holds a run that an interrupted --overwrite moved aside" in e.message
               for e in events if isinstance(e, Notice))


# --- failure paths of a claim (review findings) ------------------------------------------


def test_overwrite_of_a_mount_point_is_one_line_and_keeps_the_run(tmp_path, corpus_dir, capsys, tmpfs):
    volume = tmpfs("volume", "size=8m")  # e.g. a Docker volume used as out_dir
    config = write_config(tmp_path / "c.yaml", tiny_config([str(corpus_dir)], volume, max_steps=2))
    assert run_cli(["pretrain", config], capsys)[0] == 0
    (volume / "notes.txt").write_text("mine\n")
    before = snapshot(volume)
    code, _, err = run_cli(["pretrain", config, "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "it is a mount point" in err, err
    after = snapshot(volume)
    after.pop(LOCK_FILE), before.pop(LOCK_FILE)
    assert after == before and not list(tmp_path.glob(".volume.replaced-*"))


def test_a_failed_claim_removes_only_its_own_empty_folders(tmp_path):
    from gptcli.store.rundir import claim_run_dir

    claim = claim_run_dir(tmp_path / "new" / "a", resume=False, overwrite=False, inputs=[])
    other = tmp_path / "new" / "b"  # another process's run, made meanwhile under the same new folder
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    claim.close(failed=True)
    assert not (tmp_path / "new" / "a").exists()
    assert (other / "metrics.jsonl").read_text() == "{}\n"
    claim = claim_run_dir(tmp_path / "fresh" / "deeper", resume=False, overwrite=False, inputs=[])
    claim.close(failed=True)
    assert not (tmp_path / "fresh").exists()


def test_resuming_a_run_without_the_marker_does_not_make_it_replaceable(tmp_path, corpus_dir):
    run = tmp_path / "old-version-run"
    pretrain(quick(corpus_dir, run))
    (run / MARKER).unlink()  # as runs of gptcli versions before the marker
    (run / "notes.txt").write_text("mine\n")
    pretrain(quick(corpus_dir, run, max_steps=6), resume=True)
    assert not (run / MARKER).exists()
    with pytest.raises(GptcliError, match="did not create"):
        pretrain(quick(corpus_dir, run), overwrite=True)
    assert (run / "notes.txt").read_text() == "mine\n"


def test_sigterm_after_the_old_run_moved_aside_puts_it_back(tmp_path, corpus_dir):
    from gptcli.events import RunStarted

    run = tmp_path / "run"
    pretrain(quick(corpus_dir, run))
    before = snapshot(run)

    def terminate_at_start(event):  # the window between moving the old run and the first step
        if isinstance(event, RunStarted):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        pretrain(quick(corpus_dir, run, max_steps=50), overwrite=True, on_event=terminate_at_start)
    after = snapshot(run)
    after.pop(LOCK_FILE), before.pop(LOCK_FILE)
    assert after == before and not list(tmp_path.glob(".run.replaced-*"))


def test_a_first_save_that_fails_does_not_promise_a_checkpoint(tmp_path, corpus_dir, capsys, tmpfs):
    disk = tmpfs("tiny", "size=300k")
    cfg = tiny_config([str(corpus_dir)], disk / "run", max_steps=4, save_every=1, eval_every=1000)
    cfg["model"].update(n_embd=64, n_head=2)  # ~1.5 MB a checkpoint: the first does not fit
    code, _, err = run_cli(["pretrain", write_config(tmp_path / "c.yaml", cfg)], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "then start again (no checkpoint of this run was saved)" in errors[0]


def test_an_output_never_renames_the_current_directory_even_when_empty(tmp_path, corpus_dir, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(GptcliError, match="it is the current directory"):
        tokenize_corpus([str(corpus_dir)], ".", tokenizer="bytes")
    assert Path.cwd() == empty and list(empty.iterdir()) == []
