"""Built-in example datasets made from the running Python's standard library (and one of
letters), so every finetune task can be demonstrated on any machine with no download.
They have no file: their records are numbered 1, 2, ... in the order returned (fixed by
the seed), and `source_name` names them for messages. `finetune_records` gives a finetune
its training and validation records, from a file or a built-in example; `labelled_splits`
their texts and labels for a classifier."""

from __future__ import annotations

import ast
import random
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcli.config import FinetuneRunConfig
from gptcli.data.text.corpus import stdlib_files
from gptcli.data.text.records import Record, column, numbered, read_records
from gptcli.errors import GptcliError

STDLIB_PACKAGES = "stdlib-packages"
STDLIB_DOCSTRINGS = "stdlib-docstrings"
STDLIB_PREFERENCES = "stdlib-preferences"
LATER_LETTER = "later-letter"
# Four packages with distinct vocabularies and thousands of lines each on CPython 3.11.
PACKAGES = ("asyncio", "email", "tkinter", "xml")


def source_name(example: str) -> str:
    """What messages call a built-in example, as Python says `<stdin>`: `<stdlib-docstrings>:17`
    is its record 17."""
    return f"<{example}>"


def stdlib_package_snippets(lines: int = 6, per_class: int = 500, seed: int = 0) -> list[Record]:
    """Records {"text": a snippet of `lines` source lines, "label": its top-level package},
    at most `per_class` per package, shuffled with `seed`. Snippets of under 80 characters
    (mostly blank lines) are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    records = []
    for package in PACKAGES:
        snippets = []
        for path in stdlib_files():
            if path.relative_to(root).parts[0] != package:
                continue
            source = path.read_text(encoding="utf-8").splitlines(keepends=True)
            for start in range(0, len(source), lines):
                text = "".join(source[start:start + lines])
                if len(text.strip()) >= 80:
                    snippets.append(text)
        rng.shuffle(snippets)
        records += [{"text": t, "label": package} for t in snippets[:per_class]]
    rng.shuffle(records)
    return numbered(records)


def stdlib_docstring_pairs(limit: int = 3000, seed: int = 0) -> list[Record]:
    """Records {"prompt": "def name(args):", "response": first line of its docstring} for
    public functions of the standard library: an instruction-style task with no download."""
    rng = random.Random(seed)
    records = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError:  # lib2to3 and friends keep Python 2 fixtures
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and 10 <= len(doc.splitlines()[0]) <= 120:
                    signature = f"def {node.name}({ast.unparse(node.args)}):"
                    records.append({"prompt": signature, "response": doc.splitlines()[0]})
    rng.shuffle(records)
    return numbered(records[:limit])


def stdlib_preference_pairs(limit: int = 2500, seed: int = 0) -> list[Record]:
    """Records {"prompt": "def name(args):", "chosen": the first line of its docstring,
    "rejected": the first line of an unrelated function's}: the standard library's
    documented functions (stdlib_docstring_pairs) shuffled, the first `limit` giving the
    prompts and chosen answers, the others the rejected ones. No text is chosen in one pair
    and rejected in another (the validation split's chosen answers would otherwise be
    trained as rejected), so preferring the chosen one means reading the signature."""
    functions = stdlib_docstring_pairs(limit=1_000_000, seed=seed)
    pairs, others = functions[:limit], functions[limit:]
    chosen = {pair["response"] for pair in pairs}
    pool = [other["response"] for other in others if other["response"] not in chosen]
    rng = random.Random(seed + 1)
    return numbered([{"prompt": pair["prompt"], "chosen": pair["response"], "rejected": rng.choice(pool)}
                     for pair in pairs])


def later_letter_questions(seed: int = 0) -> list[Record]:
    """Records {"prompt": "Which letter comes later in the alphabet, q or f?", "answer": "q",
    "response": "q"} for the 650 ordered pairs of distinct lowercase letters, shuffled: a task
    with a checkable answer for reinforcement learning (`answer`), whose form a short
    supervised finetune (`response`) teaches and whose rule (the alphabet's order) it leaves
    half learned."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in string.ascii_lowercase for b in string.ascii_lowercase if a != b]
    rng.shuffle(pairs)
    return numbered([{"prompt": f"Which letter comes later in the alphabet, {a} or {b}?", "answer": max(a, b),
                      "response": max(a, b)} for a, b in pairs])


_EXAMPLES = {STDLIB_PACKAGES: stdlib_package_snippets, STDLIB_DOCSTRINGS: stdlib_docstring_pairs,
             STDLIB_PREFERENCES: stdlib_preference_pairs, LATER_LETTER: later_letter_questions}
_TASK_EXAMPLE = {"classify": STDLIB_PACKAGES, "instruct": STDLIB_DOCSTRINGS, "dpo": STDLIB_PREFERENCES,
                 "grpo": LATER_LETTER}


def finetune_records(cfg: FinetuneRunConfig) -> tuple[list[Record], list[Record], str]:
    """Training and validation records of a finetune, and what messages call the training
    data: `val_file`, or `val_fraction` of `train_file` held out after a shuffle seeded by
    `cfg.seed` (so `gptcli eval` can rebuild the split a classifier trained on)."""
    f = cfg.finetune
    if not f.train_file:
        raise GptcliError(f"finetune.train_file: required for --task {f.task} (CSV, TSV, JSONL or Parquet; "
                          f"or {_TASK_EXAMPLE.get(f.task, STDLIB_DOCSTRINGS)} for the built-in example)")
    if f.train_file in _EXAMPLES:
        train, source = _EXAMPLES[f.train_file](seed=cfg.seed), source_name(f.train_file)
    else:
        train, source = read_records(f.train_file), f.train_file
    if f.val_file:
        return train, read_records(f.val_file), source
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    n_val = max(1, round(len(train) * f.val_fraction))
    if n_val >= len(train):
        raise GptcliError(f"{f.train_file} has {len(train)} records: too few to "
                          f"hold out a validation set; add data or a val_file")
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]], source


@dataclass(frozen=True)
class LabelledSplits:
    """A classify finetune's (texts, labels) of each split, as strings, and what messages
    call each split's data."""

    train: tuple[list[str], list[str]]
    val: tuple[list[str], list[str]]
    train_source: str
    val_source: str


def labelled_splits(cfg: FinetuneRunConfig) -> LabelledSplits:
    """The texts and labels (finetune.text_column, label_column) of finetune_records' splits:
    what a classifier trains and validates on, and what `gptcli eval` rebuilds for it."""
    f = cfg.finetune
    train, val, source = finetune_records(cfg)
    val_source = f.val_file or source

    def texts_and_labels(records: list[Record], where: str) -> tuple[list[str], list[str]]:
        return ([str(t) for t in column(records, f.text_column, where, "finetune.text_column")],
                [str(y) for y in column(records, f.label_column, where, "finetune.label_column")])

    return LabelledSplits(texts_and_labels(train, source), texts_and_labels(val, val_source), source, val_source)
