"""Multiple-choice evaluation (`eval --task hellaswag|choice`): HellaSwag's preprocessing, the
harness's context/continuation split, log-likelihoods equal to a by-hand computation, acc
and acc_norm (length in characters, as the harness), batching that changes nothing, every
refusal, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config
from serving import random_model

from gptcli.config import config_from_dict
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.evals.choice import (
    ChoiceItem,
    ChoiceResult,
    choice_tokens,
    read_items,
    score_items,
)
from gptcli.store.checkpoint import save_checkpoint
from gptcli.store.runlog import read_metrics
from gptcli.tasks.pretrain import pretrain

# Three HellaSwag items in the official file's layout (WikiHow and ActivityNet styles).
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the "
                 "snow on his car."], "label": 3, "split": "val"},
    {"ind": 91, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow roses [title] Choose a "
     "sunny spot.", "ctx_b": "[step] roses need sun.", "endings": ["Water them daily [substeps] in the morning.",
                                                                    "Paint them blue.", "Sing to them."],
     "label": "0", "split": "val"},
    {"ind": 7, "activity_label": "Knitting", "ctx_a": "A woman holds needles.", "ctx_b": "she",
     "endings": [" knits a scarf.", " eats the yarn."], "label": 0, "split": "val"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def by_hand(model, tokenizer, context: str, choice: str) -> float:
    """log p(" " + choice | context), one sequence at a time, from the full logits."""
    head, tail = tokenizer.encode(context), tokenizer.encode(" " + choice)  # bytes: no merges to split
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return sum(logprobs[len(head) - 1 + i, token].item() for i, token in enumerate(tail))


def test_hellaswag_items_are_preprocessed_as_the_harness_does(tmp_path):
    items = read_items("hellaswag", write_jsonl(tmp_path / "h.jsonl", HELLASWAG))
    assert items[0].context == ("Removing ice from car: Then, the man writes over the snow covering the window of "
                                "a car, and a woman wearing winter clothes smiles. Then")
    assert items[0].label == 3 and len(items[0].choices) == 4
    # WikiHow artifacts: " [title]" ends a sentence, other [tags] go, double spaces become one.
    # ctx_b is capitalised before its "[step]" tag goes, so "roses" keeps its lower case (as in the harness).
    assert items[1].context == "Home and Garden: How to grow roses. Choose a sunny spot. roses need sun."
    assert items[1].choices[0] == "Water them daily in the morning." and items[1].label == 0
    assert items[2].choices == ("knits a scarf.", "eats the yarn.")
    assert len(read_items("hellaswag", tmp_path / "h.jsonl", limit=2)) == 2


def test_loglikelihoods_and_answers_equal_a_by_hand_computation(tmp_path):
    tok, model = BytesTokenizer(), random_model(BytesTokenizer.vocab_size, seed=3).eval()
    items = read_items("hellaswag", write_jsonl(tmp_path / "h.jsonl", HELLASWAG))
    items = [ChoiceItem(i.context[-30:], tuple(c[:25] for c in i.choices), i.label)  # within the 64-byte context
             for i in items]
    result = score_items(model, tok, items, batch_size=2)
    expected = [[by_hand(model, tok, item.context, c) for c in item.choices] for item in items]
    flat = lambda nested: [x for row in nested for x in row]  # noqa: E731 - items have 4, 3 and 2 choices
    np.testing.assert_allclose(flat(result.loglikelihoods), flat(expected), rtol=1e-5, atol=1e-4)
    acc = np.mean([np.argmax(e) == item.label for e, item in zip(expected, items)])
    norm = np.mean([np.argmax(np.array(e) / [len(c) for c in item.choices]) == item.label
                    for e, item in zip(expected, items)])
    metrics = result.metrics()
    assert metrics["items"] == 3 and metrics["acc"] == acc and metrics["acc_norm"] == norm
    one_by_one = score_items(model, tok, items, batch_size=1).loglikelihoods
    np.testing.assert_allclose(flat(one_by_one), flat(result.loglikelihoods), atol=1e-4)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes():
    items = [ChoiceItem("q", ("a", "bbbb"), 1), ChoiceItem("q", ("é", "xx"), 0)]
    result = ChoiceResult([[-2.0, -3.0], [-1.5, -2.0]], items)
    # Item 1 (label "bbbb"): the sum picks "a" (-2 > -3); per character "bbbb" (-0.75 > -2).
    # Item 2 (label "é"): the sum picks "é"; per character "xx" (-1.0 > -1.5). Per UTF-8 byte
    # "é" (two bytes) would score -0.75 and win, making acc_norm 1.0: the harness counts characters.
    metrics = result.metrics()
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 0.5
    assert metrics["acc_bytes"] == 1.0  # what the harness's acc_bytes counts: UTF-8 bytes
    assert metrics["acc_stderr"] == pytest.approx(np.std([0, 1], ddof=1) / math.sqrt(2))


def test_the_continuation_is_split_as_the_harness_splits_it():
    tok = BytesTokenizer()
    assert choice_tokens(tok, "Q: ", "yes") == (list(b"Q:"), list(b"  yes"))  # the trailing space moves
    assert choice_tokens(tok, "", "yes") == ([tok.eot_id], list(b" yes"))  # no context: end-of-text


@pytest.mark.parametrize("rows, message", [
    ([{"context": "a", "choices": ["x", "y"]}], "no 'label' field"),
    ([{"context": "a", "choices": ["x", "y"], "label": 2}], "label 2 is not the index"),
    ([{"context": "a", "choices": ["x"], "label": 0}], "at least two texts"),
    ([{"context": 3, "choices": ["x", "y"], "label": 0}], "'context' must be text"),
    ([{"context": "a", "choices": "xy", "label": 0}], "'choices' must be a list"),
])
def test_bad_items_name_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"context": "ok", "choices": ["x", "y"], "label": 0}, *rows])
    with pytest.raises(GptcliError, match=rf"c.jsonl:2: .*{message}"):
        read_items("choice", path)


def test_eval_task_through_the_cli(tmp_path, capsys):
    tok = BytesTokenizer()
    ckpt = save_checkpoint(tmp_path / "lm", random_model(tok.vocab_size, seed=1), tok, "# lm\n")
    data = write_jsonl(tmp_path / "c.jsonl", [{"context": f"item {i}:", "choices": ["yes", "no", "maybe"],
                                               "label": i % 3} for i in range(5)])
    code, out, _ = run_cli(["eval", "-c", ckpt, "--task", "choice", "--data", data, "--json", "--limit", "4"], capsys)
    metrics = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and metrics["items"] == 4 and 0 <= metrics["acc"] <= 1 and "acc_norm_stderr" in metrics
    code, _, err = run_cli(["eval", "-c", ckpt, "--task", "choice", "--data", data], capsys)
    assert code == 0 and "acc_norm" in err and "5 (" in err
    for args, message in ((["--task", "trivia", "--data", data], "--task must be one of hellaswag, choice"),
                          (["--task", "choice"], "exactly one --data file"),
                          (["--limit", "3"], "--limit counts multiple-choice items"),
                          (["--task", "choice", "--data", data, "--limit", "0"], "--limit must be at least 1")):
        code, _, err = run_cli(["eval", "-c", ckpt, *args], capsys)
        assert code == 2 and message in err, (args, err)


def test_pretraining_scores_eval_tasks_at_every_evaluation(tmp_path, corpus_dir):
    data = write_jsonl(tmp_path / "c.jsonl", [{"context": "def f(x):", "choices": ["    return x", "!!??"],
                                               "label": 0}] * 3)
    cfg = config_from_dict(tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=20, eval_tasks=[
        {"task": "choice", "data": str(data), "name": "code"}]))
    pretrain(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0 <= r["code/acc"] <= 1 and 0 <= r["code/acc_norm"] <= 1 for r in evals)
    bad = tiny_config([str(corpus_dir)], tmp_path / "bad",
                      eval_tasks=[{"task": "choice", "data": str(tmp_path / "no.jsonl")}])
    with pytest.raises(GptcliError, match="no.jsonl does not exist"):
        pretrain(config_from_dict(bad))
    assert not (tmp_path / "bad").exists()
