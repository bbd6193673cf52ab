"""Output directories: which ones gptcli may write into, replace or hold.

gptcli only ever deletes or replaces a directory it made itself. Every output directory
it creates (a run, a tokenized dataset, an imported checkpoint, a Hugging Face export)
holds a marker file, `.gptcli`, naming its kind. `--overwrite` replaces a directory only
when it carries the marker of the same kind, and never the filesystem root, the home
directory, the working directory or one of its ancestors. No output, replaced or not, may
overlap one of the command's inputs: neither contain it nor lie inside it.

A run directory is also locked while a process trains in it (`.gptcli.lock`, an OS
advisory lock that dies with its process, so `kill -9` leaves no stale lock). This
module imports neither torch nor numpy.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import socket
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path

from gptcli.errors import GptcliError

MARKER = ".gptcli"
LOCK_FILE = ".gptcli.lock"
KIND_NAMES = {"run": "a training run", "tokenized": "a tokenized dataset",
              "checkpoint": "a checkpoint", "hf-export": "a Hugging Face export"}
_GLOB_CHARS = set("*?[")


def user_path(path: str | Path) -> Path:
    """A path as the user wrote it, with `~` expanded (YAML and --set values are not
    expanded by any shell)."""
    return Path(path).expanduser()


def resolved(path: str | Path, option: str) -> Path:
    """The absolute path with symlinks followed; a symlink loop is a one-line error."""
    try:
        return user_path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise GptcliError(f"{option} {path}: cannot be resolved ({exc})") from None


def input_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The resolved locations a command reads: files and folders as given, the files a
    glob matches, and the standard library's folder for `stdlib`. Entries that name
    nothing on disk (a tokenizer name such as `gpt2`, a missing file reported later by
    its reader) are skipped."""
    names: list[str] = []
    for item in map(str, inputs):
        if not item or user_path(item).exists():  # a real name first: `exp[1].txt` is no glob
            names.append(item)
        elif item == "stdlib":
            names.append(sysconfig.get_paths()["stdlib"])
        elif _GLOB_CHARS & set(item):
            names += glob.glob(os.path.expanduser(item), recursive=True)
    paths = []
    for name in filter(None, names):
        try:
            path = user_path(name).resolve()
        except (OSError, RuntimeError):
            continue  # an unreadable input is reported by the code that reads it
        if path.exists():
            paths.append(path)
    return paths


def marked_kind(directory: Path) -> str | None:
    """The kind recorded in a directory's marker, or None when gptcli did not make it."""
    try:
        return json.loads((directory / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark(directory: Path, kind: str) -> None:
    """Record that gptcli made `directory` (a `kind` output), so `--overwrite` may replace it."""
    (directory / MARKER).write_text(json.dumps({"kind": kind, "created_at": time.time()}) + "\n")


def protected_reason(path: Path) -> str | None:
    """Why `path` may never be replaced, whatever it holds (None if it may be)."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "it is the filesystem root"
    if path == Path.home().resolve():
        return "it is your home directory"
    if path == cwd:
        return "it is the current directory"
    if cwd.is_relative_to(path):
        return "it contains the current directory"
    return None


def check_no_overlap(target: Path, inputs: Iterable[Path], option: str, shown: str | Path) -> None:
    """An output (`target`, resolved; `shown` as the user wrote it) must neither contain
    one of the command's inputs nor lie inside one."""
    for source in inputs:
        if target == source or source.is_relative_to(target):
            raise GptcliError(f"{option} {shown} contains the input {source}; write the "
                              f"output somewhere else")
        if target.is_relative_to(source):
            raise GptcliError(f"{option} {shown} is inside the input {source}; write the "
                              f"output somewhere else")


def hidden_below(path: Path, root: Path) -> bool:
    """Whether `path` lies in a hidden folder under `root`: staging folders (`.tmp-*`) and
    runs moved aside by --overwrite (`.NAME.replaced-PID`) are never listed as runs."""
    return any(part.startswith(".") for part in path.relative_to(root).parent.parts)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(target: str | Path, kind: str, *, inputs: Iterable[Path] = (),
                     replace: bool = False, option: str = "--out") -> Path:
    """The resolved `target` after checking that writing a `kind` output there loses
    nothing: it overlaps no input, and it is new, empty, or (with `replace`) a marked
    `kind` directory that is not protected. Raises a one-line GptcliError otherwise; the
    messages never suggest --overwrite for a directory gptcli did not make."""
    path = resolved(target, option)
    if path.exists() and not path.is_dir():
        raise GptcliError(f"{option} {target} is a file; choose a directory path")
    check_no_overlap(path, inputs, option, target)
    if not path.exists():
        return path
    reason = protected_reason(path)  # an output replaces the folder itself, even an empty one
    if reason is not None:
        raise GptcliError(f"{option} {target} cannot be replaced: {reason}; choose another folder")
    if is_empty_dir(path):
        return path
    found = marked_kind(path)
    if found is None:
        raise GptcliError(f"{option} {target} is a non-empty folder that gptcli did not create; "
                          f"gptcli only replaces its own output, so choose a new or empty folder")
    if found != kind:
        raise GptcliError(f"{option} {target} holds {KIND_NAMES.get(found, found)}, not "
                          f"{KIND_NAMES[kind]}; choose another folder")
    if not replace:
        raise GptcliError(f"{option} {target} already holds {KIND_NAMES[kind]}; pass "
                          f"--overwrite to replace it")
    return path


def check_output_file(target: str | Path, inputs: Iterable[Path], option: str) -> Path:
    """The resolved path of a file to write, if it is not a directory and not one of the
    command's inputs (nor inside an input folder)."""
    path = resolved(target, option)
    if path.is_dir():
        raise GptcliError(f"{option} {target} is a directory; name a file")
    for source in inputs:
        if path == source or path.is_relative_to(source):
            raise GptcliError(f"{option} {target} would overwrite the input {source}; "
                              f"choose another file")
    return path


class DirLock:
    """An exclusive advisory lock on `directory/.gptcli.lock`, held until `release()` or
    the process's end (the OS drops it on exit, even after kill -9). The file names the
    holder (pid and host) so a refused second process can say who has it."""

    def __init__(self, directory: Path, what: str):
        self.path = directory / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise GptcliError(f"{directory} is in use: {holder} is training in it; wait for it "
                                  f"to finish or stop it before starting {what} there") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1
