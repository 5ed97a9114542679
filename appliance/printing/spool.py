"""The durable print queue: an N-ACTION's films become a PostScript file in the spool and a
``print_jobs`` row before the modality hears "success"; a worker thread hands queued jobs to their
printer's backend and retries an unreachable printer with backoff.

Files live under ``<storage.path>/print/``: ``jobs/`` (PostScript, removed once printed) and
``previews/`` (a small PNG of the first film, kept ``keep_printed_for``). Each file is written to
a temporary name, fsync'd, renamed and its directory fsync'd, so a power cut leaves either
nothing or a complete file; rows are committed with synchronous=FULL.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .. import db as dbmod
from ..db import Database, PrintJob
from ..durable import durable_file
from ..valuetypes import Space
from . import statuses
from .backends import Backend, BackendError
from .errors import PrintError
from .model import PrintRequest
from .render import render_postscript, render_preview
from .settings import PrinterConfig, PrintRetry

LOG = logging.getLogger(__name__)

# Room kept for a job's PNG preview (480 pixels on the long side, 8-bit gray or RGB).
PREVIEW_ALLOWANCE = 480 * 480 * 3


class _Hashing:
    """A write-only file that also hashes what goes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.out.write(data)


def retry_delay(policy: PrintRetry, attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones, with +-20 % jitter so a
    returning printer is not hit by every queue at once."""
    delay = min(policy.initial_delay * policy.factor ** max(attempts - 1, 0), policy.max_delay)
    return float(delay * random.uniform(0.8, 1.2))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()) or "unknown"


class Spool:
    """Submitting jobs (from SCP handler threads) and delivering them (from one worker)."""

    def __init__(self, db: Database, root: Path, printers: Mapping[str, PrinterConfig],
                 backends: Mapping[str, Backend], min_free: Space | None = None) -> None:
        self.db = db
        self.root = root
        self.min_free = min_free  # storage.disk.min_free: None checks nothing but a full disk
        self.jobs_dir = root / "jobs"
        self.previews_dir = root / "previews"
        self.printers = printers
        self.backends = backends
        # One event per printer: each printer has its own worker, so a printer that hangs
        # never holds up another's jobs.
        self.wake = {name: threading.Event() for name in backends}
        # Outcomes of attempts the database could not take (a full disk): job id -> (printer,
        # columns, spool file to remove once written). Written by the printer's worker as soon as
        # it can, so that no job stays 'sending' until the next restart.
        self._unrecorded: dict[int, tuple[str, dict[str, Any], Path | None]] = {}
        self._unrecorded_lock = threading.Lock()
        dbmod.ensure_print_schema(db)

    # ---- submit (N-ACTION) ----

    def submit(self, request: PrintRequest, printer_name: str, calling_ae: str) -> int:
        """Render the request into the spool and queue it; raises PrintError (print queue full)
        when the spool cannot take it."""
        printer = self.printers[printer_name]
        session = request.session
        full = statuses.QUEUE_FULL_SESSION if request.level == "film session" else statuses.QUEUE_FULL_FILM_BOX
        title = f"{calling_ae.strip()} {session.label or request.films[0].uid}".strip()
        self._check_room(request, printer_name, calling_ae, full)
        try:
            job_id = dbmod.insert_print_job(
                self.db, printer_name, printer.ae_title.strip(), calling_ae.strip(), request.level,
                [film.uid for film in request.films], session.copies, session.priority, title,
            )
        except sqlite3.Error as exc:
            LOG.error("printer %s: a job from %s cannot be recorded: %s", printer_name, calling_ae, exc)
            raise PrintError(full, f"print queue full: {exc}") from exc
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{_safe(calling_ae)}-job{job_id}"
        ps_path = self.jobs_dir / f"{name}.ps"
        preview_path = self.previews_dir / f"{name}.png"
        started = time.monotonic()
        try:
            with durable_file(ps_path) as out:
                hashing = _Hashing(out)
                result = render_postscript(request, printer, hashing, title)  # type: ignore[arg-type]
            self._write_preview(request, printer, preview_path)
            dbmod.update_print_job(
                self.db, job_id, state="queued", ps_path=str(ps_path), preview_path=str(preview_path),
                pages=result.pages, media=result.media, next_attempt_at=0.0, ps_size=hashing.size,
                ps_sha256=hashing.sha256.hexdigest(),
            )
        except (OSError, sqlite3.Error) as exc:
            # The row will say failed with no file: a file left here would never be pruned.
            ps_path.unlink(missing_ok=True)
            preview_path.unlink(missing_ok=True)
            LOG.error("printer %s: job %d from %s cannot be spooled: %s", printer_name, job_id, calling_ae, exc)
            try:
                dbmod.update_print_job(self.db, job_id, state="failed", last_error=f"spool: {exc}")
            except (sqlite3.Error, OSError) as db_exc:  # the same full disk; recover() fails it at restart
                LOG.error("printer %s: job %d cannot be recorded as failed: %s", printer_name, job_id, db_exc)
            raise PrintError(full, f"print queue full: {exc}") from exc
        LOG.info(
            "printer %s: job %d queued from %s (%s, %d page(s), %d copies, %.2f s to render, %d bytes)",
            printer_name, job_id, calling_ae, request.level, result.pages, session.copies,
            time.monotonic() - started, hashing.size,
        )
        self.wake[printer_name].set()
        return job_id

    def _check_room(self, request: PrintRequest, printer_name: str, calling_ae: str, full: int) -> None:
        """Refuse a job that would take the disk below ``min_free``: that space is the
        database's and the receiver's, and a print spool that fills the disk stops both."""
        if self.min_free is None:
            return
        # An estimate made before anything is written: PostScript holds each image once, Flate
        # in ASCII85, so pixels that do not compress take 5/4 of their size; plus each page's
        # own text and the preview.
        pixels = sum(box.pixels.data.nbytes for film in request.films for box in film.image_boxes
                     if box.pixels is not None)
        needed = pixels * 5 // 4 + len(request.films) * 64 * 1024 + PREVIEW_ALLOWANCE
        self.root.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(self.root)
        floor = self.min_free.of(usage.total)
        if usage.free - needed < floor:
            LOG.error("printer %s: a job from %s is refused: it needs about %d MB and %d MB are free,"
                      " storage.disk.min_free is %s", printer_name, calling_ae, needed >> 20, usage.free >> 20,
                      self.min_free)
            raise PrintError(full, f"print queue full: {usage.free >> 20} MB free, min_free {self.min_free}")

    @staticmethod
    def _write_preview(request: PrintRequest, printer: PrinterConfig, path: Path) -> None:
        from PIL import Image

        canvas = render_preview(request.films[0], printer)
        with durable_file(path) as out:
            Image.fromarray(canvas).save(out, "PNG", optimize=True)

    # ---- restart ----

    def recover(self) -> None:
        """After a restart: a job caught sending is queued again; a job caught rendering was
        never acknowledged to the modality, so it is failed (its partial file never got its name)."""
        for job in dbmod.print_jobs_in_state(self.db, "sending"):
            LOG.warning("printer %s: job %d was being sent when the service stopped; queued again", job.printer, job.id)
            dbmod.update_print_job(self.db, job.id, state="queued", next_attempt_at=0.0)
        for job in dbmod.print_jobs_in_state(self.db, "rendering"):
            LOG.warning("printer %s: job %d was interrupted while rendering; failed", job.printer, job.id)
            dbmod.update_print_job(self.db, job.id, state="failed", last_error="interrupted while rendering")

    # ---- deliver (worker) ----

    def deliver_due(self, printer: str, now: float | None = None) -> bool:
        """Send one due job of this printer, if any; True if a job was tried. (Retry times are on
        the schedule clock, clock.py: a step of the wall clock neither stalls nor hurries them.)
        Nothing is tried while an earlier outcome of this printer is still unrecorded."""
        if not self.record_pending(printer):
            return False
        job = dbmod.claim_print_job(self.db, [printer], self.db.schedule_now() if now is None else now)
        if job is None:
            return False
        self._deliver(job)
        return True

    def _deliver(self, job: PrintJob) -> None:
        printer = self.printers[job.printer]
        backend = self.backends[job.printer]
        path = Path(str(job.ps_path))
        sent = job.copies_sent

        def copy_sent() -> None:
            nonlocal sent
            sent += 1
            dbmod.update_print_job(self.db, job.id, copies_sent=sent)

        attempts = job.attempts + 1
        try:
            if not path.is_file():
                raise BackendError(f"spool file {path} is missing")
            if job.ps_size and path.stat().st_size != job.ps_size:
                raise BackendError(f"spool file {path} has {path.stat().st_size} bytes, {job.ps_size} were written")
            backend.send(path, job.copies - job.copies_sent, job.priority, job.media, job.title, copy_sent)
        except BackendError as exc:
            self._failed_attempt(job, printer.retry, attempts, str(exc))
            return
        except Exception as exc:
            # Ours, not the printer's (the database, the spool's disk): the claimed job goes back
            # to the queue like any failed attempt, then the worker reports the error.
            self._failed_attempt(job, printer.retry, attempts, f"{type(exc).__name__}: {exc}")
            raise
        LOG.info("printer %s: job %d from %s printed (%d copies)", job.printer, job.id, job.calling_ae, job.copies)
        self._record(job, path, state="printed", attempts=attempts, printed_at=time.time(), last_error="",
                     ps_path=None)

    def _failed_attempt(self, job: PrintJob, policy: PrintRetry, attempts: int, error: str) -> None:
        now = self.db.schedule_now()
        give_up = (policy.max_attempts and attempts >= policy.max_attempts) or (
            now - job.waiting_since > policy.give_up_after
        )
        if give_up:
            LOG.error("printer %s: job %d from %s failed after %d attempts: %s", job.printer, job.id,
                      job.calling_ae, attempts, error)
            self._record(job, None, state="failed", attempts=attempts, last_error=error)
            return
        delay = retry_delay(policy, attempts)
        LOG.warning("printer %s: job %d from %s not printed (attempt %d): %s; retry in %.0f s", job.printer,
                    job.id, job.calling_ae, attempts, error, delay)
        self._record(job, None, state="queued", attempts=attempts, last_error=error, next_attempt_at=now + delay)

    def _record(self, job: PrintJob, remove: Path | None, **columns: Any) -> None:
        """Write how an attempt at a claimed job ended, then remove ``remove``. When the database
        cannot take the write (a full disk), the outcome is kept for record_pending."""
        try:
            dbmod.update_print_job(self.db, job.id, **columns)
        except (sqlite3.Error, OSError) as exc:
            with self._unrecorded_lock:
                self._unrecorded[job.id] = (job.printer, columns, remove)
            LOG.warning("printer %s: job %d from %s is %s but the print queue cannot record it yet: %s",
                        job.printer, job.id, job.calling_ae, columns["state"], exc)
            return
        if remove is not None:
            remove.unlink(missing_ok=True)

    def record_pending(self, printer: str) -> bool:
        """Write the outcomes of this printer's jobs that the database could not take before;
        True when none is left."""
        with self._unrecorded_lock:
            pending = [(job_id, columns, remove) for job_id, (name, columns, remove) in self._unrecorded.items()
                       if name == printer]
        for job_id, columns, remove in pending:
            try:
                dbmod.update_print_job(self.db, job_id, **columns)
            except (sqlite3.Error, OSError):
                return False
            with self._unrecorded_lock:
                del self._unrecorded[job_id]
            if remove is not None:
                remove.unlink(missing_ok=True)
            LOG.info("printer %s: job %d recorded as %s", printer, job_id, columns["state"])
        return True

    def seconds_until_due(self, printer: str) -> float | None:
        due = dbmod.next_print_job_due(self.db, [printer])
        return None if due is None else max(0.0, due - self.db.schedule_now())

    def retry_now(self, job_id: int) -> bool:
        """Make a waiting or failed job due at once (the CLI/status page 'retry' action)."""
        ok = requeue(self.db, job_id)
        job = dbmod.get_print_job(self.db, job_id)
        if ok and job is not None and job.printer in self.wake:
            self.wake[job.printer].set()
        return ok

    def prune(self, keep_for: float) -> None:
        """Remove the files of jobs finished more than ``keep_for`` seconds ago (a failed job's
        PostScript is kept until then for a retry); the rows stay as history."""
        for job in dbmod.printed_jobs_before(self.db, time.time() - keep_for):
            for path in (job.preview_path, job.ps_path):
                if path:
                    Path(path).unlink(missing_ok=True)
            dbmod.update_print_job(self.db, job.id, preview_path=None, ps_path=None)


def requeue(db: Database, job_id: int) -> bool:
    """Queue a queued or failed job for an immediate attempt (its attempts and waiting time
    counted afresh); False if it cannot be (printed, or its PostScript is gone)."""
    job = dbmod.get_print_job(db, job_id)
    if job is None or job.state not in ("queued", "failed") or not job.ps_path or not Path(job.ps_path).is_file():
        return False
    dbmod.update_print_job(db, job_id, state="queued", next_attempt_at=0.0, attempts=0,
                           waiting_since=db.schedule_now())  # give_up_after counts afresh, too
    return True


class SpoolWorker:
    """One thread per printer that drains its queue; woken by new jobs, otherwise sleeps until
    the next retry is due (at most ``poll`` seconds)."""

    def __init__(self, spool: Spool, printer: str, keep_printed_for: float, poll: float = 5.0,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.spool = spool
        self.printer = printer
        self.keep_printed_for = keep_printed_for
        self.poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"print-spool-{printer}", daemon=True)
        self._on_error = on_error

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.spool.wake[self.printer].set()
        self._thread.join(timeout)

    def _run(self) -> None:
        last_prune = 0.0
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self.spool.deliver_due(self.printer):
                    pass
                if time.monotonic() - last_prune > 3600:
                    self.spool.prune(self.keep_printed_for)
                    last_prune = time.monotonic()
                # An outcome still unrecorded means the database cannot be written yet: try again
                # after a poll, not at once for a job that is due.
                wait = self.spool.seconds_until_due(self.printer) if self.spool.record_pending(self.printer) \
                    else self.poll
            except Exception as exc:  # the worker must survive a bad row or a full disk
                LOG.exception("print spool worker: %s", exc)
                if self._on_error:
                    self._on_error(exc)
                wait = self.poll
            wake = self.spool.wake[self.printer]
            wake.wait(self.poll if wait is None else min(wait, self.poll))
            wake.clear()
