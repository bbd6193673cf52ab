"""Generation tasks (`gptcli eval --task generate`): question answering, summarisation,
translation, anything answered by generating text, scored against references.

An item is a record `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}` (a
conversation ending where the reply goes), with `{"reference": str}` or `{"references":
[str, ...]}`. Its prompt goes through the checkpoint's chat format when it has one (unless
`raw`: the text continued as it is), keeps its last context - max_new_tokens tokens
(lm-evaluation-harness's rule), and every item is generated through one GenerationSession
by continuous batching (infer/session.py: generate_many): greedy by default, so each
prediction is what `gptcli sample --temperature 0` gives for its prompt. The metrics are
text_metrics.py's.

Beside the model, a baseline that needs none: the prompt copied as the answer (the lead
baseline of summarisation, the source sentence of translation), or, where every prompt is
a Python signature `def name(...):` (the built-in stdlib-docstrings example), the
function's name split into words. A generated answer that does not beat it has not earned
its cost.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from gptcli import atomic
from gptcli.config import EvalTask
from gptcli.data.text.records import Record, read_records, where
from gptcli.data.tokenizers.chat_format import ROLES
from gptcli.data.tokenizers.tokenizer import Tokenizer
from gptcli.data.training.examples import finetune_records
from gptcli.errors import GptcliError
from gptcli.evals.text_metrics import DEFAULT, check_metrics, score
from gptcli.events import EventSink, Progress, ignore
from gptcli.infer.engine import BatchEngine
from gptcli.infer.load import language_model, load
from gptcli.infer.speculative import draft_problems, speculation_for
from gptcli.infer.session import GenerationSession, GenerationSettings, Prompt, Sample
from gptcli.model import Model
from gptcli.model.budget import check_batch_fits
from gptcli.outputs import check_output_file, input_paths
from gptcli.rewards import get_reward
from gptcli.runtime import Precision, eval_mode
from gptcli.store.checkpoint import training_config

GREEDY = GenerationSettings(temperature=0.0)
DEFAULT_MAX_NEW_TOKENS = 256  # `gptcli sample`'s, or half the context when that is less


@dataclass(frozen=True)
class GenerateItem:
    where: str  # `file:LINE` of its record, for messages
    references: tuple[str, ...]
    prompt: str | None = None  # one of prompt and messages
    messages: tuple[dict, ...] | None = None

    @property
    def last_text(self) -> str:
        """The text the answer responds to: the prompt, or the last message."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]

    def as_json(self) -> dict:
        return {"prompt": self.prompt} if self.prompt is not None else {"messages": list(self.messages)}


def read_generate_items(path: str | Path, limit: int | None = None) -> list[GenerateItem]:
    """The items of a JSONL (maybe compressed), CSV or Parquet file, the first `limit`."""
    if limit is not None and limit < 1:
        raise GptcliError(f"--limit must be at least 1, got {limit}")
    records = read_records(path)[:limit]
    if not records:
        raise GptcliError(f"{path} holds no items")
    return [item_of(record, where(path, record)) for record in records]


def item_of(record: Record | dict, place: str) -> GenerateItem:
    """One item from a record (see the module docstring), or an error naming `place`."""
    if "references" in record:
        references = record["references"]
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise GptcliError(f"{place}: 'references' must be a list of texts")
        if not references:
            raise GptcliError(f"{place}: 'references' is empty; give at least one reference")
    elif isinstance(record.get("reference"), str):
        references = [record["reference"]]
    else:
        raise GptcliError(f"{place}: no 'reference' text or 'references' list; a generate item has a "
                          f"prompt (or messages) and its reference(s)")
    if isinstance(record.get("prompt"), str):
        return GenerateItem(place, tuple(references), prompt=record["prompt"])
    if "messages" in record:
        return GenerateItem(place, tuple(references), messages=_prompt_messages(record["messages"], place))
    raise GptcliError(f"{place}: no 'prompt' text or 'messages' list; a generate item has a prompt "
                      f"(or messages) and its reference(s)")


def _prompt_messages(messages: object, place: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise GptcliError(f"{place}: 'messages' must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
            raise GptcliError(f"{place}: every message needs a 'role' ({', '.join(ROLES)}) and a string 'content'")
    if messages[-1]["role"] == "assistant":
        raise GptcliError(f"{place}: the messages end with an assistant turn; end them where the reply "
                          f"goes and give the expected reply as 'reference'")
    return tuple({"role": t["role"], "content": t["content"]} for t in messages)


def own_validation_items(checkpoint: Path) -> tuple[list[GenerateItem], str]:
    """An instruct finetune's validation conversations (rebuilt from the config in its
    checkpoint, as its run held them out), each up to its last reply, that reply the
    reference; and what to call them."""
    training = training_config(checkpoint)
    if training is None or training.finetune.task != "instruct":
        raise GptcliError(f"{checkpoint} is not an instruct finetune, so it has no validation split to "
                          f"generate for; give the items with --data FILE")
    _train, val, source = finetune_records(training)
    source = training.finetune.val_file or source
    items = []
    for record in val:
        place = where(source, record)
        if "messages" in record:
            turns = record["messages"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict) \
                    or turns[-1].get("role") != "assistant":
                raise GptcliError(f"{place}: the conversation does not end with an assistant reply to compare with")
            items.append(item_of({"messages": turns[:-1], "reference": turns[-1].get("content")}, place))
        else:
            items.append(item_of({"prompt": record.get("prompt"), "reference": record.get("response")}, place))
    return items, f"{source} (validation split)"


# --- generating -------------------------------------------------------------------------------


def item_prompt(session: GenerationSession, item: GenerateItem, raw: bool, max_new_tokens: int) -> Prompt:
    """The prompt of `item` as the session builds it, fitted to leave room for the answer."""
    try:
        if item.messages is not None:
            if raw:
                raise GptcliError("--raw continues text; this item is a conversation (give 'prompt' instead)")
            prompt = session.chat_prompt(list(item.messages))
        else:
            prompt = session.prompt(item.prompt, raw=raw)
    except GptcliError as exc:
        raise GptcliError(f"{item.where}: {exc}") from None
    return session.fit(prompt, max_new_tokens)


def generate_answers(session: GenerationSession, items: list[GenerateItem], settings: GenerationSettings,
                     raw: bool = False, samples: int = 1, batch_size: int = 16,
                     on_event: EventSink = ignore) -> list[list[Sample]]:
    """`samples` answers to every item, `batch_size` rows decoding at once; with the session's
    speculation, one item at a time (the same answers greedily)."""
    if batch_size < samples:
        raise GptcliError(f"--batch-size {batch_size} must be at least --num-samples {samples} (an item's "
                          f"samples decode together)")
    prompts = [item_prompt(session, item, raw, settings.max_new_tokens) for item in items]
    rows = max(samples, min(batch_size, samples * len(items)))
    device = next(session.model.parameters()).device
    check_batch_fits(f"--batch-size {batch_size}", rows, lambda n: BatchEngine.bytes_needed(session.model, n),
                     "the KV cache and activations of that many rows, each a whole context long",
                     "use a smaller --batch-size", device)
    done = 0

    def finished(_index: int) -> None:
        nonlocal done
        done += 1
        on_event(Progress("generating", done, len(items)))

    on_event(Progress("generating", 0, len(items)))
    if session.speculation is not None:  # speculation is one sequence at a time: the items in turn
        answers = []
        for index, prompt in enumerate(prompts):
            answers.append(session.generate(prompt, settings))
            finished(index)
        return answers
    return session.generate_many(prompts, settings, samples, batch_size, on_done=finished)


# --- baselines ---------------------------------------------------------------------------------

_SIGNATURE = re.compile(r"\s*def\s+(\w+)\s*\(")
_WORD_BREAK = re.compile(r"_+|(?<=[a-z0-9])(?=[A-Z])")


def baseline(items: list[GenerateItem]) -> tuple[str, list[str]]:
    """The no-model answer to every item, and what it is (module docstring)."""
    names = [_SIGNATURE.match(item.last_text) for item in items]
    if all(names):
        return "the function's name as words", [" ".join(_WORD_BREAK.split(m.group(1))).strip() for m in names]
    return "the prompt copied", [item.last_text for item in items]


# --- gptcli eval --task generate -----------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    data: str | None  # None: an instruct finetune's own validation split
    metrics: tuple[str, ...] = DEFAULT
    settings: GenerationSettings = GREEDY  # how to sample and stop (its max_new_tokens is unused)
    max_new_tokens: int | None = None  # the budget; None: DEFAULT_MAX_NEW_TOKENS, at most half the context
    raw: bool = False
    samples: int = 1  # per item, for pass@K
    reward: str = "exact_match"  # what makes a sample correct for pass@K
    limit: int | None = None
    batch_size: int = 16  # rows decoding at once
    predictions: Path | None = None  # JSONL, one line per item
    draft: str | None = None  # speculative decoding, one item at a time: a draft checkpoint or "ngram"
    draft_tokens: int = 4


def eval_generate_checkpoint(checkpoint: Path, request: GenerateRequest, device: str = "auto",
                             precision: str = "auto", quantize: str = "none",
                             on_event: EventSink = ignore) -> tuple[Path, dict]:
    """Generate an answer to every item and score them (module docstring); the metrics,
    the baseline's, and the speed."""
    metrics = check_metrics(request.metrics, request.samples)
    given = request.max_new_tokens
    problems = dataclasses.replace(request.settings, max_new_tokens=1 if given is None else given).problems()
    if problems:
        raise GptcliError(problems[0])
    if request.samples < 1:
        raise GptcliError(f"--num-samples must be at least 1, got {request.samples}")
    problems = draft_problems(request.draft, request.draft_tokens, request.samples)
    if problems:
        raise GptcliError("; ".join(problems))
    reward = get_reward(request.reward)
    if request.data is not None:
        items, source = read_generate_items(request.data, request.limit), request.data
    else:
        items, source = own_validation_items(checkpoint)
        items = items[:request.limit]
    predictions = None
    if request.predictions is not None:
        inputs = [checkpoint] + ([Path(request.data)] if request.data else [])
        predictions = check_output_file(request.predictions, input_paths(inputs), "--predictions")
    loaded = load(checkpoint, device, precision, quantize, expect=("lm", "chat"))
    speculation = speculation_for(request.draft, request.draft_tokens, loaded, precision, quantize)
    session = GenerationSession(loaded, speculation)
    budget = min(DEFAULT_MAX_NEW_TOKENS, session.context // 2) if given is None else given
    settings = dataclasses.replace(request.settings, max_new_tokens=budget)
    started = time.perf_counter()
    answers = generate_answers(session, items, settings, request.raw, request.samples, request.batch_size, on_event)
    seconds = time.perf_counter() - started
    references = [item.references for item in items]
    scores = score([[s.text for s in row] for row in answers], references, metrics, reward)
    kind, guesses = baseline(items)
    plain = [m for m in metrics if not m.startswith("pass@")]
    baseline_scores = score([[g] for g in guesses], references, plain).metrics if plain else {}
    if predictions is not None:
        _write_predictions(predictions, items, answers, scores.per_item)
    return session.loaded.path, {
        "task": "generate", "data": str(source), "items": len(items), **scores.metrics,
        "baseline": kind, **{f"baseline_{name}": value for name, value in baseline_scores.items()},
        "samples_per_item": request.samples, "temperature": settings.temperature, "max_new_tokens": budget,
        "generated_tokens": sum(len(s.tokens) for row in answers for s in row),
        "seconds": seconds, "items_per_second": len(items) / seconds,
        **({"speculation": speculation.stats.as_dict()} if speculation is not None else {}),
    }


def _write_predictions(path: Path, items: list[GenerateItem], answers: list[list[Sample]],
                       per_item: list[dict]) -> None:
    """One JSON line per item: its prompt, prediction (the first sample), references, its
    scores, and every sample when there are several. Written whole or not at all."""
    lines = []
    for item, samples, scores in zip(items, answers, per_item):
        line = {**item.as_json(), "prediction": samples[0].text, "references": list(item.references), **scores}
        if len(samples) > 1:
            line["samples"] = [s.text for s in samples]
        lines.append(json.dumps(line, ensure_ascii=False))
    atomic.write_text(path, "".join(f"{line}\n" for line in lines))


# --- train.eval_tasks ----------------------------------------------------------------------------


class GenerateTasks:
    """Generation tasks of `train.eval_tasks`, scored at every evaluation of a run (greedy).
    The files are read when the run starts, so a bad one stops it before training."""

    def __init__(self, tasks: list[EvalTask], tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tasks = [(task, read_generate_items(task.data, task.limit)) for task in tasks]
        for task, _ in self.tasks:
            check_metrics(task.metrics, 1, f"train.eval_tasks ({task.metric_name}).metrics")

    def scores(self, model: Model, precision: Precision) -> dict[str, float]:
        """`NAME/METRIC` for every metric of every task (none without tasks)."""
        if not self.tasks:
            return {}
        model = getattr(model, "_orig_mod", model)  # a compiled model's own module: generation is not compiled
        session = GenerationSession(language_model(Path("(the model in training)"), model, self.tokenizer))
        found = {}
        with eval_mode(model):
            for task, items in self.tasks:
                settings = GenerationSettings(task.max_new_tokens, temperature=0.0, stops=tuple(task.stop))
                with precision.autocast():
                    answers = generate_answers(session, items, settings, task.raw)
                result = score([[s.text for s in row] for row in answers], [i.references for i in items],
                               task.metrics)
                found.update({f"{task.metric_name}/{name}": result.metrics[name] for name in task.metrics})
        return found

