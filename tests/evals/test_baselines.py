"""The bag-of-words baseline: words, naive Bayes against a computation by hand, and the
baseline `gptcli eval` shows for a classifier checkpoint (or why it cannot)."""

import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from gptcli.config import FinetuneRunConfig, ModelConfig, config_from_dict, dump_yaml
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.evals import baselines
from gptcli.evals.baselines import NaiveBayes, words
from gptcli.evals.classify import eval_classifier_checkpoint
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.store.checkpoint import save_checkpoint

TRAIN = [("apple apple pie", "fruit"), ("Apple, tart!", "fruit"), ("car engine", "vehicle")]
# Naive Bayes (see by_hand) says fruit, vehicle, vehicle: the last one is wrong.
TEST = [("car apple", "fruit"), ("engine car truck", "vehicle"), ("pie engine engine", "fruit")]


def by_hand(text: str) -> str:
    """The naive Bayes decision for TRAIN, worked out on paper with alpha = 1.

    Vocabulary: apple, pie, tart, car, engine (V = 5). fruit: 5 words (apple 3, pie 1,
    tart 1), so P(w | fruit) = (count + 1) / (5 + 5); vehicle: 2 words (car 1, engine 1),
    P(w | vehicle) = (count + 1) / (2 + 5). Priors 2/3 and 1/3. Unseen words are skipped.
    """
    fruit = {"apple": 4 / 10, "pie": 2 / 10, "tart": 2 / 10, "car": 1 / 10, "engine": 1 / 10}
    vehicle = {"apple": 1 / 7, "pie": 1 / 7, "tart": 1 / 7, "car": 2 / 7, "engine": 2 / 7}
    p_fruit = (2 / 3) * math.prod(fruit[w] for w in text.split() if w in fruit)
    p_vehicle = (1 / 3) * math.prod(vehicle[w] for w in text.split() if w in vehicle)
    assert p_fruit != p_vehicle  # no ties in this example
    return "fruit" if p_fruit > p_vehicle else "vehicle"


def test_words_are_lowercased_runs_of_word_characters():
    assert words("self._loop.call_soon(cb)  Éclair-2x") == ["self", "_loop", "call_soon", "cb", "éclair", "2x"]


def test_naive_bayes_equals_the_computation_by_hand():
    labels = ["fruit", "vehicle"]
    y = np.array([labels.index(label) for _, label in TRAIN])
    model = NaiveBayes.fit([t for t, _ in TRAIN], y, len(labels))
    column = model.vocabulary
    assert model.log_prior == pytest.approx(np.log([2 / 3, 1 / 3]))
    assert model.log_likelihood[0, column["apple"]] == pytest.approx(math.log(4 / 10))
    assert model.log_likelihood[1, column["engine"]] == pytest.approx(math.log(2 / 7))
    predicted = [labels[i] for i in model.predict([t for t, _ in TEST])]
    assert predicted == [by_hand(t) for t, _ in TEST] == ["fruit", "vehicle", "vehicle"]


def test_many_classes_keep_the_most_frequent_words(monkeypatch):
    monkeypatch.setattr(baselines, "MAX_CELLS", 6)  # 3 classes: room for 2 words
    model = NaiveBayes.fit(["a a b c", "a c c", "d"], np.array([0, 1, 2]), 3)
    assert sorted(model.vocabulary) == ["a", "c"] and model.log_likelihood.shape == (3, 2)
    assert list(model.predict(["c c", "a"])) == [1, 0]


def write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    return path


def classifier_checkpoint(tmp_path, config_yaml: str, name: str = "classifier"):
    """An untrained classifier checkpoint whose saved config is `config_yaml`."""
    torch.manual_seed(0)
    trunk = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257))
    return save_checkpoint(tmp_path / name, GPTClassifier(trunk, ["fruit", "vehicle"]), BytesTokenizer(),
                           config_yaml)


def test_eval_fits_the_baseline_on_the_training_file_the_checkpoint_names(tmp_path, capsys):
    train, val = write_csv(tmp_path / "train.csv", TRAIN), write_csv(tmp_path / "val.csv", TRAIN[:2])
    cfg = config_from_dict({"finetune": {"train_file": str(train), "val_file": str(val)}}, FinetuneRunConfig)
    path = classifier_checkpoint(tmp_path, dump_yaml(cfg))
    test = write_csv(tmp_path / "test.csv", TEST)
    _, metrics = eval_classifier_checkpoint(path, test, device="cpu")
    right = sum(by_hand(text) == label for text, label in TEST)
    assert metrics["naive_bayes_accuracy"] == pytest.approx(right / len(TEST)) and right == 2
    code, _, err = run_cli(["eval", "-c", path, "--data", test, "--device", "cpu"], capsys)
    assert code == 0 and "naive Bayes over word counts accuracy 0.6667" in err


def test_eval_says_why_there_is_no_baseline(tmp_path, capsys):
    missing = config_from_dict({"finetune": {"train_file": str(tmp_path / "gone.csv")}}, FinetuneRunConfig)
    test = write_csv(tmp_path / "test.csv", TEST)
    for name, config_yaml, reason in [("none", "# no finetune config\n", "records no finetune config"),
                                      ("gone", dump_yaml(missing), "cannot read the training file")]:
        path = classifier_checkpoint(tmp_path, config_yaml, name)
        _, metrics = eval_classifier_checkpoint(path, test, device="cpu")
        assert reason in metrics["naive_bayes_unavailable"] and "naive_bayes_accuracy" not in metrics
        code, _, err = run_cli(["eval", "-c", path, "--data", test, "--device", "cpu"], capsys)
        assert code == 0 and "naive Bayes not available" in err
