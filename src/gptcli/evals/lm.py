"""`gptcli eval` of a language model: loss, perplexity and bits per byte.

Two modes:
- on any data (`--data`): raw text (files, folders, globs, JSONL, `stdlib`) encoded with the
  checkpoint's tokenizer, or a tokenized directory (its splits). Every token after the first
  is scored once: consecutive windows of block_size tokens, each predicting its next
  tokens, documents joined by the end-of-text id as in training shards.
- without `--data`, on a pretrain run's checkpoint: the run's own validation, repeated
  exactly (same data, windows, batch size and precision), so the numbers equal those the
  training loop logged at that step.

Both compute through `validation_loss` (as the training loop's validation does): loss per target token, bits per
byte = loss / ln 2 / (UTF-8 bytes per token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gptcli.config import RunConfig, load_config
from gptcli.data.text.corpus import expand_inputs, iter_pieces
from gptcli.data.training.dataset import BatchSampler, TokenDataset, prepare_dataset
from gptcli.data.training.mixture import Mixture
from gptcli.data.tokenized.token_files import SPLITS, is_tokenized_dir
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.errors import GptcliError
from gptcli.events import EventSink, Progress, ignore
from gptcli.infer.load import load
from gptcli.model import Model
from gptcli.model.budget import Sizes, check_batch_fits, loss_bytes, pass_bytes
from gptcli.model.gpt import IGNORE_INDEX
from gptcli.runtime import Precision, eval_mode, resolve_precision
from gptcli.store.checkpoint import CONFIG_YAML, read_trainer_json

SPLIT_CHOICES = ("all", *SPLITS)


def eval_lm_checkpoint(checkpoint: str | Path | None, inputs: list[str] | None, split: str = "all",
                batch_size: int = 8, precision: str = "auto", device: str = "auto",
                text_field: str = "text", on_event: EventSink = ignore,
                quantize: str = "none") -> tuple[Path, dict]:
    """Loss, perplexity and bits per byte of a language-model checkpoint; see the module doc.
    `precision` auto: the precision the run trained in (fp32 for checkpoints without one).
    `quantize` int8 scores it with int8 linear layers (the CLI's `--quantize`)."""
    if split not in SPLIT_CHOICES:
        raise GptcliError(f"--split: '{split}' is not one of {', '.join(SPLIT_CHOICES)}")
    if batch_size < 1:
        raise GptcliError(f"--batch-size: must be at least 1, got {batch_size}")
    path, model, tokenizer, dev = load_lm_for_eval(checkpoint, device, precision, quantize)
    trained = _trainer_record(path)  # the precision and validation data of the run, when known
    precision_ = resolve_precision(_trained_precision(trained, dev) if precision == "auto" else precision,
                                   dev, option="--precision")
    if inputs:
        metrics = _evaluate_inputs(model, tokenizer, inputs, split, batch_size, precision_, dev,
                                   text_field, on_event)
    else:
        metrics = _repeat_run_validation(model, path, trained, precision_, dev, on_event)
    metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))  # exp overflows past ~709
    metrics["precision"] = precision_.name
    return path, metrics


def load_lm_for_eval(checkpoint: str | Path | None, device: str, precision: str, quantize: str
                     ) -> tuple[Path, Model, Tokenizer, torch.device]:
    """A language-model checkpoint loaded to be scored (path, model in eval mode and fp32,
    int8 with `quantize`, tokenizer, device), once `precision` (applied by the caller,
    under autocast) is known to be a choice; a classifier is refused."""
    loaded = load(checkpoint, device, precision, quantize, expect=("lm", "chat"), generate=False)
    return loaded.path, loaded.model, loaded.tokenizer, next(loaded.model.parameters()).device


def _trainer_record(checkpoint: Path) -> dict:
    """A checkpoint's trainer.json ({} without one: an export or a merged copy)."""
    try:
        return read_trainer_json(checkpoint)
    except (OSError, ValueError):
        return {}


def _trained_precision(trained: dict, device: torch.device) -> str:
    """The precision the run trained in, if this device can run it; else fp32."""
    try:
        return resolve_precision(trained.get("precision") or "fp32", device).name
    except GptcliError:
        return "fp32"


def _repeat_run_validation(model: Model, checkpoint: Path, trained: dict, precision: Precision,
                           device: torch.device, on_event: EventSink) -> dict:
    """The pretraining run's own validation: the same val windows the loop evaluated."""
    try:
        cfg = load_config(checkpoint / CONFIG_YAML)
    except GptcliError:
        cfg = None
    if not isinstance(cfg, RunConfig) or not cfg.data.inputs:
        raise GptcliError(f"{checkpoint} is not from a pretraining run, so it has no validation "
                          f"split of its own; name the text to evaluate with --data")
    dataset = (Mixture.open(cfg.data, cfg.seed, on_event) if cfg.data.is_mixture
               else TokenDataset.open(prepare_dataset(cfg.data, cfg.seed, on_event)))
    trained_on = trained.get("val_sha256")
    if trained_on is not None and trained_on != dataset.val_sha256:
        raise GptcliError(f"the run's data ({', '.join(cfg.data.paths())}) is not what it was during "
                          f"training (its validation split differs), so its validation cannot be "
                          f"repeated; evaluate the text you want with --data")
    if isinstance(dataset, Mixture):
        metrics = mixture_validation(model, dataset, cfg, precision, device, on_event)
        names = dataset.weights.names
        return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"],
                "by_source": {n: {"loss": metrics[f"val_loss/{n}"], "bpb": metrics[f"val_bpb/{n}"]} for n in names},
                "data": f"mixture of {', '.join(names)} (val splits, {cfg.train.eval_batches} x "
                        f"{cfg.train.batch_size} windows each, as in training)"}
    windows = BatchSampler(dataset.splits["val"], cfg.train.batch_size, cfg.model.block_size,
                           cfg.seed, "val", device)  # what the loop's validation draws
    total = cfg.train.eval_batches
    batches = ({"idx": x, "targets": y} for x, y in map(windows.batch, range(total)))
    metrics = validation_loss(model, _counting(batches, total, on_event), precision,
                          dataset.bytes_per_token["val"])
    return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"], "data": f"{dataset.path} (val split, "
            f"{total} x {cfg.train.batch_size} windows, as in training)"}


def _evaluate_inputs(model: Model, tokenizer: Tokenizer, inputs: list[str], split: str, batch_size: int,
                     precision: Precision, device: torch.device, text_field: str,
                     on_event: EventSink) -> dict:
    if len(inputs) == 1 and is_tokenized_dir(inputs[0]):
        dataset = TokenDataset.open(inputs[0])
        if dataset.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise GptcliError(f"{inputs[0]} was tokenized with {dataset.tokenizer.name}, not the "
                              f"checkpoint's {tokenizer.name}; pass the raw text instead")
        names = SPLITS if split == "all" else (split,)
        streams = [np.asarray(dataset.splits[name]) for name in names]
        n_bytes = sum(dataset.bytes_per_token[name] * len(dataset.splits[name]) for name in names)
        described = f"{inputs[0]} ({' + '.join(names)})"
    else:
        if split != "all":
            raise GptcliError("--split picks a split of a tokenized directory; raw text is evaluated whole")
        stream, n_bytes = encode_inputs(inputs, tokenizer, text_field)
        streams, described = [stream], " ".join(inputs)
    block = model.config.block_size
    plans = [(s, _window_starts(len(s), block, batch_size)) for s in streams]
    total = sum(len(groups) for _, groups in plans)
    if total == 0:
        raise GptcliError("the data has fewer than 2 tokens: nothing to predict")
    _check_batch_fits(model, batch_size, max(len(starts) for _, groups in plans for starts in groups), device)
    batches = (_batch(s, starts, block, device) for s, groups in plans for starts in groups)
    n_tokens = sum(len(s) for s in streams)
    n_targets = sum(max(len(s) - 1, 0) for s in streams)  # the first token of a stream is not scored
    # bits per byte = all nats / ln 2 / all bytes: bytes per *scored* token makes that exact.
    metrics = validation_loss(model, _counting(batches, total, on_event), precision, n_bytes / n_targets)
    return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"], "data": described,
            "tokens": n_tokens, "bytes": int(n_bytes)}


def _check_batch_fits(model: Model, batch_size: int, windows: int, device: torch.device) -> None:
    """Refuse a --batch-size whose largest batch (`windows` windows: fewer than asked when
    the data holds fewer) cannot fit beside the model: one block's activations over every
    window and the loss's chunk of logits (model/budget.py)."""
    sizes, block = Sizes.of(model), model.config.block_size

    def bytes_for(rows: int) -> int:
        return pass_bytes(sizes, rows, block, block, masked=False) + loss_bytes(sizes, rows * block)

    check_batch_fits(f"--batch-size {batch_size}", windows, bytes_for,
                     f"the activations and loss of {windows:,} windows of {block:,} tokens",
                     "use a smaller --batch-size", device)


def mixture_validation(model: Model, mixture: Mixture, cfg: RunConfig, precision: Precision,
                       device: torch.device, on_event: EventSink = ignore) -> dict[str, float]:
    """A mixture run's validation: from each source's val split the train.eval_batches
    batches a plain run draws from its own, each source's loss and bits per byte, and the
    mixture's (Mixture.combine: weighted by the sources' weights)."""
    t = cfg.train
    total, done, per_source = t.eval_batches * len(mixture.datasets), [0, 0], {}

    def counted(batches):
        for batch in batches:
            yield batch
            done[0] += 1
            done[1] += batch["targets"].numel()
            on_event(Progress("evaluating", done[0], total, done[1]))

    for name, dataset in zip(mixture.weights.names, mixture.datasets):
        windows = BatchSampler(dataset.splits["val"], t.batch_size, cfg.model.block_size, cfg.seed, "val", device)
        batches = ({"idx": x, "targets": y} for x, y in map(windows.batch, range(t.eval_batches)))
        per_source[name] = validation_loss(model, counted(batches), precision, dataset.bytes_per_token["val"])
    return mixture.combine(per_source)


def encode_inputs(inputs: list[str], tokenizer: Tokenizer, text_field: str = "text") -> tuple[np.ndarray, int]:
    """All documents of `inputs` as one token stream (end-of-text after each document, as
    tokenize writes shards) and the number of UTF-8 bytes it encodes."""
    pieces = list(iter_pieces(expand_inputs(inputs), text_field))
    encoded = tokenizer.encode_batch([p.text for p in pieces])
    parts = []
    for piece, ids in zip(pieces, encoded):
        parts.append(np.asarray(ids, dtype=np.int64))
        if piece.document_end:
            parts.append(np.array([tokenizer.eot_id], dtype=np.int64))
    if not parts:
        raise GptcliError(f"--data: {' '.join(inputs)} holds no text to evaluate")
    return np.concatenate(parts), sum(p.nbytes for p in pieces)


def _window_starts(n_tokens: int, block: int, batch_size: int) -> list[list[int]]:
    """Start offsets of consecutive windows over a stream of `n_tokens`, grouped into
    batches. A window is tokens[s : s+block+1] (inputs, and targets shifted by one), so
    each token after the first is a target exactly once. Full windows come `batch_size` to
    a batch; a shorter last window comes alone."""
    targets = max(n_tokens - 1, 0)
    full = [w * block for w in range(targets // block)]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if targets % block:
        groups.append([len(full) * block])
    return groups


def _batch(tokens: np.ndarray, starts: list[int], block: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The windows starting at `starts` as one batch: idx and targets, (B, T) each."""
    rows = np.stack([tokens[s:s + block + 1] for s in starts])  # (B, T+1), T <= block
    rows = torch.from_numpy(rows.astype(np.int64)).to(device)
    return {"idx": rows[:, :-1], "targets": rows[:, 1:]}


def _counting(batches, total: int, on_event: EventSink):
    """Pass `batches` through, reporting progress (batches and target tokens) after each."""
    tokens = 0
    for done, batch in enumerate(batches, start=1):
        yield batch
        tokens += batch["targets"].numel()
        on_event(Progress("evaluating", done, total, tokens))


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], precision: Precision,
                bytes_per_token: float | None = None) -> dict[str, float]:
    """Mean loss per target token over `batches`; bits per byte when bytes per token is known."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model):
        for batch in batches:
            with precision.autocast():
                total += model(**batch).double().cpu()
            count += int((batch["targets"] != IGNORE_INDEX).sum())
    metrics = {"val_loss": total.item() / max(count, 1)}
    if bytes_per_token:
        metrics["val_bpb"] = metrics["val_loss"] / math.log(2) / bytes_per_token
    return metrics
