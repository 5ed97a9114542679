"""Writing files so that after a power cut each is either absent or complete: write a
temporary file beside the target, fsync it, rename it over the target, fsync the directory.
Used by the cache (``store.py``) and the print spool."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(temp: Path, target: Path) -> None:
    """Rename an fsync'd file into place, durably."""
    os.replace(temp, target)
    fsync_dir(target.parent)


@contextmanager
def durable_file(target: Path) -> Iterator[BinaryIO]:
    """``with durable_file(path) as out: out.write(...)``: ``path`` appears only complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        place(Path(temp), target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def durable_copy(source: Path, target: Path, mode: int | None = None) -> None:
    """Copy so that ``target`` either does not exist or is complete, even after a power cut.
    ``mode``: set before the rename, so the file is never seen under its name with another."""
    with durable_file(target) as out, source.open("rb") as src:
        if mode is not None:
            os.fchmod(out.fileno(), mode)
        shutil.copyfileobj(src, out, 1 << 20)
