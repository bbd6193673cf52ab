"""What a classifier must beat to be worth its cost: a multinomial naive Bayes over word
counts, fitted on the classifier's own training texts (the majority-class baseline is a
count, kept with the metrics in classify.py and tasks/classify.py).

A word is a maximal run of letters, digits and underscores (regex `\\w+`, Unicode-aware)
after lowercasing; everything else only separates words. So prose splits into its words and
code into its identifiers and keywords (`self._loop.call_soon(cb)`: self, _loop, call_soon,
cb), which is what a bag of words of either should count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
MAX_CELLS = 10_000_000  # at most this many (class, word) log-likelihoods: 80 MB of float64


def words(text: str) -> list[str]:
    """The words of `text`, lowercased, in order (see the module docstring)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class NaiveBayes:
    """Multinomial naive Bayes: the class maximising log P(class) + sum over the text's words
    of count(word) * log P(word | class). Words never seen in training are ignored."""

    vocabulary: dict[str, int]  # word -> column of log_likelihood
    log_prior: np.ndarray  # (K,) log of each class's share of the training texts
    log_likelihood: np.ndarray  # (K, V) log P(word | class), Laplace-smoothed

    @classmethod
    def fit(cls, texts: list[str], y: np.ndarray, n_classes: int, alpha: float = 1.0) -> NaiveBayes:
        """Fit on `texts` with class indices `y` (N,). P(word | class) = (count + alpha) /
        (class's word total + alpha * V), alpha = 1: Laplace smoothing. With K classes the
        vocabulary is cut to its MAX_CELLS // K most frequent words (ties: first seen)."""
        docs = [words(t) for t in texts]
        vocabulary: dict[str, int] = {}
        for doc in docs:
            for word in doc:
                vocabulary.setdefault(word, len(vocabulary))
        word_ids = np.fromiter((vocabulary[w] for doc in docs for w in doc), dtype=np.int64)
        doc_of_word = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])  # (total words,)
        room = max(1, MAX_CELLS // n_classes)
        if len(vocabulary) > room:  # many classes: keep the most frequent words
            kept = np.argsort(-np.bincount(word_ids, minlength=len(vocabulary)), kind="stable")[:room]
            column = np.full(len(vocabulary), -1)
            column[kept] = np.arange(len(kept))
            vocabulary = {w: int(column[i]) for w, i in vocabulary.items() if column[i] >= 0}
            keep = column[word_ids] >= 0
            word_ids, doc_of_word = column[word_ids[keep]], doc_of_word[keep]
        counts = np.zeros((n_classes, len(vocabulary)))
        np.add.at(counts, (y[doc_of_word], word_ids), 1)
        smoothed = counts + alpha
        with np.errstate(divide="ignore"):  # a class absent from training: log 0, never predicted
            log_prior = np.log(np.bincount(y, minlength=n_classes) / len(y))
        return cls(vocabulary, log_prior, np.log(smoothed / smoothed.sum(axis=1, keepdims=True)))

    def predict(self, texts: list[str]) -> np.ndarray:
        """The most likely class index of each text: (N,)."""
        scores = np.tile(self.log_prior, (len(texts), 1))  # (N, K)
        for row, text in enumerate(texts):
            ids = [self.vocabulary[w] for w in words(text) if w in self.vocabulary]
            scores[row] += self.log_likelihood[:, ids].sum(axis=1)
        return scores.argmax(axis=1)
