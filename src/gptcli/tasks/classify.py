"""The classify task's data: labelled texts as token rows (cut to the context or as windows),
right-padded batches, and the validation the training loop runs, with the majority-class
and naive Bayes baselines beside it (the model is model/heads.py's classifier)."""

from __future__ import annotations

import numpy as np
import torch

from gptcli.data.training.dataset import STREAMS, step_rows
from gptcli.data.training.labelled import TextReading, encode_windows, pad_windows
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.evals.baselines import NaiveBayes
from gptcli.evals.classify import classification_metrics, predict_probs
from gptcli.model.heads import GPTClassifier
from gptcli.runtime import Distributed, Precision


class ClassifyData:
    """Labelled texts for the training loop: random train batches, full validation passes.
    Each text is one or more rows, as `reading` says (data/training/labelled.py's TextReading); a
    batch holds `batch_size` texts with all their rows."""

    metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, labels: list[str], train: tuple[list[str], list[str]],
                 val: tuple[list[str], list[str]], block_size: int, batch_size: int, reading: TextReading,
                 seed: int, device: torch.device, grad_accum: int = 1, dist: Distributed = Distributed()):
        self.labels = labels
        index = {name: i for i, name in enumerate(labels)}
        self.train_rows = encode_windows(tokenizer, train[0], block_size, reading)
        self.train_y = np.array([index[y] for y in train[1]], dtype=np.int64)
        self.val_rows = encode_windows(tokenizer, val[0], block_size, reading)
        self.val_y = np.array([index[y] for y in val[1]], dtype=np.int64)
        self.naive_bayes = None  # its validation predictions (N,): the bag-of-words baseline
        if train[0]:
            self.naive_bayes = NaiveBayes.fit(train[0], self.train_y, len(labels)).predict(val[0])
        self.pad_id = tokenizer.eot_id
        self.batch_size = batch_size
        self.per_step = batch_size * grad_accum * dist.world_size
        self.dist = dist
        self.seed = seed
        self.device = device

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rows = step_rows(self.seed, STREAMS["classify"], step, micro, self.dist.rank, self.batch_size, self.per_step,
                         self.dist.world_size, len(self.train_rows))
        idx, lengths, owners = pad_windows([self.train_rows[r] for r in rows], self.pad_id, self.device)
        return {"idx": idx, "targets": torch.from_numpy(self.train_y[rows]).to(self.device),
                "lengths": lengths, "owners": owners}

    @torch.no_grad()
    def validate(self, model: GPTClassifier, precision: Precision) -> dict:
        probs = predict_probs(model, self.val_rows, self.pad_id, self.batch_size, precision, self.device)
        picked = probs[np.arange(len(self.val_y)), self.val_y]
        loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
        metrics = classification_metrics(self.val_y, probs.argmax(1), self.labels)
        majority = np.bincount(self.val_y, minlength=len(self.labels)).max() / len(self.val_y)
        baselines = {"val_majority_baseline": float(majority)}
        if self.naive_bayes is not None:
            bag = classification_metrics(self.val_y, self.naive_bayes, self.labels)
            baselines.update(val_naive_bayes_accuracy=bag["accuracy"], val_naive_bayes_macro_f1=bag["macro_f1"])
        return {"val_loss": loss, "val_accuracy": metrics.pop("accuracy"),
                "val_macro_f1": metrics.pop("macro_f1"), **baselines,
                **metrics}  # per-class detail, bounded (see classification_metrics)


def check_labels(train_labels: list[str], val_labels: list[str], source: str) -> list[str]:
    """The sorted label names of the training data; validation may not bring new ones."""
    labels = sorted(set(train_labels))
    if len(labels) < 2:
        raise GptcliError(f"{source}: the label column has {len(labels)} class(es); "
                          f"classification needs at least 2")
    unseen = sorted(set(val_labels) - set(labels))
    if unseen:
        raise GptcliError(f"validation labels never seen in training: {', '.join(unseen[:5])}")
    return labels
