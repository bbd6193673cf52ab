"""Rich renderers for library events, all on stderr (stdout is kept for requested data).

On a terminal they draw live progress bars; otherwise (CI, a log file) they print one
plain line per logged step, so logs stay readable.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gptcli.events import (
    CheckpointSaved,
    EvalDone,
    Notice,
    Progress as ProgressEvent,
    RunFinished,
    RunStarted,
    StepLogged,
)

_EVAL_KEYS = ("val_loss", "val_bpb", "val_accuracy", "val_macro_f1")  # scalar metrics shown per eval
console = Console(stderr=True, soft_wrap=True)  # long messages stay one line for grep


def notice(message: str) -> None:
    console.print(f"[yellow]note:[/] {message}", highlight=False)


class TokenizeDisplay:
    """A bar per phase (reading for a char vocabulary, BPE training, tokenizing) with MB/s
    and tokens/s."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<14}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> TokenizeDisplay:
        return self

    def __exit__(self, *exc) -> None:
        if self.tasks:  # started on the first event: a failure before it prints nothing
            self.progress.stop()

    def __call__(self, event: object) -> None:
        if isinstance(event, Notice):
            self.progress.console.print(f"[yellow]note:[/] {event.message}", highlight=False)
        if not isinstance(event, ProgressEvent):
            return
        if not self.tasks:
            self.progress.start()
        if event.phase not in self.tasks:
            self.tasks[event.phase] = self.progress.add_task(event.phase, total=event.total, rate="")
            self.started[event.phase] = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started[event.phase], 1e-9)
        rate = ""
        if event.phase == "tokenizing":
            rate = f"{event.done / elapsed / 1e6:6.1f} MB/s {event.tokens / elapsed / 1e6:6.2f}M tok/s"
        self.progress.update(self.tasks[event.phase], completed=event.done, total=event.total,
                             rate=rate)


class TrainDisplay:
    """Header table, a live step bar (loss, lr, tokens/s, MFU, ETA), eval and save lines."""

    def __init__(self, quiet: bool = False) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.live = console.is_terminal
        self.last_eval: dict | None = None
        self.quiet = quiet  # under torchrun, ranks other than 0 show nothing

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress else console).print(text, highlight=False)

    def __call__(self, event: object) -> None:
        if self.quiet:
            return
        if isinstance(event, ProgressEvent) and event.phase == "tokenizing":
            if event.done == event.total:
                self._print(f"tokenized {event.total / 1e6:.1f} MB into {event.tokens:,} tokens (cached)")
        elif isinstance(event, Notice):
            self._print(f"[yellow]note:[/] {event.message}")
        elif isinstance(event, RunStarted):
            self._start(event)
        elif isinstance(event, StepLogged):
            self._step(event.metrics)
        elif isinstance(event, EvalDone):
            m = self.last_eval = event.metrics
            star = " [green]best[/]" if m["best"] else ""
            shown = "  ".join(f"{key.removeprefix('val_').replace('_', ' ')} {m[key]:.4f}"
                              for key in _EVAL_KEYS if key in m)
            self._print(f"step {m['step']:>6}  val {shown}{star}")
        elif isinstance(event, CheckpointSaved) and not self.live:
            self._print(f"saved {event.path}")
        elif isinstance(event, RunFinished):
            self.close()

    def _start(self, event: RunStarted) -> None:
        table = Table(title=f"run → {event.run_dir}", show_header=False, title_justify="left")
        for key, value in event.facts.items():
            table.add_row(key, str(value))
        console.print(table)
        if self.live:
            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.max_steps,
                                               completed=event.start_step, info="")

    def _step(self, m: dict) -> None:
        info = (f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_sec']:,.0f} tok/s  "
                f"MFU {100 * m['mfu']:.1f}%")
        if self.progress is not None:
            self.progress.update(self.task, completed=m["step"], info=info)
        else:
            self._print(f"step {m['step']:>6}  {info}")


def render_classify_metrics(m: dict) -> None:
    """Accuracy, macro-F1, per-class precision/recall, and the confusion matrix as tables."""
    console.print(f"accuracy {m['val_accuracy']:.4f}  macro-F1 {m['val_macro_f1']:.4f}  "
                  f"(majority-class baseline {m['val_majority_baseline']:.4f})", highlight=False)
    labels = list(m["per_class"])
    per_class = Table(title="per class", title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(column, justify="left" if column == "label" else "right")
    for label, row in m["per_class"].items():
        per_class.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                          str(row["support"]))
    console.print(per_class)
    confusion = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("")
    for label in labels:
        confusion.add_column(label, justify="right")
    for label, row in zip(labels, m["confusion"]):
        confusion.add_row(label, *map(str, row))
    console.print(confusion)
