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


class ProgressDisplay:
    """A bar per phase (reading for a char vocabulary, BPE training, tokenizing with MB/s
    and tokens/s, evaluating with tokens/s)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<14}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> ProgressDisplay:
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
        elif event.phase == "evaluating":
            rate = f"{event.tokens / elapsed:,.0f} tok/s"
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


def render_lm_metrics(m: dict) -> None:
    """Loss, perplexity and bits per byte of a language-model evaluation."""
    table = Table(show_header=False, box=None)
    table.add_row("data", str(m["data"]))
    if "tokens" in m:
        table.add_row("tokens", f"{m['tokens']:,} ({m['bytes']:,} bytes)")
    table.add_row("loss", f"{m['loss']:.4f} nats/token")
    table.add_row("perplexity", f"{m['perplexity']:.3f}")
    table.add_row("bits per byte", f"{m['bpb']:.4f}")
    table.add_row("precision", m["precision"])
    console.print(table)


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


def render_runs(summaries: list, root) -> None:
    """`gptcli runs`: one row per run (a list of runlog.RunSummary)."""
    table = Table(title=f"{len(summaries)} run{'s' * (len(summaries) != 1)} under {root}", title_justify="left")
    table.add_column("run", overflow="fold", min_width=12)
    for column in ("task", "params", "steps", "best", "tokens", "wall", "status"):
        table.add_column(column, justify="left" if column in ("task", "best", "status") else "right",
                         no_wrap=True)
    for r in summaries:
        best = f"{r.metric.removeprefix('val_')} {r.best:.4f}" if r.best is not None else "-"
        steps = f"{r.step:,}/{r.max_steps:,}" if r.max_steps else f"{r.step:,}"
        style = _STATUS_STYLE.get(r.status, "dim")
        table.add_row(str(r.path.relative_to(root) if r.path != root else r.path), r.task,
                      _count(r.parameters), steps, best, _count(r.tokens_seen), _duration(r.wall_seconds),
                      f"[{style}]{r.status}[/]")
    console.print(table)


def render_info(d: dict) -> None:
    """`gptcli info`: a checkpoint's description (from info.checkpoint_info)."""
    model = d["model"]
    table = Table(show_header=False, box=None, title=d["checkpoint"], title_justify="left")
    table.add_row("kind", d["kind"])
    table.add_row("model", f"{model['n_layer']} layers x {model['n_embd']} wide, {model['n_head']} heads, "
                           f"context {model['block_size']}, vocab {model['vocab_size']}, "
                           f"bias {str(model['bias']).lower()}, dropout {model['dropout']}")
    table.add_row("parameters", f"{d['parameters']:,} ({_count(d['parameters'])})")
    if "lora" in d:
        lora = d["lora"]
        table.add_row("LoRA", f"rank {lora['rank']}, alpha {lora['alpha']}, "
                              f"{lora['adapter_parameters']:,} adapter parameters")
    table.add_row("tokenizer", d["tokenizer"])
    if "labels" in d:
        table.add_row("labels", ", ".join(d["labels"]))
    if "step" in d:
        table.add_row("step", f"{d['step']:,}")
        table.add_row("tokens seen", f"{d['tokens_seen']:,} ({_count(d['tokens_seen'])})")
        if "precision" in d:
            table.add_row("precision", d["precision"])
        if d.get("metrics"):
            table.add_row(f"metrics (step {d['metrics_step']:,})",
                          "  ".join(f"{k} {v:.4f}" for k, v in d["metrics"].items()))
    else:
        table.add_row("training", d["training"])
    table.add_row("files", "  ".join(f"{name} {_count(size)}B" for name, size in d["files"].items()
                                     if "/" not in name)
                  + f"  (total {_count(sum(d['files'].values()))}B)")
    style = "green" if d["checksums"].startswith("ok") else "red"
    table.add_row("checksums", f"[{style}]{d['checksums']}[/]")
    console.print(table, highlight=False)
