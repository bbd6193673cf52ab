"""`train.eval_tasks`: the tasks a language-model run scores at every evaluation, beside
its validation loss: multiple choice (choice.py) and generation (generation.py). Their
files are read when the run starts, so a bad one stops it before any training."""

from __future__ import annotations

from gptcli.config import EvalTask
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.evals.choice import ChoiceTasks
from gptcli.evals.generation import GenerateTasks
from gptcli.model import Model
from gptcli.runtime import Precision


class EvalTasks:
    def __init__(self, tasks: list[EvalTask], tokenizer: Tokenizer):
        self.choice = ChoiceTasks([t for t in tasks if t.task != "generate"], tokenizer)
        self.generate = GenerateTasks([t for t in tasks if t.task == "generate"], tokenizer)

    def scores(self, model: Model, precision: Precision) -> dict[str, float]:
        """`NAME/acc`, `NAME/acc_norm` of each multiple-choice task, `NAME/METRIC` of each
        generation task's metrics (none without tasks)."""
        return {**self.choice.scores(model, precision), **self.generate.scores(model, precision)}
