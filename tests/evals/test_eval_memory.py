"""`eval --batch-size` is checked against the memory left before a batch is allocated, for
every kind of eval (language model, multiple choice, classifier; model/budget.py), and a
batch size below 1 is refused by each."""

import json

import pytest
import torch
from conftest import run_cli
from serving import random_model

from gptcli import runtime
from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.evals.choice import eval_choice_checkpoint
from gptcli.evals.classify import eval_classifier_checkpoint
from gptcli.evals.lm import eval_lm_checkpoint
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import save_checkpoint

MB = 1_000_000


def small_machine(monkeypatch, available: int) -> None:
    monkeypatch.setattr(runtime, "available_memory", lambda device: available)


def no_forward_pass(monkeypatch) -> None:
    """Fail the test if a batch reaches the model: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a batch was allocated before the memory check")

    monkeypatch.setattr(GPT, "hidden_states", refuse)


@pytest.fixture
def lm(tmp_path):
    return save_checkpoint(tmp_path / "lm", random_model(BytesTokenizer.vocab_size), BytesTokenizer(), "# lm\n")


@pytest.fixture
def classifier(tmp_path):
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257))
    return save_checkpoint(tmp_path / "cls", GPTClassifier(trunk, ["a", "b"]), BytesTokenizer(), "# cls\n")


def test_lm_eval_refuses_a_batch_that_cannot_fit(lm, tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("some text to score, " * 2000)  # 40,000 bytes: 625 windows of 64
    small_machine(monkeypatch, 20 * MB)
    _, metrics = eval_lm_checkpoint(lm, [str(text)], batch_size=8, device="cpu")
    assert metrics["loss"] > 0
    no_forward_pass(monkeypatch)
    with pytest.raises(GptcliError) as info:
        eval_lm_checkpoint(lm, [str(text)], batch_size=100_000, device="cpu")
    message = str(info.value)
    assert message.startswith("--batch-size 100000: the activations and loss of 625 windows of 64 tokens "
                              "need about ")
    assert "this machine has 20.0 MB available; use a smaller --batch-size (at most about " in message


def test_multiple_choice_refuses_a_batch_that_cannot_fit_through_the_cli(lm, tmp_path, monkeypatch, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"context": f"question {i}: " * 3, "choices": ["yes", "no", "maybe"],
                                        "label": i % 3}) + "\n" for i in range(200)))
    small_machine(monkeypatch, 20 * MB)
    _, metrics = eval_choice_checkpoint(lm, "choice", data, batch_size=8, device="cpu")
    assert metrics["items"] == 200
    no_forward_pass(monkeypatch)
    code, out, err = run_cli(["eval", "-c", lm, "--task", "choice", "--data", data, "--batch-size", "1000000",
                              "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --batch-size 1000000: the activations and log-probabilities of 600 "
                          "sequences (the choices of 200 items) need about ")
    assert "use a smaller --batch-size (at most about " in err


def test_classifier_eval_refuses_a_batch_that_cannot_fit(classifier, tmp_path, monkeypatch):
    data = tmp_path / "test.csv"
    data.write_text("text,label\n" + "".join(f"some words number {i},{'ab'[i % 2]}\n" for i in range(300)))
    small_machine(monkeypatch, 2 * MB)
    _, metrics = eval_classifier_checkpoint(classifier, data, batch_size=4, device="cpu")
    assert 0 <= metrics["accuracy"] <= 1
    no_forward_pass(monkeypatch)
    with pytest.raises(GptcliError, match=r"^--batch-size 5000: the activations of 300 texts \(300 windows\) "
                                          r"need about .*use a smaller --batch-size \(at most about "):
        eval_classifier_checkpoint(classifier, data, batch_size=5000, device="cpu")


@pytest.mark.parametrize("batch_size", ["0", "-3"])
def test_every_eval_refuses_a_batch_size_below_1(lm, classifier, tmp_path, capsys, batch_size):
    text = tmp_path / "text.txt"
    text.write_text("some text to score")
    labelled = tmp_path / "test.csv"
    labelled.write_text("text,label\nx,a\ny,b\n")
    items = tmp_path / "c.jsonl"
    items.write_text(json.dumps({"context": "q", "choices": ["yes", "no"], "label": 0}) + "\n")
    for args in (["-c", lm, "--data", text], ["-c", classifier, "--data", labelled],
                 ["-c", lm, "--task", "choice", "--data", items]):
        code, out, err = run_cli(["eval", *args, "--batch-size", batch_size, "--device", "cpu"], capsys)
        assert code == 2 and "--batch-size" in err and "at least 1" in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
