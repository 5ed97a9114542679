"""The appliance's record: one SQLite database (WAL, synchronous=FULL); the only module that
writes SQL.

Every process opens it with :func:`open_database`. Within a process all writes go through one
connection under one lock (:meth:`Database.transaction`), so pynetdicom's handler threads never
interleave half-transactions; between processes, writers queue on a file lock beside it. Each
commit is durable before it returns (synchronous=FULL): the receiver answers C-STORE success
only after its row is committed here. The one exception is a forwarding outcome
(:meth:`Database.finish`), whose loss costs a resend and nothing else.

Rows keep a state column instead of being deleted, so the status page and the CLI can show
history. The schema is a list of migrations applied in order, tracked by ``PRAGMA user_version``.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import clock
from .store import release_reserve

log = logging.getLogger(__name__)

# When a cached instance was done with (migration 4), worked out from its deliveries: the last
# delivery's time once every one is delivered; its receive time if a rule discarded it and it
# has none; otherwise NULL — something is still owed, or it is unrouted and kept.
_DONE_AT = """done_at = CASE
        WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id = instances.id)
        THEN (SELECT CASE WHEN sum(d.state != 'delivered') = 0 THEN max(d.delivered_at) END
              FROM deliveries d WHERE d.instance_id = instances.id)
        WHEN json_extract(instances.decision, '$.status') = 'discarded' THEN instances.received_at
    END"""

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
    # 2: the forwarding queues, their attempt history, and stable-study holds.
    ["""
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        instance_id INTEGER NOT NULL REFERENCES instances(id),
        destination TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        -- held (waiting for its study to be stable) -> pending -> in_flight -> delivered | dead
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        delivered_at REAL,
        last_status INTEGER,
        last_error TEXT,
        transcoded INTEGER NOT NULL DEFAULT 0,
        UNIQUE (instance_id, destination)
    )""",
     "CREATE INDEX deliveries_due ON deliveries(destination, state, next_attempt_at)",
     "CREATE INDEX deliveries_instance ON deliveries(instance_id)",
     """
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
        at REAL NOT NULL,
        -- delivered | retry | dead | unknown (no response: the peer may or may not have it)
        outcome TEXT NOT NULL,
        status INTEGER,
        error TEXT
    )""",
     "CREATE INDEX attempts_delivery ON attempts(delivery_id)",
     """
    CREATE TABLE holds (
        study_instance_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        stable_after REAL NOT NULL,
        last_arrival REAL NOT NULL,
        release_at REAL NOT NULL,
        -- waiting: instances are held until release_at; released: later ones go out as follow-ups
        state TEXT NOT NULL,
        released_at REAL,
        PRIMARY KEY (study_instance_uid, destination)
    )"""],
    # 3: the schedule clock's base for this boot, and when the appliance was last seen running
    # (clock.py). Retry times, give-up ages and stable-study timers are kept in it from here on.
    ["CREATE TABLE schedule_clock (boot_id TEXT PRIMARY KEY, base REAL NOT NULL, seen REAL NOT NULL)"],
    # 4: when each cached instance was done with — delivered everywhere its rules sent it (the
    # last delivery's time), or discarded by a rule (its receive time); NULL while anything is
    # owed. Kept by triggers, so no code path can forget it; indexed, so the retention and
    # eviction scans (Database.evictable) read the oldest few instead of the whole cache.
    ["ALTER TABLE instances ADD COLUMN done_at REAL",
     f"UPDATE instances SET {_DONE_AT} WHERE state = 'cached'",
     "CREATE INDEX instances_done ON instances(done_at) WHERE state = 'cached' AND done_at IS NOT NULL",
     # A new row has no deliveries yet (they are queued after it): done with only if discarded.
     """CREATE TRIGGER instances_done_on_insert AFTER INSERT ON instances
         WHEN json_extract(NEW.decision, '$.status') = 'discarded'
         BEGIN UPDATE instances SET done_at = NEW.received_at WHERE id = NEW.id; END""",
     f"""CREATE TRIGGER instances_done_on_update AFTER UPDATE OF decision, received_at, state ON instances
         BEGIN UPDATE instances SET {_DONE_AT} WHERE id = NEW.id; END""",
     f"""CREATE TRIGGER deliveries_done_on_insert AFTER INSERT ON deliveries
         BEGIN UPDATE instances SET {_DONE_AT} WHERE id = NEW.instance_id; END""",
     # Only when the delivery becomes, or stops being, delivered: not on every claim.
     f"""CREATE TRIGGER deliveries_done_on_update AFTER UPDATE OF state, delivered_at ON deliveries
         WHEN (OLD.state = 'delivered') != (NEW.state = 'delivered') OR OLD.delivered_at IS NOT NEW.delivered_at
         BEGIN UPDATE instances SET {_DONE_AT} WHERE id = NEW.instance_id; END""",
     f"""CREATE TRIGGER deliveries_done_on_delete AFTER DELETE ON deliveries
         BEGIN UPDATE instances SET {_DONE_AT} WHERE id = OLD.instance_id; END"""],
    # 5: finding the history to prune (Database.prune_history): evicted instances by when they
    # were done with, repeated receptions by time. Evicted before migration 4, done_at is filled in.
    [f"UPDATE instances SET {_DONE_AT} WHERE state = 'evicted' AND done_at IS NULL",
     "CREATE INDEX instances_evicted ON instances(done_at) WHERE state = 'evicted'",
     "CREATE INDEX receptions_at ON receptions(at)"],
    # 6: each delivery's tag edits, recorded with it (see Delivery.edits). NULL for deliveries
    # queued before: their edits are still read from the instance's decision.
    ["ALTER TABLE deliveries ADD COLUMN edits TEXT"],
    # 7: a replacement that moved its instance to another study left its deliveries filed under
    # the old one, where a stable-study release never found them: file them under the
    # instance's study, and send at once what no waiting hold covers any more.
    ["""UPDATE deliveries SET study_instance_uid =
            (SELECT i.study_instance_uid FROM instances i WHERE i.id = deliveries.instance_id)
        WHERE state != 'delivered' AND study_instance_uid !=
            (SELECT i.study_instance_uid FROM instances i WHERE i.id = deliveries.instance_id)""",
     """UPDATE deliveries SET state = 'pending' WHERE state = 'held' AND NOT EXISTS
            (SELECT 1 FROM holds h WHERE h.study_instance_uid = deliveries.study_instance_uid
             AND h.destination = deliveries.destination AND h.state = 'waiting')"""],
    # 8: whether the version being delivered may be at the destination already, though no
    # success was recorded: an attempt had no answer, or the appliance stopped while sending
    # it. A PACS that refuses duplicates (0x0111) then has it from that attempt. Reset when a
    # replacement starts the delivery over. Before, only the attempts tell.
    ["ALTER TABLE deliveries ADD COLUMN maybe_sent INTEGER NOT NULL DEFAULT 0",
     """UPDATE deliveries SET maybe_sent = 1 WHERE state != 'delivered' AND EXISTS
            (SELECT 1 FROM attempts a WHERE a.delivery_id = deliveries.id AND a.outcome = 'unknown')"""],
    # 9: when `appliance retry` last put a dead letter back (schedule clock): its retry policy's
    # give_up_after counts from here, while created_at keeps when it was queued — the age
    # `appliance queue` shows. NULL: never retried (or started over since, by a replacement).
    ["ALTER TABLE deliveries ADD COLUMN requeued_at REAL"],
    # 10: each delivery's latest attempt that did not deliver it (attempts.id), indexed by
    # destination: `appliance queue` and the status page show the latest failure of each
    # destination (LAST ERROR) from one index seek, whatever the length of the history.
    ["ALTER TABLE deliveries ADD COLUMN last_failure INTEGER",
     """UPDATE deliveries SET last_failure = (SELECT max(a.id) FROM attempts a
            WHERE a.delivery_id = deliveries.id AND a.outcome != 'delivered')""",
     "CREATE INDEX IF NOT EXISTS deliveries_last_failure ON deliveries(destination, last_failure)"
     " WHERE last_failure IS NOT NULL"],
    # 11: whether an in-flight delivery's request has gone out (see requeue_in_flight): of a
    # claimed batch, only the one on the wire when the appliance stopped was attempted. What an
    # older release left in flight is taken as sent, as that release would have.
    ["ALTER TABLE deliveries ADD COLUMN on_wire INTEGER NOT NULL DEFAULT 0",
     "UPDATE deliveries SET on_wire = 1 WHERE state = 'in_flight'"],
    # 12: a delivery whose own send failed while the destination took others (the PACS aborted
    # on it, or refused it for now) goes after those that have not: see claim.
    # Indexed in the orders claim takes them: the study of the first due delivery, then that
    # study's, are found at the front of an index instead of by sorting every pending delivery
    # of the destination (64 ms a claim with 200,000 pending).
    ["ALTER TABLE deliveries ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0",
     "CREATE INDEX deliveries_claim ON deliveries(destination, state, deferred, id)",
     "CREATE INDEX deliveries_study ON deliveries(destination, study_instance_uid, state, deferred, id)"],
    # 13: the few transcoded deliveries, counted by `appliance queue` and the status page
    # without reading every delivery row (see queue_summaries).
    ["CREATE INDEX deliveries_transcoded ON deliveries(destination) WHERE transcoded = 1"],
    # 14: where an in-flight delivery goes once its worker lets go of it, when `appliance move`
    # moved its destination's queue meanwhile (see move_queue and _FOLLOW_MOVE).
    ["ALTER TABLE deliveries ADD COLUMN moved_to TEXT"],
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

# The error of the attempt recorded for a delivery that a previous run had in flight.
STOPPED_WHILE_SENDING = "the appliance stopped while sending it: the destination may or may not have it"

# For a pending delivery ``d`` to the destination given as its parameter: no delivery of its
# study there is in flight. Not correlated, so SQLite lists the studies in flight once (at most
# a few batches, found by deliveries_due) instead of once per pending row (a correlated NOT
# EXISTS made each poll 200 us with 500 pending, 200 in flight). With nothing in flight (one
# association) a poll costs what it did, 7 us here. What a stopped run left in flight is put back
# at start-up (requeue_in_flight).
_NOT_IN_FLIGHT = ("d.study_instance_uid NOT IN (SELECT study_instance_uid FROM deliveries"
                  " WHERE destination = ? AND state = 'in_flight')")


# A claimed delivery's request is going out (Database.sending, and finish's ``following``).
_ON_WIRE = "UPDATE deliveries SET on_wire = 1 WHERE id = ? AND state = 'in_flight'"

# A delivery that was in flight when `appliance move` moved its destination's queue, once its
# worker let go of it without delivering it (put back, failed, given up, the box stopped): it
# starts over at the new destination as the moved ones did (Database.move_queue), unless that
# one has a delivery of the instance already. Delivered, it stays the old one's history.
_FOLLOW_MOVE = ("UPDATE OR IGNORE deliveries SET destination = moved_to, state = 'pending', attempts = 0,"
                " next_attempt_at = :now, requeued_at = :now, deferred = 0, maybe_sent = 0, on_wire = 0,"
                " moved_to = NULL WHERE id = :id AND moved_to IS NOT NULL AND state IN ('pending', 'dead')")
_MOVE_DONE = "UPDATE deliveries SET moved_to = NULL WHERE id = :id AND moved_to IS NOT NULL AND state != 'in_flight'"

# A delivery of a new version of its instance (a replacement) starts over: due now (``:now``,
# schedule clock), nothing attempted, nothing delivered. The same whether the rules queued it
# again or it was in flight when `appliance send --to` replaced the file it was sending.
_START_OVER = ("attempts = 0, created_at = :now, next_attempt_at = :now, delivered_at = NULL, last_status = NULL,"
               " last_error = NULL, transcoded = 0, maybe_sent = 0, requeued_at = NULL, deferred = 0")


@dataclass(frozen=True)
class Delivery:
    """Where a new instance is to be sent, as the routing decision said."""

    destination: str
    stable_after: float | None = None
    # The rule's tag edits for this destination (JSON, rules.TagEdit.to_dict each): kept with the
    # delivery, so that whatever later replaces the instance's recorded decision (a correction
    # routed elsewhere, `appliance send --to`) cannot change what this delivery sends.
    edits: str = "[]"


@dataclass(frozen=True)
class Work:
    """One claimed delivery: the instance to send and its delivery's history."""

    delivery_id: int
    attempts: int
    # When it was queued, or put back by `appliance retry` since (schedule clock): what the
    # retry policy's give_up_after counts from.
    waiting_since: float
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    transfer_syntax: str
    path: str
    decision: str | None
    edits: str | None = None  # the delivery's own (migration 6); None: queued before, see the decision
    # An earlier attempt of this version had no answer, or the appliance stopped while sending
    # it (migration 8): the destination may have it already.
    maybe_sent: bool = False


@dataclass(frozen=True)
class MovedQueue:
    """What ``appliance move`` did (:meth:`Database.move_queue`): how many deliveries start over
    at the new destination, how many stay (it has those instances already), and how many being
    sent to the old one follow if that send does not deliver them."""

    moved: int
    kept: int
    following: int


@dataclass(frozen=True)
class QueueSummary:
    """One destination's queue, as ``appliance queue`` shows it."""

    name: str
    pending: int
    held: int
    in_flight: int
    delivered: int
    dead: int
    transcoded: int
    oldest_pending_age: float | None
    last_error: str | None
    last_error_at: float | None = None  # wall clock: a failure long ago reads as such


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


# Bytes the WAL file is cut back to after a checkpoint (it fills ~4 MB between automatic ones).
WAL_SIZE_LIMIT = 8 << 20


class Database:
    """One connection, one lock: the single writer of this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._schedule: tuple[str, float] | None = None  # (boot id, base) of the schedule clock
        try:
            self._open()
        except (sqlite3.OperationalError, OSError) as exc:
            # Opening makes files: the WAL and its index (a clean stop removes them), the
            # writers' lock, a migration's pages. On a disk that another writer filled to the
            # last byte SQLite cannot (it says "disk I/O error", not "full"), and the box
            # could neither start nor tell what it holds, its images stranded: the reserve is
            # there for the database on a full disk (store.py).
            if not _disk_full(path.parent):
                raise
            freed = release_reserve(path.parent)
            if not freed:
                raise
            log.warning("the disk is full (%s): removed the %d MiB reserve so that the database can be opened",
                        exc, freed >> 20)
            self._open()

    def _open(self) -> None:
        path = self.path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        path = self.path
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        # The WAL grows while a reader holds an old snapshot (appliance ls over a big cache, the
        # status page during a backlog) and by default keeps its peak size on the card for good;
        # past this limit it is cut back once it has been checkpointed.
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # The writers of all processes (receiver, forwarder, CLI) queue on this lock before they
        # ask SQLite for its own. A writer that finds SQLite's lock taken sleeps 1, 2, 5... ms
        # (SQLite's busy handler polls) where a commit takes a fraction of that, and the
        # forwarder's next C-STORE waits on its commit; flock wakes the next writer the moment
        # the lock is free. SQLite's lock still guards correctness (busy_timeout).
        self._writers = os.open(f"{path}.writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._migrate()
        except BaseException:
            os.close(self._writers)
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._writers)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: taken under the process lock, committed on exit.

        ``durable=False`` skips the WAL fsync of this one commit (synchronous=NORMAL): the
        commit survives the process being killed, and is made durable by the next durable
        commit of any process (the WAL is one file, synced as a whole), but a power cut may
        lose it. Only for records whose loss is harmless — see :meth:`finish`."""
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            fcntl.flock(self._writers, fcntl.LOCK_EX)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (a full disk) may leave the transaction open: every
                    # later BEGIN would then fail too.
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                    freed = release_reserve(self.path.parent)
                    if freed:
                        log.warning("the disk is full: removed the %d MiB reserve so that the database can"
                                    " record evictions and deliveries", freed >> 20)
                raise
            finally:
                fcntl.flock(self._writers, fcntl.LOCK_UN)
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

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

    # ---- the schedule clock (clock.py) -------------------------------------------------------

    def schedule_now(self) -> float:
        """Now, on the schedule clock: what retry times, give-up ages and stable-study timers
        are kept in (never the wall clock, which steps)."""
        if self._schedule is None:
            boot = clock.boot_id()
            self._schedule = (boot, self._schedule_base(boot))
        return clock.since_boot() + self._schedule[1]

    def _schedule_base(self, boot: str) -> float:
        """This boot's base (shared by every process and restart within it). A new boot resumes
        from when the previous one was last seen running; a new database from the wall clock."""
        row = self.query("SELECT base FROM schedule_clock WHERE boot_id = ?", (boot,))
        if row:
            return float(row[0][0])
        with self.transaction() as conn:
            found = conn.execute("SELECT base FROM schedule_clock WHERE boot_id = ?", (boot,)).fetchone()
            if found is not None:  # another process of this boot was first
                return float(found[0])
            last = conn.execute("SELECT max(seen) FROM schedule_clock").fetchone()[0]
            start = time.time() if last is None else float(last)
            base = start - clock.since_boot()
            conn.execute("DELETE FROM schedule_clock")  # of an earlier boot only its last time mattered
            conn.execute("INSERT INTO schedule_clock (boot_id, base, seen) VALUES (?, ?, ?)", (boot, base, start))
        return base

    def wall_time_of(self, scheduled: float) -> float:
        """A time on the schedule clock as a wall-clock time, for people to read (``appliance
        queue``, ``print-jobs``, the status page): where the wall clock is now plus how far
        ahead (or behind) ``scheduled`` is on the schedule clock."""
        return time.time() + (scheduled - self.schedule_now())

    def schedule_seen(self) -> None:
        """Record that the appliance is running now: where the next boot's schedule clock
        resumes. Not fsync'd: a power cut loses the latest of these with the other records of
        that moment, so the clock and the schedules kept in it stay consistent."""
        now = self.schedule_now()
        assert self._schedule is not None
        with self.transaction(durable=False) as conn:
            conn.execute("UPDATE schedule_clock SET seen = max(seen, ?) WHERE boot_id = ?", (now, self._schedule[0]))

    def find_instance(self, sop_instance_uid: str) -> Instance | None:
        rows = self.query(
            f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid = ? AND state = 'cached'",
            (sop_instance_uid,),
        )
        return Instance(**dict(rows[0])) if rows else None

    def store_instance(self, instance: Instance, replaced: Instance | None,
                       deliveries: Sequence[Delivery] = (), rerouted: bool = True) -> list[str]:
        """Index a newly cached file (or its replacement) and queue its deliveries, in one
        durable commit.

        A replacement routed by the rules (``rerouted``; not `appliance send --to`, which adds
        one destination to what the instance already has) supersedes the old version's
        decision: its deliveries to destinations the new decision does not name are dropped —
        the new version is not for them (a correction that now matches another rule, no rule,
        or a discard rule), and the old file is gone. Those not yet made are cancelled; those
        made were the old version's, and must not count as the new one's (a correction no
        rule routes would be evicted as delivered instead of kept as unrouted). Returns the
        destinations of the cancelled ones.

        A replacement by `appliance send --to` leaves the other destinations' deliveries as
        they are, but for those in flight: the file on its way is the old one, which is gone,
        and its outcome will not be applied (:meth:`finish`). They start over, as the rules'
        deliveries of a replacement do, so that the new file goes there too — left in flight,
        they (and the rest of their study) would never be sent again. Those not delivered are
        no longer maybe at their destination: the new version is at none.

        An instance evicted earlier comes back as a new version of it in the same way: its
        record is the one :meth:`find_instance` no longer shows (``replaced`` is None)."""
        columns = ", ".join(_INSTANCE_COLUMNS)
        marks = ", ".join("?" for _ in _INSTANCE_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _INSTANCE_COLUMNS if c != "sop_instance_uid")
        values = [getattr(instance, c) for c in _INSTANCE_COLUMNS]
        scheduled = self.schedule_now()
        with self.transaction() as conn:
            previous = conn.execute("SELECT sha256 FROM instances WHERE sop_instance_uid = ?",
                                    (instance.sop_instance_uid,)).fetchone()
            existed = previous is not None
            # A modality sending an image again as it was (the same bytes, which the meta
            # written on receipt keeps): the destinations that have it have this version.
            identical = existed and previous[0] == instance.sha256
            conn.execute(
                f"INSERT INTO instances ({columns}) VALUES ({marks}) ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                f"{updates}, receive_count = receive_count + 1, state = 'cached'",
                values,
            )
            if replaced is not None:
                self._log_reception(conn, instance, "replaced")
            cancelled: list[str] = []
            if deliveries or existed:
                instance_id = conn.execute("SELECT id FROM instances WHERE sop_instance_uid = ?",
                                           (instance.sop_instance_uid,)).fetchone()[0]
                for delivery in deliveries:
                    self._queue(conn, instance_id, instance.study_instance_uid, delivery, scheduled,
                                identical=identical)
                if existed and not rerouted:
                    conn.execute(f"UPDATE deliveries SET state = 'pending', {_START_OVER},"
                                 " maybe_sent = :identical"
                                 " WHERE instance_id = :instance_id AND state = 'in_flight'",
                                 {"now": scheduled, "instance_id": instance_id, "identical": int(identical)})
                    if not identical:  # the new version is at none of them
                        conn.execute("UPDATE deliveries SET maybe_sent = 0 WHERE instance_id = ?"
                                     " AND state != 'delivered'", (instance_id,))
                if existed and rerouted:
                    keep = [d.destination for d in deliveries]
                    stale = conn.execute(
                        f"SELECT id, destination, state FROM deliveries WHERE instance_id = ?"
                        f" AND destination NOT IN ({', '.join('?' for _ in keep)})", (instance_id, *keep)).fetchall()
                    for delivery_id, destination, state in stale:
                        conn.execute("DELETE FROM attempts WHERE delivery_id = ?", (delivery_id,))
                        conn.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,))
                        if state != "delivered":
                            cancelled.append(str(destination))
        return cancelled

    def queue_cached(self, cached: Instance, deliveries: Sequence[Delivery]) -> bool:
        """Queue deliveries of an instance as it is cached (``appliance send --to`` of one the
        duplicate policy keeps), in one durable commit — if its row still points at
        ``cached.path``: eviction may have removed that file since it was looked up, and the
        caller must then cache the copy it has. Whether they were queued."""
        scheduled = self.schedule_now()
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM instances WHERE sop_instance_uid = ? AND path = ? AND state = 'cached'",
                               (cached.sop_instance_uid, cached.path)).fetchone()
            if row is None:
                return False
            for delivery in deliveries:
                self._queue(conn, row[0], cached.study_instance_uid, delivery, scheduled, same_version=True)
        return True

    def record_duplicate(self, instance: Instance, outcome: str) -> None:
        """A repeated C-STORE that did not replace the cached copy (kept-first or rejected)."""
        with self.transaction() as conn:
            self._log_reception(conn, instance, outcome)
            conn.execute(
                "UPDATE instances SET receive_count = receive_count + 1 WHERE sop_instance_uid = ?",
                (instance.sop_instance_uid,),
            )

    @staticmethod
    def _queue(conn: sqlite3.Connection, instance_id: int, study: str, delivery: Delivery, now: float,
               same_version: bool = False, identical: bool = False) -> None:
        """Queue one delivery. With ``stable_after`` it is held until its study has been quiet
        that long; each arrival pushes the study's release time back. Once a study has been
        released, its late instances go out at once, as follow-ups. ``now`` is on the schedule
        clock.

        A delivery already there to that destination starts over: it is a new version's. With
        ``same_version`` (the cached copy queued again) one still on its way is left as it
        is, and one delivered or dead goes back to the queue as `appliance retry` puts it —
        a delivered one known to be at the destination already (``maybe_sent``). A new version
        ``identical`` to the one it replaces (a modality's resend) starts over too, but one
        delivered, or maybe sent, with the same tag edits is known to be there already: a PACS
        that refuses duplicates answers 0x0111, which is then its delivery, not a dead letter."""
        state = "pending"
        hold = conn.execute("SELECT state FROM holds WHERE study_instance_uid = ? AND destination = ?",
                            (study, delivery.destination)).fetchone()
        # Held: with a stable_after of its own, until the study is released; without one, while
        # another rule holds the study for this destination — else it would go out ahead of
        # the study, which then arrives in pieces.
        if (delivery.stable_after and (hold is None or hold["state"] == "waiting")) or (
                hold is not None and hold["state"] == "waiting"):
            state = "held"
            # The study's window is the longest any of its rules asked for; each arrival
            # pushes its release back by that much, never forward.
            conn.execute(
                "INSERT INTO holds (study_instance_uid, destination, stable_after, last_arrival, release_at, state)"
                " VALUES (?, ?, ?, ?, ?, 'waiting') ON CONFLICT (study_instance_uid, destination) DO UPDATE SET"
                " stable_after = max(holds.stable_after, excluded.stable_after),"
                " last_arrival = excluded.last_arrival,"
                " release_at = max(holds.release_at,"
                "                  excluded.last_arrival + max(holds.stable_after, excluded.stable_after))",
                (study, delivery.destination, delivery.stable_after or 0.0, now, now + (delivery.stable_after or 0.0)),
            )
        if same_version:
            update = ("state = excluded.state, edits = excluded.edits, attempts = 0, next_attempt_at = :now,"
                      " delivered_at = NULL, requeued_at = :now,"
                      " maybe_sent = maybe_sent OR deliveries.state = 'delivered'"
                      " WHERE deliveries.state IN ('delivered', 'dead')")
        else:  # a replaced instance is sent again: its delivery starts over
            update = ("study_instance_uid = excluded.study_instance_uid,"  # a correction may move it to another study
                      f" state = excluded.state, edits = excluded.edits, {_START_OVER}")
            if identical:  # every right-hand side reads the row as it was
                update += (", maybe_sent = (deliveries.state = 'delivered' OR deliveries.maybe_sent)"
                           " AND deliveries.edits IS excluded.edits")
        conn.execute(
            "INSERT INTO deliveries (instance_id, destination, study_instance_uid, state, created_at, next_attempt_at,"
            " edits) VALUES (:instance_id, :destination, :study, :state, :now, :now, :edits)"
            f" ON CONFLICT (instance_id, destination) DO UPDATE SET {update}",
            {"instance_id": instance_id, "destination": delivery.destination, "study": study, "state": state,
             "now": now, "edits": delivery.edits},
        )

    @staticmethod
    def _log_reception(conn: sqlite3.Connection, instance: Instance, outcome: str) -> None:
        conn.execute(
            "INSERT INTO receptions (sop_instance_uid, at, outcome, calling_ae, source_ip, size, sha256)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (instance.sop_instance_uid, time.time(), outcome, instance.calling_ae, instance.source_ip,
             instance.size, instance.sha256),
        )

    def cached_paths(self) -> set[str]:
        return {row[0] for row in self.query("SELECT path FROM instances WHERE state = 'cached'")}

    def relocate(self, cache: Path) -> int:
        """Point cached rows written under another spelling of the data directory (moved, or
        reached through a symlink) at ``cache``, where their files are now: same study
        directory, same name. Returns how many rows changed."""
        prefix = f"{cache}{os.sep}"
        with self.transaction() as conn:
            moved = [(row[0], Path(row[1])) for row in conn.execute(
                "SELECT id, path FROM instances WHERE state = 'cached' AND substr(path, 1, ?) != ?",
                (len(prefix), prefix))]
            for instance_id, path in moved:
                conn.execute("UPDATE instances SET path = ? WHERE id = ?",
                             (str(cache / path.parent.name / path.name), instance_id))
        return len(moved)

    def studies(self) -> list[StudySummary]:
        """Every study the cache holds or held, newest first, with its state: what its cached
        instances wait for, the most pressing first — ``dead`` (a dead letter to see to),
        ``sending`` (queued or in flight), ``held`` (waiting to be stable), ``delivered``
        (wherever its rules send it), else ``unrouted`` (kept, matched no rule that sends it) or
        ``discarded``; ``evicted`` once no instance is cached."""
        rows = self.query(
            """
            WITH queued AS (
                SELECT i.study_instance_uid AS study, sum(d.state = 'dead') AS dead,
                       sum(d.state IN ('pending', 'in_flight')) AS sending, sum(d.state = 'held') AS held,
                       sum(d.state = 'delivered') AS delivered
                FROM deliveries d JOIN instances i ON i.id = d.instance_id
                WHERE i.state = 'cached' GROUP BY i.study_instance_uid)
            SELECT study_instance_uid, max(patient_id) AS patient_id, max(patient_name) AS patient_name,
                   max(study_date) AS study_date, group_concat(DISTINCT modality) AS modalities,
                   count(*) AS instances, sum(size) AS size, max(received_at) AS last_received,
                   CASE WHEN sum(state = 'cached') = 0 THEN 'evicted'
                        WHEN max(q.dead) > 0 THEN 'dead' WHEN max(q.sending) > 0 THEN 'sending'
                        WHEN max(q.held) > 0 THEN 'held'
                        WHEN sum(state = 'cached' AND (decision IS NULL
                                 OR json_extract(decision, '$.status') = 'unrouted')) > 0 THEN 'unrouted'
                        WHEN max(q.delivered) > 0 THEN 'delivered'
                        ELSE 'discarded' END AS state
            FROM instances LEFT JOIN queued q ON q.study = instances.study_instance_uid
            GROUP BY study_instance_uid ORDER BY last_received DESC
            """
        )
        return [StudySummary(**dict(row)) for row in rows]


    # ---- forwarding queues ------------------------------------------------------------------

    def requeue_in_flight(self) -> int:
        """At start-up: deliveries a previous run had in flight go back to the queue. The one
        whose request had gone out (``on_wire``, at most one per association) has an unknown
        outcome: it gets an attempt that says so, outcome ``unknown``, and counts it. The rest
        of its claimed batch was never sent: no attempt is recorded or counted for them (a
        restart during a backlog does not use up the retry policy of hundreds of instances),
        but, like it, they are marked as maybe sent (see :class:`Work`) — after a power cut,
        the non-durable records of the latest sends (:meth:`finish`) may be lost with the
        outcomes, so which were sent is not certain."""
        now = self.schedule_now()
        with self.transaction() as conn:
            conn.execute("INSERT INTO attempts (delivery_id, at, outcome, error) SELECT id, ?, 'unknown', ?"
                         " FROM deliveries WHERE state = 'in_flight' AND on_wire", (time.time(), STOPPED_WHILE_SENDING))
            moved = [row[0] for row in conn.execute(
                "SELECT id FROM deliveries WHERE state = 'in_flight' AND moved_to IS NOT NULL")]
            # Every right-hand side reads the row as it was: on_wire before it is cleared.
            requeued = conn.execute(
                "UPDATE deliveries SET state = 'pending', maybe_sent = 1, on_wire = 0, attempts = attempts + on_wire,"
                " last_status = CASE WHEN on_wire THEN NULL ELSE last_status END,"
                " last_error = CASE WHEN on_wire THEN ? ELSE last_error END,"
                " last_failure = CASE WHEN on_wire THEN"
                " (SELECT max(a.id) FROM attempts a WHERE a.delivery_id = deliveries.id) ELSE last_failure END"
                " WHERE state = 'in_flight'", (STOPPED_WHILE_SENDING,)).rowcount
            self._follow_moves(conn, moved, now)
            return requeued

    @staticmethod
    def _follow_moves(conn: sqlite3.Connection, delivery_ids: Sequence[int], now: float) -> None:
        """Deliveries just let go of by their worker: those whose destination was moved while
        they were in flight go where it was moved to (see :data:`_FOLLOW_MOVE`)."""
        conn.executemany(_FOLLOW_MOVE, [{"id": i, "now": now} for i in delivery_ids])
        conn.executemany(_MOVE_DONE, [{"id": i} for i in delivery_ids])

    def release_stable_studies(self, now: float) -> list[tuple[str, str]]:
        """Release every held study whose quiet period has passed by ``now`` (schedule clock);
        returns (study, destination)."""
        with self.transaction() as conn:
            due = conn.execute(
                "SELECT study_instance_uid, destination FROM holds WHERE state = 'waiting' AND release_at <= ?", (now,)
            ).fetchall()
            for study, destination in due:
                conn.execute("UPDATE holds SET state = 'released', released_at = ? WHERE study_instance_uid = ?"
                             " AND destination = ?", (now, study, destination))
                conn.execute("UPDATE deliveries SET state = 'pending', next_attempt_at = ? WHERE state = 'held'"
                             " AND study_instance_uid = ? AND destination = ?", (now, study, destination))
        return [(str(s), str(d)) for s, d in due]

    def next_release(self) -> float | None:
        row = self.query("SELECT min(release_at) FROM holds WHERE state = 'waiting'")[0]
        return None if row[0] is None else float(row[0])

    def claim(self, destination: str, now: float, limit: int, prefer: str | None = None) -> list[Work]:
        """Take, atomically, the due pending deliveries of the study that has waited longest for
        this destination, in arrival order, and mark them in flight. A study that another
        association to the destination has in flight is left to it: a study goes out on one
        association at a time, in order, as the PACS expects to get it (the destination's
        parallel associations carry different studies). ``prefer``: the study this association
        sent last, taken first if it has more, so that a study arriving while it is forwarded
        stays on one association.

        Deferred deliveries (:meth:`postpone`) come after the others, in the choice of the study
        and within it: one the PACS aborts on, or refuses for now, every time must not lead each
        association and hold back what is behind it — nor, with two such, take turns at it.

        Not fsync'd, like :meth:`finish`: a claim lost to a power cut leaves its deliveries
        pending, which is what the start-up makes of in-flight ones anyway."""
        with self.transaction(durable=False) as conn:
            first = None
            if prefer is not None:
                first = conn.execute(
                    "SELECT study_instance_uid FROM deliveries d WHERE destination = ? AND study_instance_uid = ?"
                    f" AND state = 'pending' AND next_attempt_at <= ? AND {_NOT_IN_FLIGHT} LIMIT 1",
                    (destination, prefer, now, destination)).fetchone()
            if first is None:
                first = conn.execute(
                    "SELECT study_instance_uid FROM deliveries d INDEXED BY deliveries_claim"
                    " WHERE destination = ? AND state = 'pending'"
                    f" AND next_attempt_at <= ? AND {_NOT_IN_FLIGHT} ORDER BY deferred, id LIMIT 1",
                    (destination, now, destination),
                ).fetchone()
            if first is None:
                return []
            rows = conn.execute(
                "SELECT d.id AS delivery_id, d.attempts, coalesce(d.requeued_at, d.created_at) AS waiting_since,"
                " i.id AS instance_id, i.sop_instance_uid,"
                " i.sop_class_uid, i.study_instance_uid, i.transfer_syntax, i.path, i.decision, d.edits,"
                " d.maybe_sent"
                " FROM deliveries d INDEXED BY deliveries_study JOIN instances i ON i.id = d.instance_id"
                " WHERE d.destination = ? AND d.study_instance_uid = ? AND d.state = 'pending'"
                " AND d.next_attempt_at <= ? ORDER BY d.deferred, d.id LIMIT ?",
                (destination, first[0], now, limit),
            ).fetchall()
            # The first goes out first; each next one is marked as its request goes (sending, finish).
            conn.executemany("UPDATE deliveries SET state = 'in_flight', on_wire = ? WHERE id = ?",
                             [(int(i == 0), r["delivery_id"]) for i, r in enumerate(rows)])
        return [Work(**{**dict(r), "maybe_sent": bool(r["maybe_sent"])}) for r in rows]

    def sending(self, work: Work) -> None:
        """Its request is going out (see :meth:`requeue_in_flight`). Not fsync'd, as :meth:`claim`."""
        with self.transaction(durable=False) as conn:
            conn.execute(_ON_WIRE, (work.delivery_id,))

    def unclaim(self, works: Sequence[Work]) -> None:
        """Deliveries claimed but not attempted go back to pending, with no attempt counted —
        while each is still this claim of this version (as in :meth:`finish`): a replacement
        that arrived meanwhile has queued the delivery afresh, and another association may
        have claimed it since."""
        now = self.schedule_now()
        with self.transaction() as conn:
            conn.executemany("UPDATE deliveries SET state = 'pending' WHERE id = ? AND state = 'in_flight'"
                             " AND (SELECT path FROM instances WHERE id = ?) = ?",
                             [(w.delivery_id, w.instance_id, w.path) for w in works])
            self._follow_moves(conn, [w.delivery_id for w in works], now)

    def next_due(self, destination: str) -> float | None:
        """When the next pending delivery that :meth:`claim` could take is due (studies in
        flight on another association are not: see there)."""
        # The index's order, to its first row that qualifies (a min() over a filter reads them all).
        rows = self.query(f"SELECT next_attempt_at FROM deliveries d WHERE destination = ? AND state = 'pending'"
                          f" AND {_NOT_IN_FLIGHT} ORDER BY next_attempt_at LIMIT 1", (destination, destination))
        return float(rows[0][0]) if rows else None

    def postpone(self, work: Work, until: float, destination: str | None = None) -> None:
        """Make a delivery back in the queue wait at least until ``until`` (schedule clock), and
        defer it: its own send failed, so the others go first (see :meth:`claim`). Given
        ``destination``, only while it still waits for that one (not once it followed a move)."""
        with self.transaction(durable=False) as conn:
            conn.execute("UPDATE deliveries SET next_attempt_at = max(next_attempt_at, ?), deferred = 1 WHERE id = ?"
                         " AND state = 'pending' AND (? IS NULL OR destination = ?)",
                         (until, work.delivery_id, destination, destination))

    def give_up_waiting(self, destination: str, waiting_since: float, error: str) -> int:
        """Every pending delivery to ``destination`` waiting since before ``waiting_since``
        (schedule clock; as :class:`Work` counts it) becomes a dead letter with ``error``. For a
        destination that has failed for longer than its retry policy lasts: only one instance
        at a time is tried there then, and the others must give up with it, not one per try."""
        with self.transaction() as conn:
            return int(conn.execute(
                "UPDATE deliveries SET state = 'dead', last_status = NULL, last_error = ?, on_wire = 0"
                " WHERE destination = ? AND state = 'pending' AND coalesce(requeued_at, created_at) <= ?",
                (error, destination, waiting_since)).rowcount)

    def make_due(self, destination: str, now: float) -> int:
        """Every pending delivery to ``destination`` due at ``now`` (its address changed)."""
        with self.transaction() as conn:
            return int(conn.execute("UPDATE deliveries SET next_attempt_at = ? WHERE destination = ?"
                                    " AND state = 'pending' AND next_attempt_at > ?",
                                    (now, destination, now)).rowcount)

    def finish(self, work: Work, outcome: str, status: int | None, error: str | None,
               next_attempt_at: float | None = None, transcoded: bool = False, maybe_sent: bool = False,
               following: Work | None = None, offered: bool = True) -> bool:
        """Record one attempt and move its delivery on: ``delivered``, ``dead``, or back to
        pending at ``next_attempt_at`` (outcomes ``retry`` and ``unknown``). An ``unknown``
        outcome (or ``maybe_sent``: one given up on as dead) marks the delivery as maybe sent
        (:class:`Work`).

        Not fsync'd (one per forwarded instance, on the forwarding path's critical path): a
        power cut can only lose the most recent outcomes, and a lost outcome means the instance
        is sent again — a duplicate, never a loss. Nothing is deleted on the strength of an
        outcome until a durable commit (:meth:`mark_evicted`) has synced the WAL that holds it.
        ``next_attempt_at`` is on the schedule clock; the attempt's time is the wall clock's.

        The outcome moves the delivery on only while it is still this claim of this version of
        the instance: a replacement (``node.on_duplicate: replace``) that arrived while the old
        file was on its way has queued the delivery afresh, and the old file's "delivered" must
        not stand for the new one. The attempt is recorded either way. Returns whether the
        outcome was applied.

        ``following``: the delivery whose request goes out next, marked as :meth:`sending` in
        the same commit.

        ``offered``: whether the instance reached the destination at all. A try that opened no
        association (the PACS down, refusing for now) is recorded in the history but is not one
        of the instance's ``attempts``, the count ``retry.max_attempts`` limits."""
        now = time.time()
        scheduled_now = self.schedule_now()
        scheduled = next_attempt_at or scheduled_now
        state = {"delivered": "delivered", "dead": "dead"}.get(outcome, "pending")
        with self.transaction(durable=False) as conn:
            applied = conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + ?, last_status = ?, last_error = ?,"
                " next_attempt_at = ?, delivered_at = ?, transcoded = ?, maybe_sent = max(maybe_sent, ?)"
                " WHERE id = ? AND state = 'in_flight' AND (SELECT path FROM instances WHERE id = ?) = ?",
                (state, int(offered), status, error, scheduled, now if state == "delivered" else None,
                 int(transcoded), int(maybe_sent or outcome == "unknown"), work.delivery_id, work.instance_id,
                 work.path),
            ).rowcount == 1
            # Unless the delivery was cancelled meanwhile (a correction routed elsewhere).
            recorded = conn.execute("INSERT INTO attempts (delivery_id, at, outcome, status, error)"
                                    " SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM deliveries WHERE id = ?)",
                                    (work.delivery_id, now, outcome, status, error, work.delivery_id))
            if outcome != "delivered" and recorded.rowcount == 1:  # applied or not: it failed there
                conn.execute("UPDATE deliveries SET last_failure = ? WHERE id = ?",
                             (recorded.lastrowid, work.delivery_id))
            if following is not None:
                conn.execute(_ON_WIRE, (following.delivery_id,))
            self._follow_moves(conn, [work.delivery_id], scheduled_now)
        return applied

    def waiting_for_others(self, configured: Collection[str]) -> dict[str, int]:
        """Destinations not in ``configured`` with deliveries not yet delivered, and how many."""
        rows = self.query("SELECT destination, count(*) FROM deliveries WHERE state != 'delivered'"
                          " GROUP BY destination")
        return {str(name): int(count) for name, count in rows if name not in configured}

    def move_deliveries(self, old: str, new: str) -> tuple[int, int]:
        """:meth:`move_queue`'s (moved, kept)."""
        moved = self.move_queue(old, new)
        return moved.moved, moved.kept

    def move_queue(self, old: str, new: str) -> MovedQueue:
        """Give ``new`` what waits for ``old`` (a destination renamed or removed in the file):
        its pending, held and dead deliveries start over there, due now (``old``'s backoff and
        attempts were another destination's); a study waiting to be stable for ``old`` waits
        for ``new``. What ``old`` delivered stays its history. An instance ``new`` already has
        a delivery of keeps its ``old`` one, where it was.

        What ``old``'s worker has in flight (still sending the batch it claimed before the file
        was changed) follows once that worker lets go of it undelivered — the PACS interrupting
        the batch, the box stopping — rather than going back to ``old``, where nothing would
        send it (:data:`_FOLLOW_MOVE`); what it delivers stays ``old``'s, and is not sent to
        ``new`` again."""
        now = self.schedule_now()
        waiting = "('pending', 'held', 'dead')"
        with self.transaction() as conn:
            following = conn.execute("UPDATE deliveries SET moved_to = ? WHERE destination = ? AND state = 'in_flight'",
                                     (new, old)).rowcount
            # Following an earlier move of ``new`` itself (renamed twice while a batch goes out).
            conn.execute("UPDATE deliveries SET moved_to = ? WHERE moved_to = ? AND state = 'in_flight'", (new, old))
            moved = conn.execute(
                "UPDATE OR IGNORE deliveries SET destination = :new,"
                " state = CASE WHEN state = 'held' THEN 'held' ELSE 'pending' END, attempts = 0,"
                " next_attempt_at = :now, requeued_at = :now, deferred = 0, maybe_sent = 0, on_wire = 0"
                f" WHERE destination = :old AND state IN {waiting}", {"new": new, "old": old, "now": now}).rowcount
            kept = conn.execute(f"SELECT count(*) FROM deliveries WHERE destination = ? AND state IN {waiting}",
                                (old,)).fetchone()[0]
            conn.execute("UPDATE OR IGNORE holds SET destination = ? WHERE destination = ? AND state = 'waiting'",
                         (new, old))
            conn.execute("DELETE FROM holds WHERE destination = ? AND state = 'waiting'", (old,))
            # Held for a study whose hold there is released already (or was not moved): send now.
            conn.execute("UPDATE deliveries SET state = 'pending' WHERE destination = ? AND state = 'held'"
                         " AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.destination = deliveries.destination"
                         " AND h.study_instance_uid = deliveries.study_instance_uid AND h.state = 'waiting')", (new,))
        return MovedQueue(int(moved), int(kept), int(following))

    def has_deliveries(self, destination: str) -> bool:
        """Whether any delivery (in any state) is to ``destination``."""
        return bool(self.query("SELECT 1 FROM deliveries WHERE destination = ? LIMIT 1", (destination,)))

    def retry_dead(self, destination: str | None) -> int:
        """Dead letters back to pending (all destinations when ``destination`` is None), due now.
        The retry policy starts afresh (``requeued_at``, attempts); when they were queued
        (``created_at``, the age ``appliance queue`` shows) stays."""
        now = self.schedule_now()
        with self.transaction() as conn:
            count = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, requeued_at = ?, next_attempt_at = ?,"
                " deferred = 0 WHERE state = 'dead' AND (? IS NULL OR destination = ?)",
                (now, now, destination, destination),
            ).rowcount
        return int(count)

    def queue_summaries(self, destinations: Sequence[str]) -> list[QueueSummary]:
        """Every configured destination, and any other that still has deliveries."""
        now = self.schedule_now()
        # Counted from an index, never from the rows: a box keeps its deliveries for
        # retention.keep_history_for, hundreds of thousands of them, and the status page asks
        # every few seconds (400,000 deliveries: 250 ms from the rows, 60 ms so).
        counts: dict[str, dict[str, int]] = {}
        for destination, state, count in self.query(
                "SELECT destination, state, count(*) FROM deliveries INDEXED BY deliveries_claim"
                " GROUP BY destination, state"):
            counts.setdefault(destination, {})[state] = int(count)
        transcoded: dict[str, int] = {
            destination: int(count) for destination, count in self.query(
                "SELECT destination, count(*) FROM deliveries INDEXED BY deliveries_transcoded"
                " WHERE transcoded = 1 GROUP BY destination")}
        result = []
        for name in list(destinations) + sorted(set(counts) - set(destinations)):
            states = counts.get(name, {})
            oldest = self.query("SELECT min(created_at) FROM deliveries WHERE destination = ?"
                                " AND state IN ('pending', 'in_flight')", (name,))[0][0] \
                if states.get("pending") or states.get("in_flight") else None
            last_error, last_error_at = self._last_failure(name) if states else (None, None)
            result.append(QueueSummary(
                name=name, pending=states.get("pending", 0), held=states.get("held", 0),
                in_flight=states.get("in_flight", 0), delivered=states.get("delivered", 0),
                dead=states.get("dead", 0), transcoded=transcoded.get(name, 0),
                oldest_pending_age=(now - oldest) if oldest is not None else None,
                last_error=last_error, last_error_at=last_error_at,
            ))
        return result

    def _last_failure(self, destination: str) -> tuple[str | None, float | None]:
        """The error of the latest attempt to ``destination`` that did not deliver, whatever
        became of its delivery since (migration 10: one seek in deliveries_last_failure), and
        when it was made."""
        rows = self.query(
            "SELECT a.status, a.error, a.at FROM attempts a WHERE a.id = (SELECT max(last_failure) FROM deliveries"
            " WHERE destination = ? AND last_failure IS NOT NULL)", (destination,))
        if not rows:
            return None, None
        status, error, at = rows[0]
        return (str(error) if error else f"status 0x{status:04X}" if status is not None else "failed"), float(at)

    def dead_letters(self, limit: int) -> tuple[int, list[sqlite3.Row]]:
        """How many deliveries are dead letters, and the ``limit`` most recent (by their last
        attempt): destination, the instance (patient, study, modality, SOP Instance UID), how
        many attempts, and the last one's time, status and error."""
        total = int(self.query("SELECT count(*) FROM deliveries WHERE state = 'dead'")[0][0])
        rows = self.query(
            "SELECT d.destination, d.attempts, i.patient_name, i.patient_id, i.study_date, i.modality,"
            " i.study_instance_uid, i.sop_instance_uid, a.at, coalesce(a.status, d.last_status) AS status,"
            " coalesce(a.error, d.last_error) AS error"
            " FROM deliveries d JOIN instances i ON i.id = d.instance_id"
            " LEFT JOIN attempts a ON a.id = d.last_failure"
            " WHERE d.state = 'dead' ORDER BY a.at DESC, d.id DESC LIMIT ?", (limit,))
        return total, rows

    def holds(self) -> list[sqlite3.Row]:
        """Stable-study holds; ``release_at`` is on the schedule clock. A waiting one also has
        its study's patient and how many of its instances it holds (``held``): what a
        technician recognises it by."""
        return self.query(
            "SELECT study_instance_uid, destination, release_at, state,"
            " CASE WHEN state = 'waiting' THEN (SELECT max(patient_name) FROM instances i"
            "  WHERE i.study_instance_uid = h.study_instance_uid) END AS patient_name,"
            " CASE WHEN state = 'waiting' THEN (SELECT max(patient_id) FROM instances i"
            "  WHERE i.study_instance_uid = h.study_instance_uid) END AS patient_id,"
            " CASE WHEN state = 'waiting' THEN (SELECT count(*) FROM deliveries d WHERE d.destination = h.destination"
            "  AND d.study_instance_uid = h.study_instance_uid AND d.state = 'held') END AS held"
            " FROM holds h ORDER BY state DESC, release_at")

    def count_unrouted(self) -> int:
        return int(self.query(
            "SELECT count(*) FROM instances i WHERE state = 'cached' AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.instance_id = i.id)"
            " AND (decision IS NULL OR json_extract(decision, '$.status') = 'unrouted')")[0][0])

    # ---- cache retention ----------------------------------------------------------------------

    def evictable(self, delivered_before: float | None, limit: int = 500) -> list[tuple[int, str]]:
        """Cached instances whose every delivery is confirmed (or that a rule discarded), done
        before ``delivered_before`` (None: whenever — above the high watermark, where a wall
        clock set back must not hold eviction up); oldest first. Unrouted and undelivered ones
        never appear."""
        # done_at (migration 4) picks the candidates from its index; the NOT EXISTS checks each
        # one again against its deliveries, so that nothing owed is removed even if done_at
        # were ever wrong.
        rows = self.query(
            """
            SELECT i.id, i.path FROM instances i
            WHERE i.state = 'cached' AND i.done_at IS NOT NULL AND i.done_at < ?
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id = i.id AND d.state != 'delivered')
            ORDER BY i.done_at
            LIMIT ?
            """, (math.inf if delivered_before is None else delivered_before, limit))
        return [(int(r[0]), str(r[1])) for r in rows]

    def prune_history(self, done_before: float, released_before: float, limit: int = 500) -> int:
        """Forget up to ``limit`` evicted instances done with before ``done_before`` (wall
        clock), with their deliveries and attempts; repeated receptions older than that; and
        stable-study holds released before ``released_before`` (schedule clock) — a late
        instance of such a study is held and released again, like a new study. Returns how
        many instances were forgotten: ``limit`` means there may be more.

        Not fsync'd: a power cut can only bring back records that the next pass removes again.
        Nothing here points at a file (an evicted instance's file is gone already)."""
        with self.transaction(durable=False) as conn:
            ids = [row[0] for row in conn.execute(
                "SELECT id FROM instances WHERE state = 'evicted' AND done_at < ? ORDER BY done_at LIMIT ?",
                (done_before, limit))]
            if ids:
                marks = ", ".join("?" for _ in ids)
                conn.execute("DELETE FROM attempts WHERE delivery_id IN"
                             f" (SELECT id FROM deliveries WHERE instance_id IN ({marks}))", ids)
                conn.execute(f"DELETE FROM deliveries WHERE instance_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM instances WHERE id IN ({marks})", ids)
            conn.execute("DELETE FROM receptions WHERE id IN (SELECT id FROM receptions WHERE at < ? ORDER BY at"
                         " LIMIT ?)", (done_before, limit))
            conn.execute("DELETE FROM holds WHERE state = 'released' AND released_at < ?", (released_before,))
        return len(ids)

    def mark_evicted(self, instance_id: int, path: str) -> bool:
        """True when the row still points at ``path`` and still owes nothing (a replacement that
        arrived since :meth:`evictable` has a new path and new deliveries, and must stay)."""
        with self.transaction() as conn:
            return conn.execute(
                "UPDATE instances SET state = 'evicted' WHERE id = ? AND path = ? AND state = 'cached'"
                " AND done_at IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.instance_id = instances.id AND d.state != 'delivered')",
                (instance_id, path)).rowcount == 1


# Free space under which a failure to open the database is taken for a full disk.
_NEARLY_FULL = 4 << 20


def _disk_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL


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
        -- Size and SHA-256 of the PostScript as rendered: what the printer must receive.
        ps_size INTEGER NOT NULL DEFAULT 0,
        ps_sha256 TEXT NOT NULL DEFAULT '',
        preview_path TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        printed_at REAL,
        -- When it was queued (or requeued by hand), on the schedule clock: what give_up_after counts from.
        waiting_since REAL NOT NULL DEFAULT 0
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
    ps_size: int
    ps_sha256: str
    preview_path: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    printed_at: float | None
    waiting_since: float


_PRINT_JOB_COLUMNS = ", ".join(PrintJob.__dataclass_fields__)


def ensure_print_schema(db: Database) -> None:
    with db.transaction() as conn:
        for statement in PRINT_JOBS_DDL:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(print_jobs)")}
        if "waiting_since" not in columns:  # a table made before the column was
            conn.execute("ALTER TABLE print_jobs ADD COLUMN waiting_since REAL NOT NULL DEFAULT 0")


def insert_print_job(db: Database, printer: str, called_ae: str, calling_ae: str, level: str,
                     film_box_uids: Sequence[str], copies: int, priority: str, title: str) -> int:
    now, scheduled = time.time(), db.schedule_now()
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO print_jobs (printer, called_ae, calling_ae, level, film_box_uids, copies, priority,"
            " title, state, created_at, updated_at, waiting_since)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'rendering', ?, ?, ?)",
            (printer, called_ae, calling_ae, level, "\\".join(film_box_uids), copies, priority, title, now, now,
             scheduled),
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
    """Take the next job of these printers due by ``now`` (schedule clock; HIGH before MED
    before LOW, then oldest) and mark it sending, atomically."""
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
        conn.execute("UPDATE print_jobs SET state = 'sending', updated_at = ? WHERE id = ?", (time.time(), row["id"]))
    return PrintJob(**{**dict(row), "state": "sending"})


def get_print_job(db: Database, job_id: int) -> PrintJob | None:
    rows = db.query(f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs WHERE id = ?", (job_id,))
    return PrintJob(**dict(rows[0])) if rows else None


def print_jobs_in_state(db: Database, state: str) -> list[PrintJob]:
    rows = db.query(f"SELECT {_PRINT_JOB_COLUMNS} FROM print_jobs WHERE state = ? ORDER BY id", (state,))
    return [PrintJob(**dict(row)) for row in rows]


def print_job_counts(db: Database) -> dict[str, int]:
    """How many print jobs are in each state, all of them (a listing shows only the newest)."""
    return {row[0]: row[1] for row in db.query("SELECT state, count(*) FROM print_jobs GROUP BY state")}


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
        " AND (preview_path IS NOT NULL OR ps_path IS NOT NULL)", (before,),
    )
    return [PrintJob(**dict(row)) for row in rows]
