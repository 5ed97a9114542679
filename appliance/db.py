"""The appliance's record: one SQLite database (WAL, synchronous=FULL); the only module that
writes SQL.

Every process opens it with :func:`open_database`. Within a process all writes go through one
connection under one lock (:meth:`Database.transaction`), so pynetdicom's handler threads never
interleave half-transactions. Each commit is durable before it returns (synchronous=FULL): the
receiver answers C-STORE success only after its row is committed here.

Rows keep a state column instead of being deleted, so the status page and the CLI can show
history. The schema is a list of migrations applied in order, tracked by ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Each migration is a list of statements, applied in one transaction.
MIGRATIONS: list[list[str]] = [
    # 1: the cache index and the log of repeated receptions.
    ["""
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        patient_id TEXT NOT NULL DEFAULT '',
        patient_name TEXT NOT NULL DEFAULT '',
        study_date TEXT NOT NULL DEFAULT '',
        accession_number TEXT NOT NULL DEFAULT '',
        modality TEXT NOT NULL DEFAULT '',
        transfer_syntax TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        called_ae TEXT NOT NULL,
        source_ip TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        received_at REAL NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 1,
        -- cached: the file is in the cache, evicted: delivered everywhere and removed.
        state TEXT NOT NULL DEFAULT 'cached',
        -- The routing decision taken at receive time (JSON), so a reload never re-routes.
        decision TEXT
    )""",
     "CREATE INDEX instances_study ON instances(study_instance_uid)",
     "CREATE INDEX instances_received ON instances(received_at)",
     """
    CREATE TABLE receptions (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL,
        at REAL NOT NULL,
        -- replaced | kept-first | rejected: what a repeated C-STORE of a cached UID did.
        outcome TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        source_ip TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL
    )""",
     "CREATE INDEX receptions_uid ON receptions(sop_instance_uid)"],
]


@dataclass(frozen=True)
class Instance:
    """One cached SOP instance, as indexed at receive time."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    modality: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    source_ip: str
    size: int
    sha256: str
    path: str
    received_at: float
    decision: str | None = None


_INSTANCE_COLUMNS = [f for f in Instance.__dataclass_fields__]


@dataclass(frozen=True)
class StudySummary:
    """One line of ``appliance ls``."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modalities: str
    instances: int
    size: int
    last_received: float
    state: str


class Database:
    """One connection, one lock: the single writer of this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: taken under the process lock, committed durably on exit."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")

    def integrity_check(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])

    # ---- the cache index ------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> Instance | None:
        rows = self.query(
            f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid = ? AND state = 'cached'",
            (sop_instance_uid,),
        )
        return Instance(**dict(rows[0])) if rows else None

    def store_instance(self, instance: Instance, replaced: Instance | None) -> None:
        """Index a newly cached file (or its replacement) in one durable commit."""
        columns = ", ".join(_INSTANCE_COLUMNS)
        marks = ", ".join("?" for _ in _INSTANCE_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _INSTANCE_COLUMNS if c != "sop_instance_uid")
        values = [getattr(instance, c) for c in _INSTANCE_COLUMNS]
        with self.transaction() as conn:
            conn.execute(
                f"INSERT INTO instances ({columns}) VALUES ({marks}) ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                f"{updates}, receive_count = receive_count + 1, state = 'cached'",
                values,
            )
            if replaced is not None:
                self._log_reception(conn, instance, "replaced")

    def record_duplicate(self, instance: Instance, outcome: str) -> None:
        """A repeated C-STORE that did not replace the cached copy (kept-first or rejected)."""
        with self.transaction() as conn:
            self._log_reception(conn, instance, outcome)
            conn.execute(
                "UPDATE instances SET receive_count = receive_count + 1 WHERE sop_instance_uid = ?",
                (instance.sop_instance_uid,),
            )

    @staticmethod
    def _log_reception(conn: sqlite3.Connection, instance: Instance, outcome: str) -> None:
        conn.execute(
            "INSERT INTO receptions (sop_instance_uid, at, outcome, calling_ae, source_ip, size, sha256)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (instance.sop_instance_uid, time.time(), outcome, instance.calling_ae, instance.source_ip,
             instance.size, instance.sha256),
        )

    def receptions(self, sop_instance_uid: str) -> list[sqlite3.Row]:
        return self.query(
            "SELECT at, outcome, calling_ae, source_ip, size, sha256 FROM receptions"
            " WHERE sop_instance_uid = ? ORDER BY id", (sop_instance_uid,)
        )

    def cached_paths(self) -> set[str]:
        return {row[0] for row in self.query("SELECT path FROM instances WHERE state = 'cached'")}

    def count_instances(self) -> int:
        return int(self.query("SELECT count(*) FROM instances WHERE state = 'cached'")[0][0])

    def studies(self) -> list[StudySummary]:
        rows = self.query(
            """
            SELECT study_instance_uid, max(patient_id) AS patient_id, max(patient_name) AS patient_name,
                   max(study_date) AS study_date, group_concat(DISTINCT modality) AS modalities,
                   count(*) AS instances, sum(size) AS size, max(received_at) AS last_received,
                   CASE WHEN sum(state = 'cached') = 0 THEN 'evicted' ELSE 'cached' END AS state
            FROM instances GROUP BY study_instance_uid ORDER BY last_received DESC
            """
        )
        return [StudySummary(**dict(row)) for row in rows]


def open_database(root: Path) -> Database:
    """The database of the appliance whose data directory is ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return Database(root / "appliance.db")


# ---- print jobs ----
# Owned by the print SCP (appliance/printing). A job is one N-ACTION: its films rendered into one
# PostScript file in the spool, sent to one printer. States: rendering -> queued -> sending ->
# printed | failed (a failed send goes back to queued with a later next_attempt_at until the
# printer's retry policy gives up). The table is created idempotently by the print service, so
# it does not depend on the order of MIGRATIONS.

PRINT_JOBS_DDL = [
    """
    CREATE TABLE IF NOT EXISTS print_jobs (
        id INTEGER PRIMARY KEY,
        printer TEXT NOT NULL,
        called_ae TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        level TEXT NOT NULL,
        film_box_uids TEXT NOT NULL,
        pages INTEGER NOT NULL DEFAULT 0,
        copies INTEGER NOT NULL DEFAULT 1,
        copies_sent INTEGER NOT NULL DEFAULT 0,
        priority TEXT NOT NULL DEFAULT 'MED',
        media TEXT NOT NULL DEFAULT '',
        title TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'rendering',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        ps_path TEXT,
        preview_path TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        printed_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS print_jobs_due ON print_jobs(state, next_attempt_at)",
]


@dataclass(frozen=True)
class PrintJob:
    """One row of ``print_jobs``."""

    id: int
    printer: str
    called_ae: str
    calling_ae: str
    level: str
    film_box_uids: str
    pages: int
    copies: int
    copies_sent: int
    priority: str
    media: str
    title: str
    state: str
    attempts: int
    last_error: str
    ps_path: str | None
    preview_path: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    printed_at: float | None


_PRINT_JOB_COLUMNS = ", ".join(PrintJob.__dataclass_fields__)


def ensure_print_schema(db: Database) -> None:
    with db.transaction() as conn:
        for statement in PRINT_JOBS_DDL:
            conn.execute(statement)


def insert_print_job(db: Database, printer: str, called_ae: str, calling_ae: str, level: str,
                     film_box_uids: Sequence[str], copies: int, priority: str, title: str) -> int:
    now = time.time()
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO print_jobs (printer, called_ae, calling_ae, level, film_box_uids, copies, priority,"
            " title, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'rendering', ?, ?)",
            (printer, called_ae, calling_ae, level, "\\".join(film_box_uids), copies, priority, title, now, now),
        )
        return int(cursor.lastrowid or 0)


def update_print_job(db: Database, job_id: int, **changes: Any) -> None:
    """Set columns of one job (names are PrintJob fields; never user input)."""
    unknown = set(changes) - set(PrintJob.__dataclass_fields__)
    if unknown:
        raise ValueError(f"not print_jobs columns: {sorted(unknown)}")
    changes["updated_at"] = time.time()
    assignments = ", ".join(f"{name} = ?" for name in changes)
    with db.transaction() as conn:
        conn.execute(f"UPDATE print_jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))


def claim_print_job(db: Database, printers: Sequence[str], now: float) -> PrintJob | None:
    """Take the next due queued job of these printers (HIGH before MED before LOW, then oldest)
    and mark it sending, atomically."""
    if not printers:
        return None
    marks = ", ".join("?" for _ in printers)
    with db.transaction() as conn:
        row = conn.execute(
            f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs WHERE state = 'queued' AND next_attempt_at <= ?"
            f" AND printer IN ({marks}) ORDER BY CASE priority WHEN 'HIGH' THEN 0 WHEN 'MED' THEN 1 ELSE 2 END, id"
            " LIMIT 1",
            (now, *printers),
        ).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE print_jobs SET state = 'sending', updated_at = ? WHERE id = ?", (now, row["id"]))
    return PrintJob(**{**dict(row), "state": "sending"})


def print_jobs_in_state(db: Database, state: str) -> list[PrintJob]:
    rows = db.query(f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs WHERE state = ? ORDER BY id", (state,))
    return [PrintJob(**dict(row)) for row in rows]


def list_print_jobs(db: Database, limit: int = 100) -> list[PrintJob]:
    rows = db.query(f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs ORDER BY id DESC LIMIT ?", (limit,))
    return [PrintJob(**dict(row)) for row in rows]


def next_print_job_due(db: Database, printers: Sequence[str]) -> float | None:
    if not printers:
        return None
    marks = ", ".join("?" for _ in printers)
    row = db.query(
        f"SELECT min(next_attempt_at) FROM print_jobs WHERE state = 'queued' AND printer IN ({marks})",
        tuple(printers),
    )[0]
    return None if row[0] is None else float(row[0])


def printed_jobs_before(db: Database, before: float) -> list[PrintJob]:
    rows = db.query(
        f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs WHERE state IN ('printed', 'failed') AND updated_at < ?"
        " AND preview_path IS NOT NULL", (before,),
    )
    return [PrintJob(**dict(row)) for row in rows]
