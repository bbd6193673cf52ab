"""Verifiable rewards: functions that score one generated answer against its references,
from 0 (wrong) to 1 (right), with no model in the loop. `gptcli eval --task generate`
counts a sample correct for pass@k when its reward is 1 (evals/text_metrics.py), and
reinforcement learning with verifiable rewards trains on the same functions.

    reward = get_reward("exact_match")
    reward("The Eiffel Tower.", ["eiffel tower"])   # 1.0

Built in, each after SQuAD's answer normalisation (`normalize_answer`: lower case,
punctuation dropped, the articles a/an/the dropped, whitespace collapsed):
- exact_match: the answer equals one of the references;
- f1: SQuAD's token F1 (the overlap of the two bags of words) against the best reference;
- contains: one of the references appears in the answer as a run of whole words.

A user's own: `FILE.py:FUNCTION`, a function `(prediction: str, references: list[str])`
returning a number in [0, 1] (a bool counts as 0 or 1).
"""

from __future__ import annotations

import importlib.util
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from gptcli.errors import GptcliError

Reward = Callable[[str, Sequence[str]], float]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(ref) for ref in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's F1 of the normalised words, the best over the references. An empty side
    scores 1 when both are empty, else 0 (SQuAD 2.0's rule for unanswerable questions)."""
    answer = normalize_answer(prediction).split()
    return max((_f1(answer, normalize_answer(ref).split()) for ref in references), default=0.0)


def _f1(answer: list[str], reference: list[str]) -> float:
    if not answer or not reference:
        return float(answer == reference)
    shared = sum((Counter(answer) & Counter(reference)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(answer), shared / len(reference)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, references: Sequence[str]) -> float:
    answer = f" {normalize_answer(prediction)} "
    return float(any(ref and f" {ref} " in answer for ref in map(normalize_answer, references)))


BUILT_IN: dict[str, Reward] = {"exact_match": exact_match, "f1": token_f1, "contains": contains}


def get_reward(name: str, option: str = "--reward") -> Reward:
    """A built-in reward by name, or `FILE.py:FUNCTION` loaded from a user's file; every
    result it returns is checked to be a number in [0, 1]."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    path, _, function = name.rpartition(":")
    if not path.endswith(".py") or not function:
        raise GptcliError(f"{option}: unknown reward {name!r}; use one of {', '.join(BUILT_IN)} or "
                          f"FILE.py:FUNCTION")
    if not Path(path).is_file():
        raise GptcliError(f"{option}: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"gptcli_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any failure is theirs to fix
        raise GptcliError(f"{option}: {path} failed to load: {type(exc).__name__}: {exc}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise GptcliError(f"{option}: {path} has no function {function!r}")
    return _checked(found, name, option)


def _checked(reward: Callable, name: str, option: str) -> Reward:
    def checked(prediction: str, references: Sequence[str]) -> float:
        value = reward(prediction, list(references))
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
            raise GptcliError(f"{option} {name} returned {value!r}; a reward is a number in [0, 1]")
        return float(value)

    return checked
