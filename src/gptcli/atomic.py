"""Crash-safe writes: build a directory or file under a temporary name, fsync it, rename it
into place. A crash at any moment leaves either the old version or the new, never half.

What is published gets the permissions the umask gives, as any file the user makes: on a
shared machine others can read a run (0755/0644 under umask 022) or not (0700/0600 under
077), the whole run alike. `tempfile.mkdtemp` would make staging folders 0700, and
safetensors writes its files 0600, whatever the umask; so staging folders are made with
`os.mkdir` (which applies the umask) and everything staged is set to the umask's modes
before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and `root` itself, to disk."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`; an existing `target` is moved aside
    first and deleted only once the new one is in place."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace the file at `path` with `data` atomically (and durably, with `fsync`): via a
    temporary sibling with a unique name, renamed into place. A failed write leaves the old
    file and no temporary one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never clobber another file; mode 0o666 lets the umask decide permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, fsync: bool = True) -> None:
    """`write_bytes` of `text` as UTF-8."""
    write_bytes(path, text.encode("utf-8"), fsync)


def make_unique_dir(parent: Path, prefix: str) -> Path:
    """A new, empty folder `parent/<prefix><random>` with the umask's permissions (where
    `tempfile.mkdtemp` would make it 0700)."""
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(path, 0o777)  # the umask takes its bits away, as for any folder
            return path
        except FileExistsError:  # another process drew the same name: draw again
            continue


def follow_umask(root: Path) -> None:
    """Give every folder and file under `root` the permissions the umask allows, as if
    made with plain `mkdir` and `open` (some writers, such as safetensors, make 0600
    files). `root` itself must have been made by `make_unique_dir`: its mode is the
    umask's mode for folders, so the umask is never changed to be read (that would race
    with other threads)."""
    folder_mode = stat.S_IMODE(root.stat().st_mode)
    file_mode = folder_mode & 0o666  # as open() with 0o666: no execute bits
    for path in root.rglob("*"):
        if path.is_symlink():
            continue  # chmod would change what the link points to
        wanted = folder_mode if path.is_dir() else file_mode
        if stat.S_IMODE(path.stat().st_mode) != wanted:
            os.chmod(path, wanted)


def new_staging_dir(target: Path) -> Path:
    """An empty hidden sibling of `target` (`.tmp-<name>-*`) to build it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return make_unique_dir(target.parent, f".tmp-{target.name}-")


@contextlib.contextmanager
def staging_dir(target: Path, work: Path | None = None) -> Iterator[Path]:
    """A temporary sibling directory to build `target` in (`work`, when the caller made it
    and others have written into it already). When the block ends its permissions follow
    the umask, it is fsynced and moved into place; if the block raises, it is deleted and
    `target` is untouched. (Killed processes leave `.tmp-<name>-*` siblings, which are
    never read.)"""
    work = work or new_staging_dir(target)
    try:
        yield work
        follow_umask(work)
        fsync_tree(work)
        replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
