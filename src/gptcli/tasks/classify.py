"""Sequence classification: the GPT trunk plus a linear head on the last real token.

The head is `score` (no bias), as in Hugging Face's GPT2ForSequenceClassification, so a
classifier checkpoint keeps GPT-2's names plus `score.weight`. Sequences are right-padded
per batch; with causal attention the padding never reaches the real tokens, and the head
reads the hidden state at position `length - 1`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gptcli.config import ModelConfig
from gptcli.errors import GptcliError
from gptcli.model.gpt import GPT, IGNORE_INDEX
from gptcli.data.dataset import step_rows
from gptcli.runtime import Distributed, Precision
from gptcli.data.tokenizer import Tokenizer


class GPTClassifier(GPT):
    def __init__(self, cfg: ModelConfig, labels: list[str], aux_lm_weight: float = 0.0):
        super().__init__(cfg)
        self.labels = list(labels)
        self.n_classes = len(labels)
        self.aux_lm_weight = aux_lm_weight
        self.score = torch.nn.Linear(cfg.n_embd, self.n_classes, bias=False)
        torch.nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, K) for right-padded `idx` (B, T) with `lengths` (B,); or, with
        `targets` (B,), the summed cross-entropy (plus the weighted auxiliary LM loss)."""
        if lengths is None:
            lengths = torch.full((idx.size(0),), idx.size(1), device=idx.device)
        hidden = self.hidden_states(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        logits = self.score(last)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if self.aux_lm_weight > 0:
            loss = loss + self.aux_lm_weight * self._lm_loss_per_example(hidden, idx, lengths).sum()
        return loss

    def _lm_loss_per_example(self, hidden: torch.Tensor, idx: torch.Tensor,
                             lengths: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over each sequence's real tokens (B,): the auxiliary
        language-modelling objective of the original GPT paper."""
        T = idx.size(1)
        next_ids = idx[:, 1:].masked_fill(torch.arange(1, T, device=idx.device) >= lengths[:, None],
                                          IGNORE_INDEX)  # (B, T-1), padding ignored
        logits = self.logits(hidden[:, :-1]).float()
        per_token = F.cross_entropy(logits.transpose(1, 2), next_ids, ignore_index=IGNORE_INDEX,
                                    reduction="none")  # (B, T-1)
        return per_token.sum(1) / (lengths - 1).clamp(min=1)


def encode_texts(tokenizer: Tokenizer, texts: list[str], block_size: int, keep: str) -> list[np.ndarray]:
    """Token ids of each text, cut to `block_size` keeping its start or its end."""
    encoded = []
    for ids in tokenizer.encode_batch(texts):
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            ids = np.array([tokenizer.eot_id])
        encoded.append(ids[:block_size] if keep == "start" else ids[-block_size:])
    return encoded


def pad_batch(sequences: list[np.ndarray], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch: ids (B, T) and lengths (B,)."""
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    return torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device)


DETAILED_CLASSES = 50  # up to this many classes an evaluation records every class in full
WORST_SHOWN = 50  # beyond it: the per-class rows of this many classes with the lowest F1
CONFUSIONS_SHOWN = 50  # and this many most frequent (true, predicted) mistakes


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy and macro-F1, with per-class detail whose size does not grow with the classes.

    Up to DETAILED_CLASSES classes: precision/recall/F1/support of every class and the
    confusion matrix (rows: true class, columns: predicted class). Beyond that a K x K
    matrix and K rows would not fit a log or a screen (10,000 classes: 10^8 cells), so the
    record holds `classes` (K), `classes_in_data`, the per-class rows of the WORST_SHOWN
    classes in the data with the lowest F1 (ties: more support first) and `most_confused`,
    the CONFUSIONS_SHOWN most frequent mistakes as {true, predicted, count}.
    """
    k = len(labels)
    actual = np.bincount(y_true, minlength=k)  # (K,) support
    predicted = np.bincount(y_pred, minlength=k)  # (K,)
    true_pos = np.bincount(y_true[y_true == y_pred], minlength=k).astype(float)  # (K,)
    precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    present = actual > 0  # macro-F1 over the classes that occur in this data
    metrics = {"accuracy": float(true_pos.sum() / max(len(y_true), 1)),
               "macro_f1": float(f1[present].mean()) if present.any() else 0.0}

    def rows(indices) -> dict:
        return {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                            "f1": float(f1[i]), "support": int(actual[i])} for i in indices}

    if k <= DETAILED_CLASSES:
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (y_true, y_pred), 1)
        return {**metrics, "per_class": rows(range(k)), "confusion": confusion.tolist()}
    by_f1 = np.lexsort((-actual, f1))  # f1 ascending, then support descending
    worst = by_f1[present[by_f1]][:WORST_SHOWN]
    return {**metrics, "classes": k, "classes_in_data": int(present.sum()), "per_class": rows(worst),
            "most_confused": _most_confused(y_true, y_pred, labels)}


def _most_confused(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> list[dict]:
    """The CONFUSIONS_SHOWN most frequent (true, predicted) pairs among the mistakes, most
    frequent first, counted without a K x K matrix."""
    k = len(labels)
    wrong = y_true != y_pred
    pairs, counts = np.unique(y_true[wrong].astype(np.int64) * k + y_pred[wrong], return_counts=True)
    top = np.argsort(-counts, kind="stable")[:CONFUSIONS_SHOWN]
    return [{"true": labels[pairs[i] // k], "predicted": labels[pairs[i] % k], "count": int(counts[i])}
            for i in top]


class ClassifyData:
    """Labelled texts for the training loop: random train batches, full validation passes."""

    metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, labels: list[str], train: tuple[list[str], list[str]],
                 val: tuple[list[str], list[str]], block_size: int, batch_size: int, keep: str,
                 seed: int, device: torch.device, grad_accum: int = 1, dist: Distributed = Distributed()):
        self.labels = labels
        index = {name: i for i, name in enumerate(labels)}
        self.train_ids = encode_texts(tokenizer, train[0], block_size, keep)
        self.train_y = np.array([index[y] for y in train[1]])
        self.val_ids = encode_texts(tokenizer, val[0], block_size, keep)
        self.val_y = np.array([index[y] for y in val[1]])
        self.pad_id = tokenizer.eot_id
        self.batch_size = batch_size
        self.per_step = batch_size * grad_accum * dist.world_size
        self.dist = dist
        self.seed = seed
        self.device = device

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rows = step_rows(self.seed, 2, step, micro, self.dist.rank, self.batch_size, self.per_step,
                         self.dist.world_size, len(self.train_ids))
        idx, lengths = pad_batch([self.train_ids[r] for r in rows], self.pad_id, self.device)
        return {"idx": idx, "targets": torch.from_numpy(self.train_y[rows]).to(self.device),
                "lengths": lengths}

    @torch.no_grad()
    def predict(self, model: GPTClassifier, sequences: list[np.ndarray],
                precision: Precision) -> np.ndarray:
        """Class probabilities (N, K) for token sequences, in batches of similar length."""
        was_training = model.training
        model.eval()
        order = np.argsort([len(s) for s in sequences])  # similar lengths pad less
        probs = np.zeros((len(sequences), model.n_classes), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            idx, lengths = pad_batch([sequences[r] for r in rows], self.pad_id, self.device)
            with precision.autocast():
                logits = model(idx, lengths=lengths)
            probs[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        model.train(was_training)
        return probs

    def evaluate(self, model: GPTClassifier, precision: Precision) -> dict:
        probs = self.predict(model, self.val_ids, precision)
        picked = probs[np.arange(len(self.val_y)), self.val_y]
        loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
        metrics = classification_metrics(self.val_y, probs.argmax(1), self.labels)
        majority = np.bincount(self.val_y, minlength=len(self.labels)).max() / len(self.val_y)
        return {"val_loss": loss, "val_accuracy": metrics.pop("accuracy"),
                "val_macro_f1": metrics.pop("macro_f1"), "val_majority_baseline": float(majority),
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
