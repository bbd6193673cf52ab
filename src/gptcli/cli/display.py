"""Rich renderers for library events, all on stderr (stdout is kept for requested data).

On a terminal they draw live progress bars; otherwise (CI, a log file) they print one
plain line per logged step, so logs stay readable.

Text from the user (paths, run names, labels, tokenizer names, keys read from files, error
messages) is shown verbatim: it goes into tables as `Text` and into markup lines through
`escape`, because rich would read `runs/exp[lr=3e-4]` as a style tag and drop it, and
raise on a `[/]`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from gptcli.events import (
    CheckpointSaved,
    EvalDone,
    Notice,
)
from gptcli.events import Progress as ProgressEvent
from gptcli.events import RunFinished, RunStarted, StepLogged

# Scalar metrics shown per eval, besides the one that picks the best checkpoint (DPO's
# val_rewards/accuracies, GRPO's val_pass@1).
_EVAL_KEYS = ("val_loss", "val_bpb", "val_accuracy", "val_macro_f1", "val_reward")
# Long messages stay one line for grep; emoji codes are text too (`:cat:` in a path stays).
console = Console(stderr=True, soft_wrap=True, emoji=False)


def notice(message: str) -> None:
    console.print(_note(message), highlight=False)


def _note(message: str) -> str:
    return f"[yellow]note:[/] {escape(message)}"


def show_checkpoint(path: object) -> None:
    """Which checkpoint a command used, dimmed, after its output."""
    console.print(Text(f"checkpoint: {path}", style="dim"))


class ProgressDisplay:
    """A bar per phase (reading for a char vocabulary, BPE training, tokenizing with MB/s
    and tokens/s, evaluating with tokens/s).

    Off a terminal (a log file, a pipe, CI) nothing is drawn while the work runs: each
    phase's line is printed once, finished, when the work succeeds. A failure then prints
    only its `error: ...` line, not a half-done bar above it."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<14}", markup=False), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.live = console.is_terminal
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if not self.tasks:  # started on the first event: a failure before it prints nothing
            return
        if self.live:
            self.progress.stop()
        elif kind is None:
            self.progress.console.print(self.progress.get_renderable())

    def __call__(self, event: object) -> None:
        if isinstance(event, Notice):
            self.progress.console.print(_note(event.message), highlight=False)
        if not isinstance(event, ProgressEvent):
            return
        if not self.tasks and self.live:
            self.progress.start()
        if event.phase not in self.tasks:
            self.tasks[event.phase] = self.progress.add_task(event.phase, total=event.total, rate="")
            self.started[event.phase] = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started[event.phase], 1e-9)
        rate = ""
        if event.phase == "tokenizing":
            rate = (f"{event.files}/{event.files_total} files {event.done / elapsed / 1e6:6.1f} MB/s "
                    f"{event.tokens / elapsed / 1e6:6.2f}M tok/s")
        elif event.phase == "evaluating":
            rate = f"{event.tokens / elapsed:,.0f} tok/s"
        elif event.phase == "generating":
            rate = f"{event.done / elapsed:,.2f} items/s"
        self.progress.update(self.tasks[event.phase], completed=event.done, total=event.total,
                             rate=rate)


def _clock_time(seconds: float | None) -> str:
    """H:MM:SS, as rich shows times (hours past 24 stay hours); -:--:-- when unknown."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _TimeLeft:
    """The time a run has left, from the pace of its steps so far.

    The pace is measured from the first logged step on, so that the start-up (building the
    model, compiling, warming caches: often most of the first interval) does not slow every
    later estimate; at the first logged step, for want of a second, it is measured from the
    run's start. Evaluations and checkpoints stay in the measured time: they recur."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start: tuple[float, int] | None = None  # (time, step) of the run's start
        self.first_logged: tuple[float, int] | None = None
        self.max_steps = 0

    def begin(self, step: int, max_steps: int) -> None:
        self.start, self.first_logged, self.max_steps = (self.clock(), step), None, max_steps

    def seconds_left(self, step: int) -> float | None:
        """Seconds left after `step` (now logged); None while there is no pace to go by."""
        now = self.clock()
        if self.first_logged is not None and step > self.first_logged[1]:
            since = self.first_logged
        else:
            since = self.start
        if self.first_logged is None:
            self.first_logged = (now, step)
        if since is None or now <= since[0] or step <= since[1]:
            return None
        return (self.max_steps - step) * (now - since[0]) / (step - since[1])


class _CountdownColumn(ProgressColumn):
    """The live bar's ETA: the estimate made at the last logged step, counted down until the
    next (logged steps may be minutes apart, and rich's own estimate, from the updates of
    the last 30 s, then has nothing to go by)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock

    def render(self, task: Task) -> Text:
        deadline = task.fields.get("deadline")
        left = None if deadline is None else max(deadline - self.clock(), 0.0)
        return Text(f"ETA {_clock_time(left)}", style="progress.remaining")


class TrainDisplay:
    """Header table, a live step bar (loss, lr, tokens/s, MFU, ETA), eval and save lines.

    It also keeps what the end of the run reports: the last evaluation (`last_eval`) and
    the step and checkpoint of the best (`best_step`, `best_checkpoint`). `clock` gives
    seconds (a test's own clock makes the ETA exact)."""

    def __init__(self, quiet: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.live = console.is_terminal
        self.last_eval: dict | None = None
        self.best_step: int | None = None
        self.best_checkpoint: str | None = None
        self.resumed = False
        self.quiet = quiet  # under torchrun, ranks other than 0 show nothing
        self.clock = clock
        self.time_left = _TimeLeft(clock)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _print(self, markup: str) -> None:
        (self.progress.console if self.progress else console).print(markup, highlight=False)

    def __call__(self, event: object) -> None:
        if self.quiet:
            return
        if isinstance(event, ProgressEvent) and event.phase == "tokenizing":
            if event.done == event.total:
                self._print(f"tokenized {event.total / 1e6:.1f} MB into {event.tokens:,} tokens (cached)")
        elif isinstance(event, Notice):
            self._print(_note(event.message))
        elif isinstance(event, RunStarted):
            self._start(event)
        elif isinstance(event, StepLogged):
            self._step(event.metrics)
        elif isinstance(event, EvalDone):
            m = self.last_eval = event.metrics
            if m["best"]:
                self.best_step = m["step"]
            star = " [green]best[/]" if m["best"] else ""
            shown = "  ".join(f"{key.removeprefix('val_').replace('_', ' ')} {m[key]:.4f}"
                              for key in dict.fromkeys((*_EVAL_KEYS, m["metric"])) if key in m)
            self._print(f"step {m['step']:>6}  val {shown}{star}")
        elif isinstance(event, CheckpointSaved):
            if event.best:
                self.best_checkpoint = event.path
            if not self.live:
                self._print(f"saved {escape(str(event.path))}")
        elif isinstance(event, RunFinished):
            self.close()

    def _start(self, event: RunStarted) -> None:
        table = Table(title=Text(f"run → {event.run_dir}"), show_header=False, title_justify="left")
        for key, value in event.facts.items():
            table.add_row(Text(key), Text(str(value)))
        console.print(table)
        self.resumed = event.start_step > 0
        self.time_left.begin(event.start_step, event.max_steps)
        if self.live:
            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[info]}"), _CountdownColumn(self.clock), console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.max_steps,
                                               completed=event.start_step, info="", deadline=None)

    def _step(self, m: dict) -> None:
        info = (f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_sec']:,.0f} tok/s  "
                f"MFU {100 * m['mfu']:.1f}%")
        left = self.time_left.seconds_left(m["step"])
        if self.progress is not None:
            deadline = None if left is None else self.clock() + left
            self.progress.update(self.task, completed=m["step"], info=info, deadline=deadline)
        else:
            self._print(f"step {m['step']:>6}  {info}  ETA {_clock_time(left)}")

    def final_eval_heading(self) -> str | None:
        """Which step the last evaluation (the tables at the end of a run) describes, and
        where the best checkpoint is: the last step is often not the best, and
        `checkpoints/best` (what `-c RUN` uses) names the best."""
        if self.last_eval is None:
            return None
        step = self.last_eval["step"]
        if self.best_step == step:
            return f"validation at step {step} (the last, and the best: checkpoints/best)"
        if self.best_step is None:
            earlier = "; the best is from before this run resumed (checkpoints/best)" if self.resumed else ""
            return f"validation at step {step} (the last){earlier}"
        where = f"{self.best_checkpoint} (checkpoints/best)" if self.best_checkpoint else "checkpoints/best"
        return f"validation at step {step} (the last); the best was step {self.best_step}: {where}"


def render_classify_metrics(m: dict) -> None:
    """Accuracy, macro-F1, per-class precision/recall, and the confusion matrix as tables;
    for a summary record of many classes (see classify.classification_metrics), the rows of
    the worst classes and the most frequent mistakes instead."""
    console.print(f"accuracy {m['val_accuracy']:.4f}  macro-F1 {m['val_macro_f1']:.4f}", highlight=False)
    console.print(_baselines_line(m), highlight=False, markup=False)
    if "classes" in m:
        title = (f"per class: the {len(m['per_class'])} with the lowest F1, of {m['classes_in_data']:,} "
                 f"classes in the data ({m['classes']:,} in the classifier)")
    else:
        title = "per class"
    per_class = Table(title=title, title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(column, justify="left" if column == "label" else "right")
    for label, row in m["per_class"].items():
        per_class.add_row(Text(label), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                          str(row["support"]))
    console.print(per_class)
    if "confusion" in m:
        _render_confusion(list(m["per_class"]), m["confusion"])
    else:
        _render_most_confused(m["most_confused"])


def _baselines_line(m: dict) -> str:
    """What the classifier is measured against: the majority class and, where its training
    texts could be read, a naive Bayes over word counts (or why not)."""
    line = f"baselines: majority class accuracy {m['val_majority_baseline']:.4f}"
    if "val_naive_bayes_accuracy" in m:
        return (line + f"; naive Bayes over word counts accuracy {m['val_naive_bayes_accuracy']:.4f}  "
                       f"macro-F1 {m['val_naive_bayes_macro_f1']:.4f}")
    if "naive_bayes_unavailable" in m:
        return line + f"; naive Bayes not available: {m['naive_bayes_unavailable']}"
    return line


def _render_confusion(labels: list[str], confusion: list[list[int]]) -> None:
    table = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for label in labels:
        table.add_column(Text(label), justify="right")
    for label, row in zip(labels, confusion):
        table.add_row(Text(label), *map(str, row))
    console.print(table)


def _render_most_confused(mistakes: list[dict]) -> None:
    table = Table(title=f"the {len(mistakes)} most frequent mistakes", title_justify="left")
    for column in ("true", "predicted", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for mistake in mistakes:
        table.add_row(Text(mistake["true"]), Text(mistake["predicted"]), f"{mistake['count']:,}")
    console.print(table)


_PROBABILITIES_SHOWN = 50  # as many classes as an evaluation details (classify.DETAILED_CLASSES)


def render_class_probabilities(probs: dict[str, float]) -> None:
    """A classifier's probability per label, most likely first; the top 50 of many."""
    for label, p in list(probs.items())[:_PROBABILITIES_SHOWN]:
        console.print(f"  {label:<20} {p:.4f}", markup=False, highlight=False)
    if len(probs) > _PROBABILITIES_SHOWN:
        console.print(f"  ... and {len(probs) - _PROBABILITIES_SHOWN:,} less likely classes (--json lists all)",
                      highlight=False)


def render_lm_metrics(m: dict) -> None:
    """Loss, perplexity and bits per byte of a language-model evaluation."""
    table = Table(show_header=False, box=None)
    table.add_row("data", Text(str(m["data"])))
    if "tokens" in m:
        table.add_row("tokens", f"{m['tokens']:,} ({m['bytes']:,} bytes)")
    table.add_row("loss", f"{m['loss']:.4f} nats/token")
    table.add_row("perplexity", f"{m['perplexity']:.3f}")
    table.add_row("bits per byte", f"{m['bpb']:.4f}")
    for name, source in m.get("by_source", {}).items():
        table.add_row(Text(f"  {name}"), f"loss {source['loss']:.4f}  bits per byte {source['bpb']:.4f}")
    table.add_row("precision", m["precision"])
    console.print(table)


def render_choice_metrics(m: dict) -> None:
    """acc, acc_norm and acc_bytes (with standard errors) of a multiple-choice evaluation."""
    table = Table(show_header=False, box=None)
    table.add_row("task", Text(f"{m['task']} ({m['data']})"))
    table.add_row("items", f"{m['items']:,} ({m['items_per_second']:.1f} items/s)")
    table.add_row("acc", f"{m['acc']:.4f} ± {m['acc_stderr']:.4f}")
    table.add_row("acc_norm", f"{m['acc_norm']:.4f} ± {m['acc_norm_stderr']:.4f}")
    table.add_row("acc_bytes", f"{m['acc_bytes']:.4f} ± {m['acc_bytes_stderr']:.4f}")
    table.add_row("precision", m["precision"])
    console.print(table)


def render_generate_metrics(m: dict) -> None:
    """Each metric of a generation task with its standard error, beside the no-model baseline's."""
    table = Table(box=None)
    for header in ("metric", "model", "± stderr", "baseline"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    names = [k for k in m if f"{k}_stderr" in m and not k.startswith("baseline_")]
    for name in names:
        base = m.get(f"baseline_{name}")
        table.add_row(name, f"{m[name]:.4f}", f"{m[f'{name}_stderr']:.4f}", "-" if base is None else f"{base:.4f}")
    console.print(f"task: generate ({m['data']}), {m['items']:,} items, {m['samples_per_item']} sample(s) each "
                  f"at temperature {m['temperature']:g}, {m['generated_tokens']:,} tokens generated, "
                  f"{m['items_per_second']:.2f} items/s", highlight=False, markup=False)
    console.print(table)
    console.print(f"baseline: {m['baseline']} (no model)", highlight=False, markup=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


_STATUS_STYLE = {"running": "cyan", "finished": "green", "interrupted": "yellow", "failed": "red"}
_RUN_COLUMNS = ("task", "params", "steps", "best", "tokens", "wall", "status")
_LEFT_ALIGNED = ("task", "best", "status")
_MEASURE_WIDTH = 1_000_000  # wide enough that a table measured against it is never squeezed


def render_runs(summaries: list, root) -> None:
    """`gptcli runs`: one row per run (a list of runlog.RunSummary).

    When the table is wider than the console (at 80 columns it usually is: the other
    columns alone take ~75), a squeezed name column would lose the names, so each run's
    name gets a line of its own instead, with its row of figures under it."""
    title = Text(f"{len(summaries)} run{'s' * (len(summaries) != 1)} under {root}")
    names = [Text(str(r.path.relative_to(root) if r.path != root else r.path)) for r in summaries]
    rows = [_run_cells(r) for r in summaries]
    table = Table(title=title, title_justify="left")
    table.add_column("run")
    for column in _RUN_COLUMNS:
        table.add_column(column, justify="left" if column in _LEFT_ALIGNED else "right")
    for name, row in zip(names, rows):
        table.add_row(name, *row)
    natural = console.measure(table, options=console.options.update_width(_MEASURE_WIDTH)).maximum
    if natural <= console.width:
        console.print(table)
    else:
        _render_runs_stacked(title, names, rows)


def _run_cells(r) -> list[Text]:
    best = f"{r.metric.removeprefix('val_')} {r.best:.4f}" if r.best is not None else "-"
    steps = f"{r.step:,}/{r.max_steps:,}" if r.max_steps else f"{r.step:,}"
    tokens = _count(r.tokens_seen)
    if r.tokens_by_source:  # a mixture: each source's share, e.g. `1.2M (web 70% code 30%)`
        total = max(sum(r.tokens_by_source.values()), 1)
        tokens += f" ({' '.join(f'{name} {n / total:.0%}' for name, n in r.tokens_by_source.items())})"
    return [Text(str(r.task)), Text(_count(r.parameters)), Text(steps), Text(best), Text(tokens),
            Text(_duration(r.wall_seconds)), Text(str(r.status), style=_STATUS_STYLE.get(r.status, "dim"))]


def _render_runs_stacked(title: Text, names: list[Text], rows: list[list[Text]]) -> None:
    """Each run as its name (a whole line, however long) over an indented line of figures;
    the figures are padded to shared column widths, so they line up as a table's would, and
    are never cut (a console narrower than them wraps the line)."""
    header = [Text(column, style="bold") for column in _RUN_COLUMNS]
    widths = [max(cell.cell_len for cell in column) for column in zip(header, *rows)]

    def figures(cells: list[Text]) -> Text:
        padded = []
        for column, width, cell in zip(_RUN_COLUMNS, widths, cells):
            cell = cell.copy()
            cell.align("left" if column in _LEFT_ALIGNED else "right", width)
            padded.append(cell)
        line = Text("  ") + Text("  ").join(padded)
        line.rstrip()
        return line

    console.print(title)
    console.print(figures(header))
    for name, row in zip(names, rows):
        console.print(name, style="bold")
        console.print(figures(row))


_LABELS_SHOWN = 50  # `gptcli info` lists this many of a classifier's labels (--json: all)


def _recipe(model: dict) -> str:
    """The arch and its components (resolved), e.g. `llama: rope, rmsnorm, swiglu 384, qk-norm, untied`."""
    parts = [model["position"], model["norm"], f"{model['mlp']} {model['mlp_hidden']}"]
    if model["n_kv_head"] != model["n_head"]:
        parts.append(f"{model['n_kv_head']} kv heads")
    parts += [name for name, on in (("qk-norm", model["qk_norm"]), ("attn bias", model["attn_bias"]),
                                    ("untied", not model["tie_embeddings"])) if on]
    if model["logit_softcap"]:
        parts.append(f"soft-cap {model['logit_softcap']:g}")
    return f"{model['arch']}: {', '.join(parts)}"


def render_evaluation(kind: str, metrics: dict) -> None:
    """`gptcli eval`'s tables, by what was evaluated (evals/evaluate.py's Evaluation.kind)."""
    if kind == "choice":
        render_choice_metrics(metrics)
    elif kind == "generate":
        render_generate_metrics(metrics)
    elif kind == "classifier":
        console.print(f"data: {metrics['data']}", highlight=False, markup=False)
        render_classify_metrics({f"val_{k}" if k in ("accuracy", "macro_f1", "majority_baseline",
                                                      "naive_bayes_accuracy", "naive_bayes_macro_f1") else k: v
                                 for k, v in metrics.items()})
    else:
        render_lm_metrics(metrics)


def render_info(d: dict) -> None:
    """`gptcli info`: a checkpoint's description (from info.checkpoint_info)."""
    model = d["model"]
    table = Table(show_header=False, box=None, title=Text(d["checkpoint"]), title_justify="left")
    table.add_row("kind", Text(d["kind"]))
    if model is None:  # weights unreadable and no run config to read the shape from
        table.add_row("model", Text("unknown (weights unreadable)", style="red"))
    else:
        table.add_row("model", f"{model['n_layer']} layers x {model['n_embd']} wide, {model['n_head']} heads, "
                               f"context {model['block_size']}, vocab {model['vocab_size']}, "
                               f"bias {str(model['bias']).lower()}, dropout {model['dropout']}")
        table.add_row("recipe", _recipe(model))
    if d["parameters"] is not None:
        table.add_row("parameters", f"{d['parameters']:,} ({_count(d['parameters'])})")
    if "lora" in d:
        lora = d["lora"]
        table.add_row("LoRA", f"rank {lora['rank']}, alpha {lora['alpha']}, "
                              f"{lora['adapter_parameters']:,} adapter parameters")
    table.add_row("tokenizer", Text(d["tokenizer"]))
    if "labels" in d:
        table.add_row("labels", Text(_some_labels(d["labels"])))
    if "step" in d:
        table.add_row("step", f"{d['step']:,}")
        table.add_row("tokens seen", f"{d['tokens_seen']:,} ({_count(d['tokens_seen'])})")
        if d.get("tokens_by_source"):
            table.add_row("tokens by source", Text("  ".join(
                f"{name} {n:,} ({n / max(d['tokens_seen'], 1):.1%})" for name, n in d["tokens_by_source"].items())))
        if "precision" in d:
            table.add_row("precision", Text(d["precision"]))
        if d.get("metrics"):
            table.add_row(f"metrics (step {d['metrics_step']:,})",
                          Text("  ".join(f"{k} {v:.4f}" for k, v in d["metrics"].items())))
    else:
        table.add_row("training", Text(d["training"]))
    table.add_row("files", Text("  ".join(f"{name} {_count(size)}B" for name, size in d["files"].items()
                                          if "/" not in name)
                                + f"  (total {_count(sum(d['files'].values()))}B)"))
    style = "green" if d["checksums"].startswith("ok") else "red"
    table.add_row("checksums", Text(d["checksums"], style=style))
    for problem in d.get("problems", []):
        table.add_row("problem", Text(problem, style="red"))
    console.print(table, highlight=False)


def _some_labels(labels: list[str]) -> str:
    shown = ", ".join(labels[:_LABELS_SHOWN])
    return shown if len(labels) <= _LABELS_SHOWN else f"{shown}, ... ({len(labels):,} labels; --json lists all)"
