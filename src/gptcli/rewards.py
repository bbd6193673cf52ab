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
- contains: one of the references appears in the answer as a run of whole words;
- exact: the answer's final answer (`final_answer`: the last `\\boxed{...}`, else the last
  number) equals a reference's, as numbers where both are numbers (math answers).

A user's own: `FILE.py:FUNCTION` (or an importable `module:function`), a function
`(prediction: str, references: list[str])` returning a number in [0, 1] (a bool counts as
0 or 1). Reinforcement learning (tasks/grpo.py) weighs several such scores, and takes its
users' functions as `(prompt, completion, answer) -> float` through `load_function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = "\\boxed{"


def final_answer(text: str) -> str:
    """The answer a worked solution ends on: the contents of its last `\\boxed{...}`
    (braces balanced), else its last number (thousands commas dropped), else the text."""
    start = text.rfind(_BOXED)
    if start >= 0:
        depth, begin = 1, start + len(_BOXED)
        for end in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[begin:end].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else text.strip()


def exact(prediction: str, references: Sequence[str]) -> float:
    """1 when the final answers agree: as numbers when both are (`2.50` is `2.5`), else as
    normalised text."""
    answer = final_answer(prediction)
    return float(any(_same_answer(answer, final_answer(ref)) for ref in references))


def _same_answer(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return normalize_answer(a) == normalize_answer(b)


BUILT_IN: dict[str, Reward] = {"exact_match": exact_match, "f1": token_f1, "contains": contains, "exact": exact}


def get_reward(name: str, option: str = "--reward") -> Reward:
    """A built-in reward by name, or a user's function (`load_function`); every result it
    returns is checked to be a number in [0, 1]."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if not is_function_name(name):
        raise GptcliError(f"{option}: unknown reward {name!r}; use one of {', '.join(BUILT_IN)} or "
                          f"FILE.py:FUNCTION")
    return _checked(load_function(name, option), name, option)


def is_function_name(name: str) -> bool:
    """Whether `name` names a user's function: `FILE.py:FUNCTION` or `module:function`."""
    path, _, function = name.rpartition(":")
    return bool(path) and function.isidentifier()


def load_function(name: str, option: str) -> Callable:
    """The function `FILE.py:FUNCTION` (a file, loaded as a module of its own) or
    `module:function` (importable from the current environment) names."""
    path, _, function = name.rpartition(":")
    if path.endswith(".py") and not Path(path).is_file():
        raise GptcliError(f"{option}: {path} does not exist")
    try:
        module = _module_from_file(Path(path)) if path.endswith(".py") else importlib.import_module(path)
    except Exception as exc:  # the user's code: any failure is theirs to fix
        raise GptcliError(f"{option}: {path} failed to load: {type(exc).__name__}: {exc}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise GptcliError(f"{option}: {path} has no function {function!r}")
    return found


def _module_from_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gptcli_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checked(reward: Callable, name: str, option: str) -> Reward:
    def checked(prediction: str, references: Sequence[str]) -> float:
        value = reward(prediction, list(references))
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
            raise GptcliError(f"{option} {name} returned {value!r}; a reward is a number in [0, 1]")
        return float(value)

    return checked
