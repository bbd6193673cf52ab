"""`gptcli eval` of a classifier: metrics on a labelled file, with optional per-row predictions
(language models: lm_eval.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from gptcli.atomic import write_text
from gptcli.store.checkpoint import load_model, resolve_checkpoint
from gptcli.tasks.classify import ClassifyData, GPTClassifier, classification_metrics
from gptcli.errors import GptcliError
from gptcli.outputs import check_output_file, input_paths
from gptcli.data.records import column, read_records
from gptcli.runtime import Precision, resolve_device


def evaluate_classifier(checkpoint: str | Path | None, data_file: str | Path,
                        text_column: str = "text", label_column: str = "label",
                        predictions: str | Path | None = None, batch_size: int = 32,
                        device: str = "auto") -> tuple[Path, dict]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of a
    classifier checkpoint on `data_file`; writes `predictions` (CSV) when given."""
    records = read_records(data_file)  # the cheap checks first
    texts = [str(t) for t in column(records, text_column, data_file, "--text-column")]
    truth = [str(y) for y in column(records, label_column, data_file, "--label-column")]
    path = resolve_checkpoint(checkpoint)
    if predictions is not None:
        predictions = check_output_file(predictions, input_paths([data_file, path]), "--predictions")
    dev = resolve_device(device)
    model, tokenizer = load_model(path, dev)
    if not isinstance(model, GPTClassifier):
        raise GptcliError(f"{path} is not a classifier checkpoint; `gptcli eval --data TEXT` "
                          f"evaluates language models")
    unknown = sorted(set(truth) - set(model.labels))
    if unknown:
        raise GptcliError(f"{data_file}: labels the classifier never learned: {', '.join(unknown[:5])}")
    data = ClassifyData(tokenizer, model.labels, ([], []), (texts, truth), model.config.block_size,
                        batch_size, "end", 0, dev)
    probs = data.predict(model, data.val_ids, Precision("fp32", dev.type))
    predicted = probs.argmax(1)
    metrics = classification_metrics(data.val_y, predicted, model.labels)
    counts = np.bincount(data.val_y, minlength=len(model.labels))
    metrics["majority_baseline"] = float(counts.max() / counts.sum())
    if predictions is not None:
        _write_predictions(predictions, texts, truth, predicted, probs, model.labels)
    return path, metrics


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
