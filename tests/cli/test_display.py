"""The training and progress displays, and what the end of a run says: the time left, the
loss plot, which step the final tables describe, nothing half-drawn before an error."""

import io
import sys

import yaml
from conftest import run_cli, tiny_config
from rich.console import Console

from gptcli.cli import display as display_module
from gptcli.cli.display import TrainDisplay
from gptcli.events import CheckpointSaved, EvalDone, RunFinished, RunStarted, StepLogged
from gptcli.tasks.run import RunResult


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step_metrics(step: int) -> dict:
    return {"step": step, "loss": 2.5, "lr": 1e-3, "tokens_per_sec": 1000.0, "mfu": 0.01}


def log_steps(display: TrainDisplay, clock: FakeClock, max_steps: int = 900) -> None:
    """A run of `max_steps` whose first 10 steps took 100 s (start-up, compiling) and whose
    next 10 took 10 s."""
    display(RunStarted("runs/x", {}, max_steps=max_steps, start_step=0))
    clock.now = 100.0
    display(StepLogged(step_metrics(10)))
    clock.now = 110.0
    display(StepLogged(step_metrics(20)))


# --- the time left ------------------------------------------------------------------------

def test_eta_is_shown_from_the_first_logged_steps_without_the_start_up(capsys):
    clock = FakeClock()
    log_steps(TrainDisplay(clock=clock), clock)
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step")]
    assert steps[0].endswith("ETA 2:28:20"), steps  # 890 steps at the 10 per 100 s seen so far
    assert steps[1].endswith("ETA 0:14:40"), steps  # 880 steps at 1 per s: the rate after step 10


def test_eta_of_a_resumed_run_counts_only_its_own_steps(capsys):
    clock = FakeClock()
    display = TrainDisplay(clock=clock)
    display(RunStarted("runs/x", {}, max_steps=900, start_step=500))
    clock.now = 50.0
    display(StepLogged(step_metrics(510)))
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step")]
    assert steps[0].endswith("ETA 0:32:30"), steps  # 390 steps at 10 per 50 s


def test_live_eta_counts_down_between_logged_steps(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(display_module, "console", terminal)
    clock = FakeClock()
    display = TrainDisplay(clock=clock)
    try:
        log_steps(display, clock)
        clock.now = 150.0  # 40 s after the last logged step
        shown = Console(file=io.StringIO(), width=200)
        shown.print(display.progress.get_renderable())
        assert "ETA 0:14:00" in shown.file.getvalue()
        assert "-:--:--" not in shown.file.getvalue()
    finally:
        display.close()


# --- nothing half-drawn before an error ---------------------------------------------------

def test_tokenize_error_off_a_terminal_is_the_only_line(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    code, out, err = run_cli(["tokenize", tmp_path / "blob.bin", "--out", tmp_path / "o", "--tokenizer", "bytes"],
                             capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("error: ") and "binary" in err


def test_tokenize_off_a_terminal_prints_its_finished_progress_line(corpus_dir, tmp_path, capsys):
    code, _, err = run_cli(["tokenize", corpus_dir, "--out", tmp_path / "o", "--tokenizer", "bytes"], capsys)
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("tokenizing")]
    assert len(progress) == 1 and "100%" in progress[0] and "40/40 files" in progress[0]


# --- the loss plot at the end of a run ----------------------------------------------------

def pretrain_tiny(tmp_path, corpus_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config([str(corpus_dir)], "runs/tiny", max_steps=4, eval_every=2,
                                                 save_every=2, log_every=2)))
    code, _, err = run_cli(["pretrain", config], capsys)
    assert code == 0, err
    return err


def test_the_run_end_names_the_loss_plot(tmp_path, corpus_dir, capsys):
    err = pretrain_tiny(tmp_path, corpus_dir, capsys)
    lines = err.splitlines()
    assert "loss plot: runs/tiny/loss.png" in lines, err
    assert lines.index("loss plot: runs/tiny/loss.png") == len(lines) - 1  # after the done line
    assert (tmp_path / "runs" / "tiny" / "loss.png").is_file()


def test_without_matplotlib_the_run_end_says_how_to_get_the_plot(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    err = pretrain_tiny(tmp_path, corpus_dir, capsys)
    plot = [line for line in err.splitlines() if line.startswith("loss plot:")]
    assert len(plot) == 1, err
    assert "pip install 'gptcli[plot]'" in plot[0]
    assert plot[0].endswith("then gptcli plot runs/tiny --out runs/tiny/loss.png")
    assert not (tmp_path / "runs" / "tiny" / "loss.png").exists()


# --- which step the end-of-finetune tables describe ---------------------------------------

def classify_metrics(step: int, accuracy: float, best: bool) -> dict:
    return {"step": step, "val_loss": 0.5, "val_accuracy": accuracy, "val_macro_f1": accuracy,
            "val_majority_baseline": 0.5, "per_class": {
                "a": {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 10},
                "b": {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 10}},
            "confusion": [[9, 1], [1, 9]], "best": best, "metric": "val_accuracy"}


def fake_finetune(evals: list[tuple[int, float, bool]]):
    """A finetune that only reports: an evaluation and a checkpoint per (step, accuracy, best)."""

    def run(cfg, resume, overwrite, on_event):
        on_event(RunStarted("runs/cls", {}, max_steps=evals[-1][0], start_step=0))
        best_accuracy = None
        for step, accuracy, best in evals:
            on_event(EvalDone(classify_metrics(step, accuracy, best)))
            on_event(CheckpointSaved(f"runs/cls/checkpoints/step-{step:06d}", step, best=best))
            best_accuracy = accuracy if best else best_accuracy
        on_event(RunFinished())
        return RunResult(run_dir=cfg, task="classify", steps=evals[-1][0], metric="val_accuracy",
                         best_metric=best_accuracy, seconds=1.0)

    return run


def finetune_with(evals, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plot: this is about the tables
    monkeypatch.setattr("gptcli.config.load_config", lambda *args: tmp_path / "runs" / "cls")
    monkeypatch.setattr("gptcli.tasks.finetune.finetune", fake_finetune(evals))
    code, _, err = run_cli(["finetune", tmp_path / "ft.yaml"], capsys)
    assert code == 0, err
    return err


def test_finetune_tables_say_their_step_and_where_the_best_is(tmp_path, capsys, monkeypatch):
    err = finetune_with([(200, 0.95, True), (300, 0.90, False)], tmp_path, capsys, monkeypatch)
    heading = next(line for line in err.splitlines() if line.startswith("validation at step"))
    assert heading == ("validation at step 300 (the last); the best was step 200: "
                       "runs/cls/checkpoints/step-000200 (checkpoints/best)")
    assert err.index(heading) < err.index("accuracy 0.9000  macro-F1")  # above the tables it describes
    done = next(line for line in err.splitlines() if line.startswith("done: "))
    assert "best val_accuracy 0.9500 at step 200" in done


def test_finetune_tables_of_the_best_step_say_so(tmp_path, capsys, monkeypatch):
    err = finetune_with([(100, 0.80, True), (200, 0.95, True)], tmp_path, capsys, monkeypatch)
    assert "validation at step 200 (the last, and the best: checkpoints/best)" in err.splitlines()



# --- the tokenize table -------------------------------------------------------------------

def split_rows(err: str) -> dict[str, list[str]]:
    """The cells of the tokenize table's train and val rows."""
    rows = {}
    for line in err.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells[0] in ("train", "val"):
            rows[cells[0]] = cells
    return rows


def test_tokenize_table_of_one_text_file_says_it_was_split_by_position(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "one.txt").write_text("a line of text\n" * 100)
    code, _, err = run_cli(["tokenize", tmp_path / "one.txt", "--out", tmp_path / "o", "--tokenizer", "bytes"],
                           capsys)
    assert code == 0, err
    rows = split_rows(err)
    assert rows["train"][1] == rows["val"][1] == "1 (split by position)", err


def test_tokenize_table_counts_documents_of_a_corpus_of_many(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, _, err = run_cli(["tokenize", corpus_dir, "--out", tmp_path / "o", "--tokenizer", "bytes"], capsys)
    assert code == 0, err
    rows = split_rows(err)
    assert (rows["train"][1], rows["val"][1]) == ("36", "4"), err
