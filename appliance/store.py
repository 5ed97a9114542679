"""The on-disk cache: the only module that creates, moves or deletes cached DICOM files.

Layout under the data directory::

    incoming/                      files being received (pynetdicom streams each C-STORE here)
    outgoing/                      edited copies being sent (removed after the send)
    cache/<StudyUID>/<SOPUID>.<sha256[:12]>.<reception>.dcm
    reserve                        space held back for the database on a full disk (see below)
    run.lock                       held by the box running on this directory (app.py)
    admission.lock                 start-up's clearing, against imports (Store.clearing)

A file enters the cache durably: its data is fsync'd, it is renamed into its study directory
(atomic on one filesystem, which is why ``incoming/`` sits beside ``cache/``), and the directory
is fsync'd. Every reception gets a name of its own (``<reception>`` is random), even a resend
of identical content: a replacement never overwrites the file the database points at — the
new file is placed beside the old one, the database is switched over, and only then is the old
file removed — and whoever removes a file by the name it read from the database (eviction, a
replacement) removes that reception's file and never a newer one. So whatever a crash
interrupts, the database row points at a complete file, and :meth:`Store.recover` removes
files no row points at.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import Space
from .durable import fsync_dir

log = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"[0-9][0-9.]{0,63}")
_CHUNK = 1 << 20

# The reserve: a file of allocated space beside the database. Freeing space on a full disk
# takes database writes (an eviction is committed before its file is removed, and the workers
# record every outcome), and SQLite needs room to write them. If something else fills the disk
# (the print spool, logs, an admin's copy; or min_free: 0%), the first write that finds it full
# removes the reserve (Database.transaction), eviction can then go on and free space, and the
# forwarder lays the reserve down again once there is room. 1 % of the disk, 1 to 32 MiB.
RESERVE_NAME = "reserve"
_RESERVE_MIN, _RESERVE_MAX = 2**20, 32 * 2**20


def release_reserve(root: Path) -> int:
    """Remove the reserve in the data directory ``root``; its size, 0 if there was none."""
    path = root / RESERVE_NAME
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


@dataclass(frozen=True)
class DiskUsage:
    total: int
    free: int

    @property
    def used(self) -> int:
        return self.total - self.free


def _name_for(uid: str) -> str:
    """A UID as a file name; anything not a plain UID is hashed so it cannot escape the cache."""
    return uid if _SAFE_UID.fullmatch(uid) and ".." not in uid else "x" + hashlib.sha1(uid.encode()).hexdigest()


def digest_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file."""
    sha = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, _CHUNK):
            sha.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return size, sha.hexdigest()


class Store:
    """The cache directory tree of one appliance."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.cache = root / "cache"
        # Edited copies on their way to a destination (see outgoing.py).
        self.outgoing = root / "outgoing"
        # Study directories whose entry in cache/ this process knows to be durable.
        self._durable_dirs: set[str] = set()
        self._dirs_lock = threading.Lock()

    def prepare(self) -> None:
        """Create the tree; empty ``incoming/`` (what is there was never acknowledged) and
        ``outgoing/`` (copies made for sends that a stop interrupted)."""
        for path in (self.root, self.incoming, self.cache, self.outgoing):
            path.mkdir(parents=True, exist_ok=True)
        for stale in self.outgoing.iterdir():
            stale.unlink()
        leftovers = list(self.incoming.iterdir())
        for entry in leftovers:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if leftovers:
            log.info("removed %d partial file(s) left in %s by an interrupted receive", len(leftovers), self.incoming)
        fsync_dir(self.incoming)

    def admit(self, received: Path, study_uid: str, sop_uid: str, sha256: str) -> Path:
        """Move a received file into the cache and make it durable (data and name); returns its path.

        The rename comes before the file's fsync on purpose: nothing points at the new name
        until the caller commits its row, after this returns, so the order of the two is free
        — and on a journalling filesystem (ext4) the file's fsync then commits the rename with
        it, leaving the directory's fsync next to nothing to do. On failure nothing is left
        under the cache's name that was not there before."""
        study_dir = self._study_dir(study_uid)
        final = study_dir / f"{_name_for(sop_uid)}.{sha256[:12]}.{os.urandom(6).hex()}.dcm"
        try:
            os.replace(received, final)
        except FileNotFoundError:
            if not received.exists():
                raise
            # Eviction removed the study's last file, and with it the directory, meanwhile.
            study_dir = self._study_dir(study_uid, known=False)
            os.replace(received, final)
        try:
            fd = os.open(final, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(study_dir)
        except OSError:
            final.unlink(missing_ok=True)
            raise
        return final

    def _study_dir(self, study_uid: str, known: bool = True) -> Path:
        """The study's directory, created if need be, its entry in ``cache/`` durable. A
        directory another thread (or process) has just made may not be synced yet: the first
        file this process puts there syncs ``cache/`` too. ``known=False``: sync it whatever
        this process knows (the directory was removed since)."""
        study_dir = self.cache / _name_for(study_uid)
        name = study_dir.name
        if known and name in self._durable_dirs and study_dir.is_dir():
            return study_dir
        with self._dirs_lock:
            study_dir.mkdir(exist_ok=True)
            fsync_dir(self.cache)
            if len(self._durable_dirs) >= 10_000:
                self._durable_dirs.clear()
            self._durable_dirs.add(name)
        return study_dir

    def discard(self, path: Path) -> None:
        """Remove a cached file (after the database no longer points at it)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        try:
            path.parent.rmdir()  # the last instance of a study takes its directory with it
        except OSError:
            pass

    @contextmanager
    def clearing(self) -> Iterator[None]:
        """Held by start-up while it clears what an interrupted run left (:meth:`prepare`,
        :meth:`recover`). `appliance send` may be importing at that moment (a service restarted
        during an import from a USB stick): its copy in ``incoming/``, or its file just admitted
        into the cache and not yet indexed, would be taken for leftovers, and an image it then
        reports as imported would have no file. Exclusive against :meth:`importing`."""
        with self._admission_lock(fcntl.LOCK_EX):
            yield

    @contextmanager
    def importing(self) -> Iterator[None]:
        """Held by `appliance send` while it imports one file (shared: imports go on together;
        start-up's :meth:`clearing` waits for the one in progress)."""
        with self._admission_lock(fcntl.LOCK_SH):
            yield

    @contextmanager
    def _admission_lock(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        # Read-only: flock needs no more, and the file may be another user's (root's, the
        # service's) whoever made it first.
        fd = os.open(self.root / "admission.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def recover(self, known_paths: set[str]) -> int:
        """Remove cached files that no database row points at (a crash between rename and commit,
        or between commit and removing a replaced copy). Returns how many were removed. The
        rows must point at this cache (``Database.relocate``)."""
        removed = 0
        for study_dir in self.cache.iterdir():
            if not study_dir.is_dir():
                continue
            for entry in study_dir.iterdir():
                if str(entry) not in known_paths:
                    log.warning("removing %s: the database has no record of it (interrupted receive)", entry)
                    entry.unlink()
                    removed += 1
            if not any(study_dir.iterdir()):
                study_dir.rmdir()
        return removed

    def keep_reserve(self, min_free: Space) -> bool:
        """Lay the reserve down if it is not there and the disk has room for it above the low
        watermark (so that it never refuses an image by itself). Whether it is there."""
        path = self.root / RESERVE_NAME
        if path.exists():
            return True
        usage = self.usage()
        size = max(_RESERVE_MIN, min(_RESERVE_MAX, usage.total // 100))
        if usage.free - size < min_free.of(usage.total):
            return False
        temp = self.root / f".{RESERVE_NAME}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # blocks allocated, not a sparse promise
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.warning("cannot lay down the %d MiB reserve in %s: %s", size >> 20, self.root, exc)
            return False
        log.info("laid down a %d MiB reserve in %s for the database on a full disk", size >> 20, self.root)
        return True

    def usage(self) -> DiskUsage:
        st = os.statvfs(self.root)
        return DiskUsage(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)

    def has_room(self, min_free: Space) -> bool:
        """False when free space is below the low watermark: intake must stop."""
        usage = self.usage()
        return usage.free >= min_free.of(usage.total)
