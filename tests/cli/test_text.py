"""Text is text: what users type or name is shown verbatim; `gptcli sample`'s text options
(escapes in --stop, prompts from stdin or a file, non-UTF-8 input, option ranges); and
per-class metrics that stay small however many classes there are."""

import io
import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.data.training.labelled import TextReading
from gptcli.evals.classify import DETAILED_CLASSES, classification_metrics
from gptcli.infer.sample import decode_escapes
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.runtime import Precision
from gptcli.store.checkpoint import save_checkpoint
from gptcli.tasks.classify import ClassifyData

WEIRD_RUNS = ["exp[lr=3e-4]", "odd[/]name:smile:"]  # a style tag, a closing tag, an emoji code
WEIRD_LABELS = ["[/]", "[neg]", "[pos]"]
TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=257)


def one_line_error(args, capsys, message):
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == ""


@pytest.fixture
def lm_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "lm", GPT(TINY), BytesTokenizer(), "# test model\n")


def classifier_checkpoint(path, labels):
    torch.manual_seed(0)
    return save_checkpoint(path, GPTClassifier(GPT(TINY), labels), BytesTokenizer(), "# test classifier\n")


# --- user text shown verbatim ---------------------------------------------------------------

@pytest.fixture
def weird_runs(tmp_path, corpus_dir, capsys):
    """Two tiny runs trained through the CLI under names rich would read as markup; returns
    {name: stderr of its training}."""
    trained = {}
    for name in WEIRD_RUNS:
        cfg = tiny_config([str(corpus_dir)], tmp_path / "runs" / name, max_steps=4, eval_every=2,
                          save_every=2, log_every=2)
        (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
        code, _, err = run_cli(["pretrain", tmp_path / "cfg.yaml"], capsys)
        assert code == 0, err
        trained[name] = err
    return trained


def test_run_names_are_shown_verbatim(tmp_path, weird_runs, capsys, monkeypatch):
    for name, err in weird_runs.items():
        run_dir = tmp_path / "runs" / name
        assert f"run → {run_dir}\n" in err  # the training header
        done = [line for line in err.splitlines() if line.startswith("done: ")]
        # Quoted for the shell: `[...]` is a glob there, and zsh refuses one that matches nothing.
        assert len(done) == 1 and f"--checkpoint '{run_dir}' " in done[0]
    for columns in ("80", "300"):  # names on lines of their own, and the one-row-per-run table
        monkeypatch.setenv("COLUMNS", columns)
        code, _, err = run_cli(["runs", tmp_path / "runs"], capsys)
        assert code == 0, err
        assert all(name in err for name in WEIRD_RUNS), err
    code, _, err = run_cli(["info", tmp_path / "runs" / WEIRD_RUNS[1]], capsys)
    assert code == 0 and f"{tmp_path / 'runs' / WEIRD_RUNS[1]}/checkpoints/step-000004" in err, err


def test_classifier_labels_are_shown_verbatim(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    checkpoint = classifier_checkpoint(tmp_path / "cls", WEIRD_LABELS)
    rows = ["text,label"] + [f"example {i},{WEIRD_LABELS[i % 3]}" for i in range(12)]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(["eval", "-c", checkpoint, "--data", tmp_path / "test.csv"], capsys)
    assert code == 0, err
    for label in WEIRD_LABELS:  # a per-class row, a confusion column and a confusion row each
        assert err.count(label) >= 3, err
    code, out, err = run_cli(["sample", "-c", checkpoint, "-p", "example 1"], capsys)
    assert code == 0 and out.strip() in WEIRD_LABELS, err
    assert all(f"  {label} " in err for label in WEIRD_LABELS), err
    code, _, err = run_cli(["info", checkpoint], capsys)
    assert code == 0 and ", ".join(WEIRD_LABELS) in err, err


def test_long_run_names_stay_whole_at_80_columns(tmp_path, capsys, monkeypatch):
    from gptcli.cli.display import console

    names = [f"sweep-{i}-" + "x" * 52 for i in range(3)]  # 60 characters each
    for i, name in enumerate(names):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps({
            "task": "classify", "parameters": 124_000_000, "max_steps": 2000, "metric": "val_accuracy",
            "status": "interrupted", "wall_seconds": 3725.0}))
        (tmp_path / "runs" / name / "metrics.jsonl").write_text(json.dumps({
            "step": 1500 + i, "tokens_seen": 12_300_000, "val_accuracy": 0.9, "best_val_accuracy": 0.9}) + "\n")
    monkeypatch.setenv("COLUMNS", "80")  # stderr is captured, so not a terminal: as when piped
    assert console.width == 80
    code, _, err = run_cli(["runs", "runs"], capsys)  # the working directory is tmp_path
    assert code == 0, err
    for i, name in enumerate(names):
        assert name in err.splitlines(), err  # a line of its own, uncut
        assert f"1,{500 + i}/2,000" in err and "accuracy 0.9000" in err and "interrupted" in err
    assert "…" not in err and max(map(len, err.splitlines())) <= 80


# --- gptcli sample: --stop escapes, prompt sources, option ranges ---------------------------

@pytest.mark.parametrize("typed, meant", [
    ("\\n\\n", "\n\n"),
    ("a\\tb\\r\\n", "a\tb\r\n"),
    ("\\\\n", "\\n"),  # an escaped backslash, then a plain n
    ("\\u00e9t\\u00E9 \\U0001F600", "été 😀"),
    ("café\\n日本語 ✓", "café\n日本語 ✓"),  # non-ASCII text survives
    ("\\q \\x41 \\u12 \\U00110000 end\\", "\\q \\x41 \\u12 \\U00110000 end\\"),  # not escapes: as typed
    ("plain", "plain"),
])
def test_decode_escapes(typed, meant):
    assert decode_escapes(typed) == meant


def test_stop_escapes_reach_the_sampler_and_are_documented(lm_checkpoint, capsys, monkeypatch):
    import gptcli.infer.sample
    from gptcli.infer.sample import Sample

    requests = []

    def fake_generate(loaded, request, on_text, on_event):
        requests.append(request)
        return [Sample("", [])], None  # the samples, and no speculation

    monkeypatch.setattr(gptcli.infer.sample, "_generate", fake_generate)
    code, _, err = run_cli(["sample", "-c", lm_checkpoint, "--stop", "\\n\\n", "--stop", "é\\t"], capsys)
    assert code == 0, err
    assert requests[0].stops == ["\n\n", "é\t"]
    code, out, _ = run_cli(["sample", "--help"], capsys)
    assert code == 0 and "\\n newline" in out and "\\uXXXX" in out


def test_prompt_from_stdin_and_from_a_file(tmp_path, lm_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo\n  wörld\n".encode())))
    code, out, err = run_cli(["sample", "-c", lm_checkpoint, "-p", "-", "-n", "4", "--greedy"], capsys)
    assert code == 0 and out.startswith("héllo\n  wörld\n"), err
    (tmp_path / "prompt.txt").write_bytes("\ufeffdef café():\n".encode())  # a byte-order mark is dropped
    code, out, err = run_cli(["sample", "-c", lm_checkpoint, "--prompt-file", tmp_path / "prompt.txt",
                              "-n", "4", "--greedy", "--json"], capsys)
    assert code == 0 and json.loads(out)["prompt"] == "def café():\n", err


def test_bad_prompts_are_one_line_errors(tmp_path, lm_checkpoint, capsys, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    one_line_error(["sample", "-c", lm_checkpoint, "--prompt-file", tmp_path / "missing.txt"], capsys,
                   "--prompt-file: " + str(tmp_path / "missing.txt") + " does not exist")
    one_line_error(["sample", "-c", lm_checkpoint, "--prompt-file", tmp_path], capsys, "is a directory")
    one_line_error(["sample", "-c", lm_checkpoint, "--prompt-file", tmp_path / "latin1.txt"], capsys,
                   "invalid UTF-8 at byte 3")
    one_line_error(["sample", "-c", lm_checkpoint, "-p", "x", "--prompt-file", tmp_path / "ok.txt"], capsys,
                   "--prompt and --prompt-file both given")
    one_line_error(["sample", "-c", lm_checkpoint, "-p", "abc\udcff"], capsys,  # argv bytes that are not UTF-8
                   "--prompt is not valid UTF-8 text (character 3 is '\\udcff')")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff")))
    one_line_error(["sample", "-c", lm_checkpoint, "-p", "-"], capsys,
                   "--prompt -: standard input: invalid UTF-8 at byte 3")


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "--temperature must be 0 (greedy) or more, and finite; got nan"),
    ("--temperature", "inf", "--temperature must be 0 (greedy) or more, and finite; got inf"),
    ("--seed", "-1", "--seed must be between 0 and 2**64 - 1"),
    ("--seed", str(2**64), "--seed must be between 0 and 2**64 - 1"),
    ("--stop", "", "--stop must not be empty"),
    ("--stop", "x\udcff", "--stop 'x\\udcff' is not valid UTF-8 text"),
])
def test_bad_sampling_options_are_one_line_errors(tmp_path, option, value, message, capsys):
    (tmp_path / "nothing").mkdir()  # option errors come before the checkpoint is looked at
    one_line_error(["sample", "-c", tmp_path / "nothing", option, value], capsys, message)


def test_the_largest_seed_works(lm_checkpoint, capsys):
    runs = [run_cli(["sample", "-c", lm_checkpoint, "-n", "8", "--seed", str(2**64 - 1)], capsys)
            for _ in range(2)]
    assert runs[0][0] == 0 and runs[0] == runs[1], runs[0][2]


# --- per-class metrics bounded in the number of classes ------------------------------------

def brute_force_per_class(y_true, y_pred, k):
    rows = {}
    for c in range(k):
        tp = int(np.sum((y_true == c) & (y_pred == c)))
        support, predicted = int(np.sum(y_true == c)), int(np.sum(y_pred == c))
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        rows[c] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
    return rows


def flat(per_class):
    """{(label, field): value}: pytest.approx compares flat mappings only."""
    return {(label, key): value for label, row in per_class.items() for key, value in row.items()}


def noisy_predictions(k, n, seed=0):
    """Labels and predictions that are right about 60% of the time, wrong classes skewed."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    wrong = rng.random(n) < 0.4
    y_pred = np.where(wrong, (y_true + rng.geometric(0.3, n)) % k, y_true)
    return y_true, y_pred


@pytest.mark.parametrize("k", [3, DETAILED_CLASSES])
def test_few_classes_keep_every_row_and_the_confusion_matrix(k):
    y_true, y_pred = noisy_predictions(k, 40 * k)
    labels = [f"c{i}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, labels)
    assert set(m) == {"accuracy", "macro_f1", "per_class", "confusion"}
    expected = brute_force_per_class(y_true, y_pred, k)
    assert flat(m["per_class"]) == pytest.approx(flat({labels[c]: row for c, row in expected.items()}))
    confusion = np.zeros((k, k), dtype=int)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    assert m["confusion"] == confusion.tolist()


def test_many_classes_give_a_small_summary(capsys):
    from gptcli.cli.display import render_classify_metrics

    k = 3000
    y_true, y_pred = noisy_predictions(k, 30_000)
    y_true[y_true == 7] = 8  # class 7 never occurs: it is counted, not shown
    labels = [f"class-{i:04d}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, labels)
    assert "confusion" not in m and m["classes"] == k and m["classes_in_data"] == k - 1
    assert len(json.dumps(m)) < 100_000
    expected = brute_force_per_class(y_true, y_pred, k)
    worst = sorted((c for c in expected if expected[c]["support"]),
                   key=lambda c: (expected[c]["f1"], -expected[c]["support"], c))[:50]
    assert list(m["per_class"]) == [labels[c] for c in worst]
    assert flat(m["per_class"]) == pytest.approx(flat({labels[c]: expected[c] for c in worst}))
    mistakes = {}
    for t, p in zip(y_true, y_pred):
        if t != p:
            mistakes[labels[t], labels[p]] = mistakes.get((labels[t], labels[p]), 0) + 1
    counts = [row["count"] for row in m["most_confused"]]
    assert len(counts) == 50 and counts == sorted(counts, reverse=True)
    assert counts[0] == max(mistakes.values())
    assert all(mistakes[row["true"], row["predicted"]] == row["count"] for row in m["most_confused"])
    render_classify_metrics({"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                             "val_majority_baseline": 0.001, **m})
    err = capsys.readouterr().err
    assert "the 50 with the lowest F1, of 2,999 classes in the data (3,000 in the classifier)" in err
    assert "most frequent mistakes" in err and len(err) < 30_000


def test_evaluation_record_of_a_classifier_with_many_classes_stays_small():
    labels = [f"class-{i:04d}" for i in range(2000)]
    torch.manual_seed(0)
    model = GPTClassifier(GPT(TINY), labels)
    texts = [f"text {i}" for i in range(600)]
    data = ClassifyData(BytesTokenizer(), labels, ([], []), (texts, labels[:600]), 32, 64, TextReading(), 0,
                        torch.device("cpu"))
    record = data.validate(model, Precision("fp32", "cpu"))
    assert len(json.dumps(record)) < 100_000 and "confusion" not in record
    assert record["classes"] == 2000 and record["classes_in_data"] == 600 and len(record["per_class"]) == 50


def test_cli_output_of_a_classifier_with_many_classes_is_bounded(tmp_path, capsys):
    labels = [f"class-{i:04d}" for i in range(2000)]
    checkpoint = classifier_checkpoint(tmp_path / "many", labels)
    rows = ["text,label"] + [f"text {i},{labels[i]}" for i in range(500)]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    args = ["eval", "-c", checkpoint, "--data", tmp_path / "test.csv", "--batch-size", "128"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0 and len(out) < 100_000 and json.loads(out)["classes"] == 2000, err
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "most frequent mistakes" in err and len(err) < 30_000, err
    code, out, err = run_cli(["sample", "-c", checkpoint, "-p", "text 3"], capsys)
    assert code == 0 and "... and 1,950 less likely classes (--json lists all)" in err
    assert len(err.splitlines()) == 52  # 50 classes, the rest counted, the checkpoint
    code, _, err = run_cli(["info", checkpoint], capsys)
    assert code == 0 and "(2,000 labels; --json lists all)" in err and len(err) < 5_000
