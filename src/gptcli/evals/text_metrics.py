"""Metrics of generated text against references, each computed by the library papers cite:

- exact_match, f1: SQuAD's exact match and token F1 after its answer normalisation
  (rewards.py), the best over an item's references; question answering.
- rouge1, rouge2, rougeL: Google's `rouge-score` with its defaults (its tokenizer, no
  stemming), the F-measure against the best reference (`score_multi`), averaged over
  items; summarisation. On a 0-1 scale.
- bleu, chrf: `sacrebleu`'s corpus BLEU and chrF with its default settings, every item's
  references as extra reference streams; translation. On sacrebleu's 0-100 scale.
- pass@K: the chance that at least one of K samples is correct, by the unbiased estimator
  of Chen et al. 2021 over the n >= K samples drawn per item; a sample is correct when the
  reward (rewards.py: exact_match unless told otherwise) gives it 1.

The per-item metrics score each item's first sample; their standard error is the sample
standard deviation over items / sqrt(n). A corpus metric has no per-item score: its
standard error is the standard deviation of the metric over 100 bootstrap resamples of
the items (what lm-evaluation-harness does for BLEU and chrF), seeded, so it repeats.
rouge-score and sacrebleu are the optional extra `gptcli[eval]`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptcli.errors import GptcliError
from gptcli.rewards import Reward, exact_match, token_f1

PER_ITEM = {"exact_match": exact_match, "f1": token_f1}
ROUGE = ("rouge1", "rouge2", "rougeL")
CORPUS = ("bleu", "chrf")
PASS_AT = re.compile(r"pass@([1-9][0-9]*)")
NAMES = (*PER_ITEM, *ROUGE, *CORPUS, "pass@K")
DEFAULT = ("exact_match", "f1")
EXTRA = "pip install 'gptcli[eval]'"
_LIBRARIES = {**dict.fromkeys(ROUGE, ("rouge_score", "rouge-score")), **dict.fromkeys(CORPUS, ("sacrebleu", "sacrebleu"))}
BOOTSTRAP_RESAMPLES = 100
BOOTSTRAP_SEED = 1234


def check_metrics(names: Sequence[str], samples: int, option: str = "--metrics") -> tuple[str, ...]:
    """`names` if every one is a metric this module computes, its library is installed,
    and (pass@K) K is at most the `samples` drawn per item."""
    if not names:
        raise GptcliError(f"{option}: name at least one metric ({', '.join(NAMES)})")
    for name in names:
        pass_at = PASS_AT.fullmatch(name)
        if pass_at:
            if int(pass_at.group(1)) > samples:
                raise GptcliError(f"{option}: {name} needs at least {pass_at.group(1)} samples per item; "
                                  f"add --num-samples {pass_at.group(1)} (or more)")
        elif name not in PER_ITEM and name not in _LIBRARIES:
            raise GptcliError(f"{option}: unknown metric {name!r}; use {', '.join(NAMES)} (pass@K, K a number)")
        elif name in _LIBRARIES:
            module, package = _LIBRARIES[name]
            try:
                importlib.import_module(module)
            except ImportError:
                raise GptcliError(f"{option}: {name} needs {package}, an optional extra: {EXTRA}") from None
    if len(set(names)) != len(names):
        raise GptcliError(f"{option}: a metric is named twice ({', '.join(names)})")
    return tuple(names)


@dataclass
class Scores:
    per_item: list[dict[str, float]]  # each item's score by metric (corpus metrics have none)
    metrics: dict[str, float]  # each metric over all items, and NAME_stderr its standard error


def score(samples: Sequence[Sequence[str]], references: Sequence[Sequence[str]], metrics: Sequence[str],
          reward: Reward = exact_match) -> Scores:
    """Every metric of `metrics` (checked by check_metrics) for items whose generated
    `samples` (at least one each) answer `references` (at least one each)."""
    first = [s[0] for s in samples]
    columns: dict[str, list[float]] = {}
    totals: dict[str, float] = {}
    for name in metrics:
        if name in PER_ITEM:
            columns[name] = [PER_ITEM[name](p, refs) for p, refs in zip(first, references)]
        elif name in ROUGE:
            if name not in columns:  # every ROUGE variant asked for, in one pass
                columns.update(_rouge(first, references, [m for m in metrics if m in ROUGE]))
        elif name in CORPUS:
            totals[name], totals[f"{name}_stderr"] = _corpus(name, first, references)
        else:
            k = int(PASS_AT.fullmatch(name).group(1))
            columns[name] = [pass_at_k(len(s), sum(reward(x, refs) >= 1 for x in s), k)
                             for s, refs in zip(samples, references)]
    for name in metrics:
        if name in columns:
            totals[name] = float(np.mean(columns[name]))
            totals[f"{name}_stderr"] = stderr_of_mean(columns[name])
    per_item = [{name: values[i] for name, values in columns.items()} for i in range(len(first))]
    ordered = {key: totals[key] for name in metrics for key in (name, f"{name}_stderr")}
    return Scores(per_item, ordered)


def stderr_of_mean(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n): the standard error of a mean over items (nan for one item)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def pass_at_k(n: int, correct: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, drawn
    without replacement include a correct one, as a product that cannot overflow."""
    if n - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def _rouge(predictions: list[str], references: Sequence[Sequence[str]], names: list[str]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(names)
    scores = [scorer.score_multi(list(refs), prediction) for prediction, refs in zip(predictions, references)]
    return {name: [float(s[name].fmeasure) for s in scores] for name in names}


def corpus_score(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU or chrF. Items with fewer references than the most have None
    in the remaining streams (sacrebleu's way of a variable number of references)."""
    import sacrebleu

    most = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    metric = sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf
    return float(metric(list(predictions), streams).score)


def _corpus(name: str, predictions: list[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """The corpus metric and its bootstrap standard error (module docstring)."""
    value = corpus_score(name, predictions, references)
    if len(predictions) < 2:
        return value, float("nan")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resampled = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = rng.integers(0, len(predictions), len(predictions))
        resampled.append(corpus_score(name, [predictions[i] for i in picks], [references[i] for i in picks]))
    return value, float(np.std(resampled, ddof=1))
