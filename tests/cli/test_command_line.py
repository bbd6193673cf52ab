"""The command line itself: usage mistakes caught by the option parser are one `error:`
line like any other, and the command printed to continue an interrupted run can be pasted
back into a shell as it is."""

import shlex

import pytest
from conftest import run_cli

from gptcli.errors import Interrupted

# --- usage mistakes -----------------------------------------------------------------------

USAGE = [
    (["pretrain", "configs/demo.yaml", "--bogus"], "error: no such option: --bogus (see gptcli pretrain --help)"),
    (["tokenize", "x", "--out", "y", "--seed", "abc"], "error: invalid value for '--seed': "),
    (["tokenize", "x"], "error: missing option '--out' / '-o' (see gptcli tokenize --help)"),
    (["pretrain"], "error: missing argument 'config' (see gptcli pretrain --help)"),
    (["bogus"], "error: no such command 'bogus' (see gptcli --help)"),
    (["sample", "-n", "many"], "error: invalid value for '--max-new-tokens' / '-n': "),
]


@pytest.mark.parametrize("args, start", USAGE, ids=[" ".join(args) for args, _ in USAGE])
def test_usage_mistakes_are_one_error_line_exit_2(args, start, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(start), err
    assert "{" not in err and "Usage:" not in err and "Traceback" not in err


def test_no_arguments_still_show_the_help(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2 and "Usage: gptcli" in out + err and "pretrain" in out + err


def test_help_and_normal_exits_keep_their_codes(capsys):
    assert run_cli(["pretrain", "--help"], capsys)[0] == 0


# --- the command that continues an interrupted run ----------------------------------------

def continue_with(err: str) -> list[str]:
    """The pasted hint, as a POSIX shell splits it."""
    line = next(line for line in err.splitlines() if "continue with: " in line)
    return shlex.split(line.split("continue with: ", 1)[1])


def test_the_training_resume_hint_is_shell_quoted(tmp_path, capsys, monkeypatch):
    config = str(tmp_path / "my configs" / "demo's.yaml")

    def interrupted(*args, **kwargs):
        raise Interrupted(2, 40, "runs/demo/checkpoints/step-000040")

    monkeypatch.setattr("gptcli.config.load_config", lambda *args: None)
    monkeypatch.setattr("gptcli.tasks.pretrain.pretrain", interrupted)
    code, _, err = run_cli(["pretrain", config, "--set", "data.inputs=[a b]", "--set", "out_dir=runs/$HOME",
                            "--overwrite"], capsys)
    assert code == 130
    assert continue_with(err) == ["gptcli", "pretrain", config, "--set", "data.inputs=[a b]",
                                  "--set", "out_dir=runs/$HOME", "--resume"]


def test_the_tokenize_resume_hint_is_shell_quoted(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gptcli.data.tokenized.shards.tokenize_corpus", interrupted)
    inputs = str(tmp_path / "my corpus" / "*.txt")
    code, _, err = run_cli(["tokenize", inputs, "--out", "data/a b", "--resume"], capsys)
    assert code == 130
    assert continue_with(err) == ["gptcli", "tokenize", inputs, "--out", "data/a b", "--resume"]
