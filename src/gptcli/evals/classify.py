"""A classifier's evaluation: class probabilities, accuracy / macro-F1 / per-class metrics
(bounded for many classes), and `gptcli eval` on a labelled file with optional per-row
predictions and the majority-class and naive Bayes baselines (language models: lm.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from gptcli.atomic import write_text
from gptcli.config import FinetuneRunConfig
from gptcli.data.training.examples import LabelledSplits, labelled_splits
from gptcli.data.training.labelled import encode_windows, pad_windows
from gptcli.data.text.records import column, read_records
from gptcli.errors import GptcliError
from gptcli.evals.baselines import NaiveBayes
from gptcli.infer.load import is_classifier, load
from gptcli.model.budget import FP32, Sizes, check_batch_fits, pass_bytes
from gptcli.model.heads import GPTClassifier
from gptcli.outputs import check_output_file, input_paths
from gptcli.runtime import Precision, eval_mode
from gptcli.store.checkpoint import training_config
from gptcli.store.rundir import resolve_checkpoint


def eval_classifier_checkpoint(checkpoint: str | Path | None, data_file: str | Path | None,
                               text_column: str = "text", label_column: str = "label",
                               predictions: str | Path | None = None, batch_size: int = 32,
                               device: str = "auto") -> tuple[Path, dict]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of a
    classifier checkpoint on `data_file` (None: the validation split it trained with, rebuilt
    from its config), with two baselines: the majority class of those records and a naive
    Bayes fitted on the training records the checkpoint's config names
    (`naive_bayes_unavailable` says why not, when they cannot be read); writes `predictions`
    (CSV) when given. `data` in the result names the records evaluated."""
    if batch_size < 1:  # the cheap checks first
        raise GptcliError(f"--batch-size: must be at least 1, got {batch_size}")
    if data_file is not None:
        records = read_records(data_file)
        texts = [str(t) for t in column(records, text_column, data_file, "--text-column")]
        truth = [str(y) for y in column(records, label_column, data_file, "--label-column")]
        source = str(data_file)
    path = resolve_checkpoint(checkpoint)
    if predictions is not None:
        inputs = [path] if data_file is None else [data_file, path]
        predictions = check_output_file(predictions, input_paths(inputs), "--predictions")
    if not is_classifier(path):
        raise GptcliError(f"{path} is not a classifier checkpoint; `gptcli eval --data TEXT` "
                          f"evaluates language models")
    splits = None  # the training run's splits, rebuilt once for both the data and naive Bayes
    if data_file is None:
        splits = _own_splits(path)
        (texts, truth), source = splits.val, f"{splits.val_source} (validation split)"
    classifier = load(path, device, expect=("classifier",))
    model, tokenizer, dev = classifier.model, classifier.tokenizer, next(classifier.model.parameters()).device
    training = training_config(path)
    unknown = sorted(set(truth) - set(model.labels))
    if unknown:
        raise GptcliError(f"{source}: labels the classifier never learned: {', '.join(unknown[:5])}")
    index = {name: i for i, name in enumerate(model.labels)}
    y = np.array([index[label] for label in truth])
    rows = encode_windows(tokenizer, texts, model.config.block_size, classifier.reading)
    probs = predict_probs(model, rows, tokenizer.eot_id, batch_size, Precision("fp32", dev.type), dev)
    predicted = probs.argmax(1)
    metrics = {"data": source, **classification_metrics(y, predicted, model.labels)}
    counts = np.bincount(y, minlength=len(model.labels))
    metrics["majority_baseline"] = float(counts.max() / counts.sum())
    metrics.update(_naive_bayes_metrics(training, splits, model.labels, texts, y))
    if predictions is not None:
        _write_predictions(predictions, texts, truth, predicted, probs, model.labels)
    return path, metrics


def _own_splits(path: Path) -> LabelledSplits:
    """The splits a classifier trained with (its val_file, or the seeded val_fraction of its
    train_file), rebuilt from the finetune config in its checkpoint."""
    training = training_config(path)
    if training is None:
        raise GptcliError(f"{path} records no finetune config to rebuild its validation split from; "
                          f"give a labelled file with --data")
    return labelled_splits(training)


def _naive_bayes_metrics(training: FinetuneRunConfig | None, splits: LabelledSplits | None, labels: list[str],
                         texts: list[str], y: np.ndarray) -> dict:
    """Accuracy and macro-F1 on `texts` of a naive Bayes fitted on the classifier's training
    records (`splits`, or rebuilt from `training`), or why there is none (the run's training
    file is gone, say)."""
    if training is None:
        return {"naive_bayes_unavailable": "the checkpoint records no finetune config naming its training file"}
    f = training.finetune
    if splits is None:
        try:
            splits = labelled_splits(training)
        except GptcliError as exc:
            return {"naive_bayes_unavailable": f"cannot read the training file {f.train_file} ({exc})"}
    train_texts, train_labels = splits.train
    index = {name: i for i, name in enumerate(labels)}
    known = [i for i, label in enumerate(train_labels) if label in index]
    if not known:
        return {"naive_bayes_unavailable": f"the training file {f.train_file} has none of the classifier's labels"}
    bag = NaiveBayes.fit([train_texts[i] for i in known], np.array([index[train_labels[i]] for i in known]),
                         len(labels))
    metrics = classification_metrics(y, bag.predict(texts), labels)
    return {"naive_bayes_accuracy": metrics["accuracy"], "naive_bayes_macro_f1": metrics["macro_f1"]}


@torch.no_grad()
def predict_probs(model: GPTClassifier, texts: list[list[np.ndarray]], pad_id: int, batch_size: int,
                  precision: Precision, device: torch.device) -> np.ndarray:
    """Class probabilities (N, K) for texts given as their token rows (one, or a window
    each: see data/training/labelled.py), `batch_size` texts at a time, of similar lengths."""
    order = np.argsort([sum(len(row) for row in rows) for rows in texts])  # similar lengths pad less
    probs = np.zeros((len(texts), model.n_classes), dtype=np.float32)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            _check_batch_fits(model, batch_size, [texts[t] for t in batch], device)
            idx, lengths, owners = pad_windows([texts[t] for t in batch], pad_id, device)
            with precision.autocast():
                logits = model(idx, lengths=lengths, owners=owners)
            probs[batch] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs


def _check_batch_fits(model: GPTClassifier, batch_size: int, texts: list[list[np.ndarray]],
                      device: torch.device) -> None:
    """Refuse a --batch-size whose batch of `texts` cannot fit beside the model, before it
    is allocated (model/budget.py): its R rows (a text's windows each) padded to the longest,
    T tokens: one block's pass over them and the fp32 copy mean pooling sums (R, T, C).
    Checked per batch, as the texts' lengths differ."""
    sizes = Sizes.of(model)

    def bytes_for(count: int) -> int:
        rows = [row for windows in texts[:count] for row in windows]
        longest = max(len(row) for row in rows)
        return (pass_bytes(sizes, len(rows), longest, longest, masked=False)
                + len(rows) * longest * sizes.n_embd * FP32)

    check_batch_fits(f"--batch-size {batch_size}", len(texts), bytes_for,
                     f"the activations of {len(texts):,} texts ({sum(len(w) for w in texts):,} windows)",
                     "use a smaller --batch-size", device)


def _write_predictions(out: Path, texts, truth, predicted, probs, labels) -> None:
    """One CSV row per text, replacing `out` atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["text", "label", "predicted", *[f"p_{name}" for name in labels]])
    for text, label, pred, row in zip(texts, truth, predicted, probs):
        writer.writerow([text, label, labels[pred], *[f"{p:.6f}" for p in row]])
    try:
        write_text(out, buffer.getvalue())
    except OSError as exc:
        raise GptcliError(f"--predictions: cannot write {out} ({exc.strerror or exc}); "
                          f"choose a writable path") from None


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
