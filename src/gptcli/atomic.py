"""Crash-safe writes: build a directory or file under a temporary name, fsync it, rename it
into place. A crash at any moment leaves either the old version or the new, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling directory to build `target` in. When the block ends it is
    fsynced and moved into place; if the block raises, it is deleted and `target` is
    untouched. (Killed processes leave `.tmp-<name>-*` siblings, which are never read.)"""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield work
        fsync_tree(work)
        replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
