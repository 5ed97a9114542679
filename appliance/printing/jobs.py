"""The print queue as people read it: ``appliance print-jobs`` and the status page."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..db import PrintJob, ensure_print_schema, list_print_jobs, open_database, print_job_counts


def list_jobs(root: Path, limit: int = 100) -> list[PrintJob]:
    """The newest print jobs of the appliance whose data directory is ``root``."""
    db = open_database(Path(root))
    try:
        ensure_print_schema(db)
        # Retry times are kept on the schedule clock (clock.py); shown as wall-clock times.
        return [dataclasses.replace(job, next_attempt_at=db.wall_time_of(job.next_attempt_at))
                if job.next_attempt_at else job
                for job in list_print_jobs(db, limit)]
    finally:
        db.close()


def job_counts(root: Path) -> dict[str, int]:
    """How many print jobs of the appliance whose data directory is ``root`` are in each state."""
    db = open_database(Path(root))
    try:
        ensure_print_schema(db)
        return print_job_counts(db)
    finally:
        db.close()


def retry_job(root: Path, job_id: int) -> bool:
    """Put a failed (or waiting) job back in its printer's queue for an immediate attempt; the
    running service picks it up within seconds."""
    from .spool import requeue

    db = open_database(Path(root))
    try:
        ensure_print_schema(db)
        return requeue(db, job_id)
    finally:
        db.close()


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def format_jobs(jobs: list[PrintJob], counts: dict[str, int] | None = None) -> str:
    """A table: one line per job, the last error under a failing one; then how many jobs are in
    each state — of all of them (``counts``, :func:`job_counts`), not only of those listed: a
    failed job older than the newest listed must still be seen to exist."""
    lines = [f"{'JOB':>5}  {'STATE':<9} {'PRINTER':<14} {'FROM':<16} {'PAGES':>5} {'COPIES':>6} "
             f"{'TRIES':>5}  {'QUEUED':<19}  {'PRINTED':<19}  PREVIEW"]
    for job in jobs:
        lines.append(
            f"{job.id:>5}  {job.state:<9} {job.printer[:14]:<14} {job.calling_ae[:16]:<16} {job.pages:>5} "
            f"{job.copies:>6} {job.attempts:>5}  {_when(job.created_at):<19}  {_when(job.printed_at):<19}  "
            f"{job.preview_path or '-'}"
        )
        if job.last_error and job.state != "printed":
            retry = f" (next try {_when(job.next_attempt_at)})" if job.state == "queued" else ""
            lines.append(f"       last error: {job.last_error}{retry}")
    if counts is None:
        counts = {}
        for job in jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no print jobs"
    total = sum(counts.values())
    if total > len(jobs):
        summary += f" (the newest {len(jobs)} of {total} listed: --limit N lists more)"
    lines.append(summary)
    return "\n".join(lines)
