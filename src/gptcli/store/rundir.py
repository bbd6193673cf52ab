"""Run directories: the `latest`/`best` pointers, finding and resolving runs and
checkpoints, pruning old checkpoints, and the claim of one training process on a run.

    runs/NAME/checkpoints/step-000500/ ...    see checkpoint.py
    runs/NAME/checkpoints/latest, best        one-line files naming a checkpoint directory

A run directory is claimed by one training process, from the first check to the last save:

    claim = claim_run_dir(out_dir, resume=..., overwrite=..., inputs=..., dist=dist)
    ... validate everything, build model and data ...
    claim.start()      # only now: an old run is moved aside (with --overwrite)
    ... train; after each checkpoint: claim.saved() ...
    claim.close(failed=...)

- The claim holds the directory's lock (rank 0 only, under torchrun), so a second
  `pretrain`/`finetune` on it is refused naming the running pid and host.
- `--overwrite` replaces only a marked gptcli run (see outputs.py) and never removes it up
  front: the old run is renamed to a hidden sibling `.NAME.replaced-PID-*` when training
  starts, deleted once `latest` names a checkpoint of the new run, and put back if the new
  run fails (or is interrupted) before that. So a failed run never leaves the user with
  neither. A run directory that cannot be moved (a mount point) is a one-line error.
- A run that fails during validation leaves the folders as they were: the claim removes
  its marker, its lock and the folders it created while they are still empty.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

from gptcli.atomic import make_unique_dir, write_text
from gptcli.errors import GptcliError, shorten
from gptcli.events import EventSink, Notice, ignore
from gptcli.outputs import (
    KIND_NAMES,
    LOCK_FILE,
    MARKER,
    DirLock,
    check_no_overlap,
    hidden_below,
    mark,
    marked_kind,
    protected_reason,
    resolved,
)
from gptcli.runtime import Distributed
from gptcli.store.checkpoint import (
    BEST,
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    WEIGHTS,
    checkpoint_task,
    is_checkpoint,
)
from gptcli.store.hf import cached_import, is_hf_dir
from gptcli.store.launch import relaunch_reason

_OWN_FILES = {MARKER, LOCK_FILE}  # a folder holding only these has no run in it yet
_STEP = re.compile(r"step-(\d+)")  # a step checkpoint's folder name (merged copies end in -merged)


class RunClaim:
    """Rank 0's hold on a run directory (on other ranks every method does nothing)."""

    def __init__(self, path: Path, resume_from: Path | None, lock: DirLock | None = None,
                 created: Path | None = None, marked: bool = False, replace: bool = False,
                 on_event: EventSink = ignore):
        self.path = path
        self.resume_from = resume_from
        self._lock = lock
        self._created = created  # the outermost folder this claim made (removed on a failed check)
        self._marked = marked  # this claim wrote the marker (into a new or empty folder)
        self._replace = replace  # --overwrite of an existing run: move it aside at start()
        self._backup: Path | None = None  # where the replaced run waits for the first checkpoint
        self._started = False
        self._saved = False
        self._on_event = on_event

    def start(self) -> None:
        """Training begins: move an old run aside (replace) and take a fresh folder. If that
        cannot be done, everything stays as it was and the error is one line."""
        self._started = True
        if not self._replace or self._lock is None:
            return
        backup = make_unique_dir(self.path.parent, f".{self.path.name}.replaced-{os.getpid()}-")
        try:
            os.replace(self.path, backup)  # onto the empty folder just made: a name no one has
        except OSError as exc:
            backup.rmdir()
            raise GptcliError(f"cannot move the old run in {self.path} aside ({exc.strerror or exc}"
                              f"{'; it is a mount point' if exc.errno == errno.EBUSY else ''}); "
                              f"delete it yourself or choose another out_dir") from None
        self._backup = backup
        old_lock, self._lock = self._lock, None
        try:
            self.path.mkdir()
            mark(self.path, "run")
            self._lock = DirLock(self.path, "another run")
        except (OSError, GptcliError) as exc:
            shutil.rmtree(self.path, ignore_errors=True)  # the folder made just above, if any
            os.replace(backup, self.path)
            self._backup = None
            raise GptcliError(f"cannot start a new run in {self.path} ({exc}); the old run is "
                              f"unchanged") from None
        finally:
            old_lock.release()

    def saved(self) -> None:
        """A checkpoint of the new run exists and `latest` names it: the replaced run is no
        longer needed."""
        self._saved = True
        if self._backup is not None:
            shutil.rmtree(self._backup, ignore_errors=True)
            self._backup = None

    def close(self, failed: bool) -> None:
        """Release the lock; after a failure, undo what this claim changed on disk."""
        if self._lock is None:
            return
        try:
            if failed and not self._started:
                self._undo_claim()
            elif failed and self._backup is not None and not self._saved:
                self._restore_replaced()
        finally:
            self._lock.release()
            self._lock = None

    def _undo_claim(self) -> None:
        """Validation failed: leave the folders as they were before the claim. Only the
        claim's own files go, and folders only while empty (bottom up), so nothing another
        process wrote meanwhile is touched."""
        if not self._marked:
            return
        (self.path / MARKER).unlink(missing_ok=True)
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self._created is None:
            return
        for folder in (self.path, *self.path.parents):
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's files are in it
                return
            if folder == self._created:
                return

    def _restore_replaced(self) -> None:
        """The new run failed before its first checkpoint: put the old run back (the new
        folder is the one `start` made)."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self._backup, self.path)
        self._on_event(Notice(f"the run failed before its first checkpoint; the previous run "
                              f"in {self.path} was put back"))
        self._backup = None


def claim_run_dir(out_dir: str | Path, *, resume: bool, overwrite: bool, inputs: Iterable[Path],
                  dist: Distributed = Distributed(), on_event: EventSink = ignore) -> RunClaim:
    """Check `out_dir` against --resume/--overwrite and the command's inputs, and (rank 0)
    lock it. Under torchrun rank 0 decides and every rank gets its verdict, so all fail
    with the same one-line error or none does."""
    claim, problem = None, None
    if dist.is_main:
        try:
            claim = _claim(out_dir, resume, overwrite, list(inputs), on_event)
        except GptcliError as exc:
            problem = str(exc)
    problem = dist.from_main(problem)
    if problem is not None:
        raise GptcliError(problem)
    if not dist.is_main:
        path, resume_from = dist.from_main(None)
        return RunClaim(path, resume_from)
    dist.from_main((claim.path, claim.resume_from))
    return claim


def _claim(out_dir: str | Path, resume: bool, overwrite: bool, inputs: list[Path],
           on_event: EventSink) -> RunClaim:
    if resume and overwrite:
        raise GptcliError("--resume and --overwrite contradict each other; pick one")
    path = resolved(out_dir, "out_dir")
    if path.exists() and not path.is_dir():
        raise GptcliError(f"out_dir {out_dir} is a file; choose a directory path")
    check_no_overlap(path, inputs, "out_dir", out_dir)
    kind = marked_kind(path) if path.is_dir() else None
    lock = None
    try:
        if kind == "run":  # first: a process training there is the clearest answer
            lock = DirLock(path, "another run")
            if not (resume or overwrite):
                resume, overwrite = _continued_by_relaunch(path, on_event)
        # Only a resume uses `latest`: only then is a bad pointer worth a note.
        latest = read_pointer(path, LATEST, on_event if resume else ignore) if path.is_dir() else None
        used = path.is_dir() and bool(set(os.listdir(path)) - _OWN_FILES)
        _check_claim(out_dir, path, kind, used, latest, resume, overwrite)
        created = _first_missing(path)
        path.mkdir(parents=True, exist_ok=True)
        if lock is None:
            lock = DirLock(path, "another run")
        if kind is None and not used:  # a run of an older version (resumed) stays unmarked
            mark(path, "run")
    except OSError as exc:
        if lock is not None:
            lock.release()
        raise GptcliError(f"cannot use out_dir {out_dir} ({exc.strerror or exc}); choose a "
                          f"writable out_dir") from None
    except GptcliError:
        if lock is not None:
            lock.release()
        raise
    leftovers = sorted(path.parent.glob(f"{glob.escape('.' + path.name)}.replaced-*"))
    if leftovers:
        on_event(Notice(f"{leftovers[0]} holds a run that an interrupted --overwrite moved "
                        f"aside; delete it, or move it back if you need it"))
    return RunClaim(path, latest if resume else None, lock, created=created,
                    marked=kind is None and not used, replace=used and overwrite, on_event=on_event)


def _continued_by_relaunch(path: Path, on_event: EventSink) -> tuple[bool, bool]:
    """(resume, overwrite) for a process its launcher started again on its own run
    (launch.py): resume from the latest checkpoint, or start again if none was saved
    (the folder holds only that launch's first attempt). (False, False) otherwise."""
    reason = relaunch_reason(path)
    if reason is None:
        return False, False
    latest = read_pointer(path, LATEST, on_event)
    on_event(Notice(f"{reason}: " + (f"resuming from {latest.name}" if latest is not None
                                      else "it saved no checkpoint, so it starts again")))
    return latest is not None, latest is None


def _first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _check_claim(out_dir: str | Path, path: Path, kind: str | None, used: bool,
                 latest: Path | None, resume: bool, overwrite: bool) -> None:
    """Refuse every combination of folder state and flags that could lose data."""
    if used and kind is None and not (resume and latest is not None):  # runs of older versions resume
        raise GptcliError(f"out_dir {out_dir} is a non-empty folder that gptcli did not create; "
                          f"choose a new or empty out_dir")
    if kind not in (None, "run"):
        raise GptcliError(f"out_dir {out_dir} holds {KIND_NAMES.get(kind, kind)}, not a training "
                          f"run; choose another out_dir")
    if used and overwrite:
        reason = protected_reason(path)
        if reason is not None:
            raise GptcliError(f"out_dir {out_dir} cannot be replaced: {reason}; choose another out_dir")
    if resume and latest is None:
        raise GptcliError(f"--resume: {out_dir} has no checkpoint to resume from")
    if used and not (resume or overwrite):
        raise GptcliError(f"{out_dir} already holds a run; pass --resume to continue it or "
                          f"--overwrite to start over")


def write_pointer(run_dir: str | Path, name: str, checkpoint: Path) -> None:
    """Atomically point `checkpoints/<name>` at `checkpoint`."""
    write_text(Path(run_dir) / CHECKPOINTS / name, checkpoint.name + "\n")


class PointerWarning(UserWarning):
    """A `latest`/`best` pointer names no usable checkpoint; issued where the reader of
    the pointer was given no `on_event` to report it to."""


def read_pointer(run_dir: str | Path, name: str, on_event: EventSink | None = None) -> Path | None:
    """The checkpoint `checkpoints/<name>` names, when it is a complete checkpoint of this
    run (None when there is no such pointer, as before a run's first evaluation).

    A pointer that names anything else (a path outside `checkpoints/`, a missing or
    incomplete folder, unreadable text) is reported, naming the pointer and what it names:
    as a Notice to `on_event`, or with `on_event=None` as a PointerWarning (pass `ignore`
    to keep quiet). `latest` then falls back to the newest complete step checkpoint, so
    resume, sample, eval and info keep working; a missing `latest` beside complete
    checkpoints falls back the same way. Other pointers are ignored."""
    folder = Path(run_dir) / CHECKPOINTS
    pointer = folder / name
    target, problem = _pointed(pointer) if pointer.is_file() else (None, None)
    if target is not None:
        return target
    fallback = newest_checkpoint(folder) if name == LATEST else None
    if problem is None and fallback is None:
        return None  # no pointer and nothing to fall back to: an ordinary state, not a problem
    if problem is None:
        problem = f"{pointer} is missing"
    instead = f"using the newest complete checkpoint, {fallback.name}" if fallback else "ignoring it"
    _report(f"{problem}; {instead}", on_event)
    return fallback


def _pointed(pointer: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint `pointer` names, None) if it is a complete one inside the pointer's
    folder, else (None, what is wrong with the pointer)."""
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{pointer} cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if not text or Path(text).name != text or text in (".", ".."):  # a path, not a folder name beside it
        return None, f"{pointer} names {shorten(repr(text))}, which is not a checkpoint folder in {pointer.parent}"
    target = pointer.parent / text
    if not target.is_dir():
        return None, f"{pointer} names {shorten(text)}, which does not exist"
    if not is_complete_checkpoint(target):
        return None, f"{pointer} names {shorten(text)}, which is not a complete checkpoint"
    return target, None


def is_complete_checkpoint(path: Path) -> bool:
    """Weights and the manifest: a save renames the folder into place with both, so a
    folder without them is not one gptcli finished writing."""
    return (path / WEIGHTS).is_file() and (path / MANIFEST).is_file()


def newest_checkpoint(folder: Path) -> Path | None:
    """The complete step checkpoint (`step-N`, not a merged copy) with the highest step."""
    steps = [(int(match[1]), path) for path in folder.glob("step-*")
             if (match := _STEP.fullmatch(path.name)) and is_complete_checkpoint(path)]
    return max(steps)[1] if steps else None


def _report(message: str, on_event: EventSink | None) -> None:
    if on_event is None:
        warnings.warn(message, PointerWarning, stacklevel=3)  # points at the caller of read_pointer
    else:
        on_event(Notice(message))


def find_latest_run(root: str | Path = "runs", task: str | None = None) -> Path | None:
    """The run under `root` whose latest checkpoint was written most recently (of `task`,
    `lm` or `classify`, if given)."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointers = [p for p in root.glob(f"**/{CHECKPOINTS}/{LATEST}") if p.is_file() and not hidden_below(p, root)]
    if task is not None:  # (a bad pointer is reported where the chosen run is read)
        pointers = [p for p in pointers
                    if (c := read_pointer(p.parent.parent, LATEST, ignore)) and checkpoint_task(c) == task]
    if not pointers:
        return None
    return max(pointers, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_checkpoint(path: str | Path | None, prefer: str = BEST, on_event: EventSink | None = None) -> Path:
    """A checkpoint directory from a checkpoint path, a run directory (its `prefer`red
    checkpoint, else the latest), a Hugging Face model directory (imported once into the
    cache), or nothing (the most recent run under ./runs). A bad pointer in the run is
    reported to `on_event` (None: as a PointerWarning; see read_pointer)."""
    if path is None:
        run = find_latest_run()
        if run is None:
            raise GptcliError("no checkpoint given and no trained run found under runs/; train "
                              "one first (gptcli pretrain configs/demo.yaml) or pass --checkpoint")
        path = run
    path = Path(path)
    if not path.exists():
        raise GptcliError(f"checkpoint {path} does not exist")

    if is_hf_dir(path):  # before is_checkpoint: both hold a model.safetensors
        return cached_import(path)
    if is_checkpoint(path):
        return path
    for name in dict.fromkeys((prefer, LATEST)):  # each pointer read (and reported) once
        found = read_pointer(path, name, on_event)
        if found is not None:
            return found
    raise GptcliError(f"{path} is neither a checkpoint nor a run directory with checkpoints")


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep_last`, never the ones that
    `latest`, `best` or `merged` name. Returns what was deleted."""
    folder = Path(run_dir) / CHECKPOINTS
    # Quietly: training prunes after every save, and a bad pointer is reported where it is used.
    protected = {p for p in (read_pointer(run_dir, n, ignore) for n in (LATEST, BEST, "merged")) if p}
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir() and p not in protected
                   and not p.name.endswith("-merged"))
    newest = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith("-merged"))
    keep = set(newest[-keep_last:]) if keep_last > 0 else set(newest)
    removed = [p for p in steps if p not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
