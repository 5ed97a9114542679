"""Forwarding: Storage SCU workers that empty each destination's queue into its PACS, and the
scheduler that releases stable studies and evicts delivered instances from the cache.

Each destination has its own workers (``max_associations`` of them), so a destination that is
down or slow holds up nothing else; intake only ever writes rows (and nudges the workers,
``wakeup.py``). A worker claims the due deliveries of one study (in arrival order), sends them
on one association — kept open and reused while work keeps coming and the needed presentation
contexts were proposed — and records every attempt. Files are streamed from the cache, unless
the copy must differ: tag edits from the routing decision, or a destination that does not
accept the instance's transfer syntax (then it is decompressed to Explicit VR Little Endian).
Cached files sent as they are go back to back (``hotpath.StoreChain``: as each response
arrives, the DUL thread sends the next request but for its last byte, records the delivery,
then sends that byte); the others one by one.

Outcomes (see ``statuses.store_outcome``): success and warnings are delivered; 0xA7xx,
refused or lost connections, transient rejections and timeouts are retried with the
destination's backoff; other failures and permanent rejections are dead letters, which
``appliance retry`` puts back. A failed association charges only the instance that would have
gone first (one attempt, or one dead letter, per try); one the PACS rejects for want of a
spare association, while another of ours is open, charges nothing. A C-STORE with no response
is "delivery unknown": it is retried on a fresh association, never counted as delivered; a PACS
that then refuses it as a duplicate (0x0111) has it from that attempt, and it counts as delivered.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context

from . import clock, hotpath, outgoing, rules, statuses, wakeup
from .config import Config, Destination, Disk, Retry
from .db import Database, Work
from .dicomnet import (
    TellingTLSSocket,
    application_entity,
    rejection,
    throttle_sends,
    tune_socket,
    why_not_associated,
)
from .pdata import StoreReceiver
from .store import Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The scheduler's key among the threads: no destination's worker has a negative index (a
# destination may well be named "scheduler").
_SCHEDULER = ("scheduler", -1)

BATCH = 200  # deliveries claimed at once (one study); the association outlives the batch
IDLE_RELEASE = 5.0  # seconds an association stays open without work
# Seconds between looks at the queue. Intake runs in another process and writes only to the
# database; it nudges the forwarder when it queued work (wakeup.py), and this finds what a lost
# nudge would miss, and retries coming due. An indexed read, cheap enough at this rate.
POLL = 0.1
# Dead letters with the same reason are counted for this long after the first is named (_DeadLetterLines).
DEAD_LETTER_SUMMARY_AFTER = 60.0
CACHE_CHECK = 10.0  # seconds between looks at the disk's high watermark (an indexed query)
CACHE_SCAN_MAX = 300.0  # the longest between history prunes, and between watermark warnings
PRUNE_BATCH, PRUNE_MAX = 500, 20_000  # evicted instances forgotten per transaction, and per pass
MAX_CONTEXTS = 120  # pynetdicom (and the standard) allow 128 presentation contexts per association

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Failures to make an instance's edited copy that pass with time: the instance is retried, not
# made a dead letter (which would wait for an admin's `appliance retry`).
_OUT_OF_RESOURCES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class _Stopping(Exception):
    """The forwarder is stopping while a worker waits for room to record its work."""


class AssociationFailed(Exception):
    """No association, and which kind of failure it was (what :meth:`Forwarder._association_failed`
    makes of it): the PACS unreachable or refusing for now (``TRANSIENT``), rejecting us for
    good (``PERMANENT``: a configuration error, most likely), without an association to spare
    (``BUSY``: congestion, or its limit reached), or taking none of the instances' SOP classes
    (``UNSUPPORTED``)."""

    TRANSIENT, PERMANENT, BUSY, UNSUPPORTED = "transient", "permanent", "busy", "unsupported"

    def __init__(self, message: str, kind: str = TRANSIENT) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Link:
    """A worker's open association and what it proposed."""

    assoc: Association
    destination: str
    endpoint: tuple[object, ...]  # what it was opened with (_endpoint): a reload may change it
    proposed: set[tuple[str, str]]
    last_used: float
    opened: float
    delivered: int = 0
    failed: int = 0
    message_id: int = 0  # of the last C-STORE-RQ sent
    direct: bool = False  # responses decoded by the DUL thread (pdata): C-STOREs can be chained
    _contexts: dict[str, list[PresentationContext]] = field(default_factory=dict)

    def contexts_for(self, sop_class: str) -> list[PresentationContext]:
        """The accepted contexts we can send this SOP class on (looked up once per association)."""
        contexts = self._contexts.get(sop_class)
        if contexts is None:
            contexts = self._contexts[sop_class] = [cx for cx in self.assoc.accepted_contexts
                                                    if cx.abstract_syntax == sop_class and cx.as_scu]
        return contexts

    def next_message_id(self) -> int:
        """The Message ID of the next C-STORE-RQ (1 to 65535, then round again)."""
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    def context_id_for(self, work: Work) -> int | None:
        """The accepted context that carries the instance in its own transfer syntax, if any."""
        for cx in self.contexts_for(work.sop_class_uid):
            if cx.transfer_syntax[0] == work.transfer_syntax and cx.context_id is not None:
                return int(cx.context_id)
        return None


def _endpoint(destination: Destination, config: Config) -> tuple[object, ...]:
    """Everything an association to ``destination`` is opened with: when a reload changes any
    of it, the associations open to the old one are closed (between batches) and new work
    goes to the new one."""
    return (destination.ae_title, destination.host, destination.port, destination.calling_ae or config.node.ae_title,
            destination.timeouts, destination.tls)


def backoff(policy: Retry, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: initial × factor^(attempts-1), capped, ± jitter
    (so that boxes coming back after one outage do not all call at the same moment)."""
    delay = min(policy.max_delay, policy.initial_delay * policy.factor ** max(0, attempts - 1))
    return max(0.0, delay * random.uniform(1 - policy.jitter, 1 + policy.jitter))


class _DeadLetterLines:
    """The journal's lines for dead letters. A PACS that refuses a SOP class, or the studies
    of a modality, refuses each instance alike, and streams of them come as fast as they are
    sent: one ERROR line each buried the journal (a 500-slice study, 500 lines). The first dead
    letter of a destination and a reason is named; the others with the same reason in the next
    :data:`DEAD_LETTER_SUMMARY_AFTER` seconds are counted, and the count said in one line then
    (:meth:`flush`, from the scheduler's loop, and at stop). ``appliance queue --dead`` lists
    every one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], list[float]] = {}  # (destination, error): [since, how many more]

    def say(self, name: str, sop_instance_uid: str, error: str) -> None:
        with self._lock:
            counting = self._open.get((name, error))
            if counting is not None:
                counting[1] += 1
            else:
                self._open[(name, error)] = [time.monotonic(), 0]
        if counting is not None:
            log.debug("dead letter %s for %s: %s", sop_instance_uid, name, error)
        else:
            log.error("dead letter %s for %s: %s", sop_instance_uid, name, error)

    def flush(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(key, int(more)) for key, (since, more) in self._open.items()
                   if everything or now - since >= DEAD_LETTER_SUMMARY_AFTER]
            for key, _ in due:
                del self._open[key]
        for (name, error), more in due:
            if more:
                log.error("%d more dead letter(s) for %s, for the same reason: %s (`appliance queue --dead` lists"
                          " them)", more, name, error)


class Forwarder:
    """All destinations' workers, and the scheduler. ``config`` may be replaced on reload:
    workers read it before each batch, new destinations get workers."""

    def __init__(self, config: Config, db: Database, store: Store) -> None:
        self.config = config
        self.db = db
        self.store = store
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: dict[tuple[str, int], threading.Thread] = {}
        self._blocked_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        # Which workers hold an open association (see _association_failed), and each worker's own
        # state: its index, and the wait a PACS without an association to spare gave it.
        self._linked: dict[tuple[str, int], bool] = {}
        self._worker = threading.local()
        self._said_busy: set[str] = set()
        self._lock = threading.Lock()
        self._listener = wakeup.Listener(config.storage.root, self.wake)  # intake's "work queued"
        self.failure: str | None = None  # set when a worker or the scheduler failed (see _guard)
        self._watermark_warned_at: float | None = None  # monotonic; above the watermark, nothing to evict
        self._dead_letter_lines = _DeadLetterLines()

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        # Stream cached files to the socket instead of decoding them (flat memory, no re-encode).
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.store.keep_reserve(self.config.storage.disk.min_free)
        try:
            requeued = self.db.requeue_in_flight()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            requeued = self.db.requeue_in_flight()  # the full disk's reserve is gone: room for this
        if requeued:
            log.warning("%d deliveries were in flight when the appliance stopped; sending them again", requeued)
        self._listener.start()
        self._spawn(_SCHEDULER, "forward-scheduler", self._schedule)
        self.apply(self.config)

    def apply(self, config: Config) -> None:
        """Take a (re)loaded configuration: workers for new destinations; the rest adapt.

        A destination whose address (or AE title, TLS, ...) changed is tried again at once: the
        backoff it was waiting out was the old address's, and an admin who has just corrected
        a wrong port should not wait up to ``max_delay`` to see whether it works."""
        previous, self.config = self.config, config
        for name, destination in config.destinations.items():
            before = previous.destinations.get(name)
            if before is None or _endpoint(before, previous) == _endpoint(destination, config):
                continue
            self._blocked_until.pop(name, None)
            self._failures.pop(name, None)
            due = self.db.make_due(name, self.db.schedule_now())
            log.info("destination %s now %s@%s:%d: %d waiting instance(s) are tried now", name,
                     destination.ae_title, destination.host, destination.port, due)
        with self._lock:  # a worker that stops looks at the configuration under it (_work)
            for name, destination in config.destinations.items():
                for index in range(destination.max_associations):
                    worker = self._threads.get((name, index))
                    if worker is None or not worker.is_alive():  # new, or removed earlier and now back
                        self._spawn((name, index), f"forward-{name}-{index}", self._work, name, index)
        # A destination removed or renamed in the file leaves its queue behind, kept for it: say
        # so where the admin looks after a reload, not only in `appliance queue`.
        for name, waiting in self.db.waiting_for_others(config.destinations).items():
            log.warning("destination %s is no longer configured: %d instance(s) not delivered there wait for it,"
                        " and go out once it is configured again under that name (or `appliance move %s NEW`)",
                        name, waiting, name)
        self.wake()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._listener.stop()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.1, deadline - time.monotonic()))
        self._dead_letter_lines.flush(everything=True)

    def wake(self) -> None:
        """New work may be queued (after a release of stable studies, a reload, a stop)."""
        with self._wake:
            self._wake.notify_all()

    def _spawn(self, key: tuple[str, int], thread_name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=self._guard, args=(target, *args), name=thread_name, daemon=True)
        self._threads[key] = thread
        thread.start()

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        """Run a worker or the scheduler. If one fails where nothing expected it (the database
        refusing a write, a bug), say so in :attr:`failure`: the service's process then exits
        and is started again, which puts the deliveries it had in flight back in the queue —
        rather than one destination's forwarding, or the cache's eviction, silently stopping."""
        try:
            target(*args)
        except Exception as exc:  # noqa: BLE001 - anything: the process restarts to recover
            log.exception("%s failed", threading.current_thread().name)
            self.failure = f"{threading.current_thread().name} failed: {exc}"

    def _sleep(self, seconds: float) -> None:
        with self._wake:
            if not self._stop.is_set():
                self._wake.wait(max(0.01, seconds))

    # ---- scheduler: stable studies and cache retention --------------------------------------

    def _schedule(self) -> None:
        last_eviction = last_pruned = last_seen = 0.0
        while not self._stop.is_set():
            try:
                now = self.db.schedule_now()
                if now - last_seen >= clock.SEEN_EVERY:
                    last_seen = now
                    self.db.schedule_seen()
                next_release = self.db.next_release()
                if next_release is not None and next_release <= now:
                    released = self.db.release_stable_studies(now)
                    for study, destination in released:
                        log.info("study %s is stable: released to %s", study, destination)
                    if released:
                        self.wake()
                if now - last_eviction >= CACHE_CHECK:
                    last_eviction = now
                    try:
                        self.evict(time.time())
                        self.store.keep_reserve(self.config.storage.disk.min_free)
                    except OSError as exc:
                        log.error("cache eviction failed: %s", exc)
                keep_history_for = self.config.retention.keep_history_for
                if now - last_pruned >= min(CACHE_SCAN_MAX, max(CACHE_CHECK, keep_history_for / 100)):
                    last_pruned = now
                    self.prune_history(time.time() - keep_history_for, now - keep_history_for)
                next_release = self.db.next_release()
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                # Any write of the round (an eviction, the history, a release): the failed write
                # has removed the reserve (Database.transaction), so the next round has room to
                # evict, rather than the process ending and starting over on the same full disk.
                log.error("the disk is full (%s): the scheduler tries again in %.0f s", exc, CACHE_CHECK)
                self._sleep(CACHE_CHECK)
                continue
            self._dead_letter_lines.flush()
            self._sleep(min(POLL, max(0.01, next_release - self.db.schedule_now())) if next_release else POLL)

    def evict(self, now: float) -> int:
        """Remove delivered instances past ``retention.keep_delivered_for``; above the high
        watermark, delivered ones oldest first whatever their age. Never anything undelivered.
        ``now`` is the wall clock's, like the delivery times it is compared with. Returns how
        many were removed.

        Above the watermark with nothing left that may be evicted (a destination down for
        days), it says so at most once every few minutes (a disk hovering at the watermark
        would otherwise say it every other look), but it looks every time: what is delivered
        meanwhile is evicted at once, not minutes later while intake is near refusing."""
        removed = 0
        keep_for = self.config.retention.keep_delivered_for
        for instance_id, path in self.db.evictable(now - keep_for):
            if self.db.mark_evicted(instance_id, path):
                self.store.discard(Path(path))
                removed += 1
        disk = self.config.storage.disk
        while True:
            usage = self.store.usage()
            limit = eviction_limit(disk, usage.total)
            if usage.used <= limit:
                break
            batch = self.db.evictable(None, limit=50)
            if not batch:
                warned = self._watermark_warned_at
                if warned is None or time.monotonic() - warned >= CACHE_SCAN_MAX:
                    self._watermark_warned_at = time.monotonic()
                    log.warning("disk usage %.0f%% is above %s and nothing delivered is left to evict",
                                100 * usage.used / usage.total, _described_limit(disk, usage.total))
                break
            for instance_id, path in batch:
                if self.db.mark_evicted(instance_id, path):
                    self.store.discard(Path(path))
                    removed += 1
        if removed:
            log.info("evicted %d delivered instance(s) from the cache", removed)
        return removed

    def prune_history(self, done_before: float, released_before: float) -> int:
        """Forget evicted instances done with before ``done_before`` (wall clock), in batches
        that each hold the database only briefly (the workers record their outcomes on it);
        at most :data:`PRUNE_MAX` a pass, so a box upgraded with years of history catches up
        over a few passes. Returns how many were forgotten."""
        forgotten = 0
        while forgotten < PRUNE_MAX and not self._stop.is_set():
            batch = self.db.prune_history(done_before, released_before, PRUNE_BATCH)
            forgotten += batch
            if batch < PRUNE_BATCH:
                break
        if forgotten:
            log.info("forgot the records of %d evicted instance(s) past retention.keep_history_for", forgotten)
        return forgotten

    # ---- workers --------------------------------------------------------------------------------

    def _work(self, name: str, index: int) -> None:
        """Worker ``index`` of destination ``name``, while it is configured. One that stops
        (its destination removed by a reload, or fewer ``max_associations``) first closes its
        association, which can take up to the ACSE timeout (a PACS slow to answer A-RELEASE):
        a reload that puts it back meanwhile finds it alive and starts no other. So it looks
        again, under the lock :meth:`apply` takes the configuration with, before it ends:
        configured again, it goes on; otherwise it leaves its slot, and the next reload that
        configures it starts a worker there."""
        while True:
            try:
                self._serve(name, index)
            except _Stopping:  # waiting for room to record its work (_persist): the start-up requeues it
                return
            with self._lock:
                if self._stop.is_set() or not self._configured(name, index):
                    if self._threads.get((name, index)) is threading.current_thread():
                        del self._threads[(name, index)]
                    return
            log.info("destination %s worker %d goes on: configured again", name, index)

    def _persist(self, write: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        """A worker's write to the database (a claim, an outcome, a batch put back). On a full
        disk (SQLITE_FULL) the write is rolled back and has given up the database's reserve
        (Database.transaction), and the scheduler evicts what it may: the worker waits and
        writes again, keeping what it holds (its claimed batch, an outcome it knows, its
        association), as the scheduler does — rather than failing, which ended the whole
        forwarder and started it over on the same full disk: every destination's associations
        aborted, and the instance being prepared charged as "stopped while sending it" though
        never sent. Told to stop meanwhile, it leaves its batch in flight, for the start-up to
        put back (:meth:`Database.requeue_in_flight`)."""
        waits = 0
        while True:
            try:
                result = write(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                if self._stop.is_set():
                    raise _Stopping from exc
                delay = min(CACHE_CHECK, 2.0 ** waits)
                (log.debug if waits else log.error)("%s: the disk is full (%s): waiting for room to record its work,"
                                                    " trying again in %.0f s", threading.current_thread().name,
                                                    exc, delay)
                waits += 1
                self._sleep(delay)
                continue
            if waits:
                log.warning("%s: room again on the disk: its work is recorded, it goes on",
                            threading.current_thread().name)
            return result

    def _configured(self, name: str, index: int) -> bool:
        destination = self.config.destinations.get(name)
        return destination is not None and index < destination.max_associations

    def _serve(self, name: str, index: int) -> None:
        link: _Link | None = None
        last_study: str | None = None
        self._worker.index, self._worker.busy_until, self._worker.busy_tries = index, 0.0, 0
        try:
            while not self._stop.is_set():
                self._linked[(name, index)] = link is not None
                destination = self.config.destinations.get(name)
                if destination is None or index >= destination.max_associations:
                    log.info("destination %s worker %d stops: no longer configured", name, index)
                    return
                now = self.db.schedule_now()
                blocked = max(self._blocked_until.get(name, 0.0),
                              now + self._worker.busy_until - time.monotonic())
                if now < blocked:
                    link = self._close(link)
                    self._sleep(blocked - now)
                    continue
                # Look before claiming: an idle worker should not take the write lock every poll.
                due = self.db.next_due(name)
                # With parallel associations, each keeps to the study it is sending (see claim);
                # with one, the study that has waited longest goes next, whatever was sent before.
                prefer = last_study if destination.max_associations > 1 else None
                # After a failure, the next association is tried with one instance: a PACS still
                # down costs one attempt record, not one for each of a backlog's instances, and one
                # that refuses us for good makes one dead letter, not a batch of them. Once it
                # takes that one, the rest follow on the same association.
                limit = 1 if self._failures.get(name) else BATCH
                batch = self._persist(self.db.claim, name, now, limit, prefer) if due is not None and due <= now else []
                if not batch:
                    if link is not None and time.monotonic() - link.last_used > IDLE_RELEASE:
                        link = self._close(link)
                    self._sleep(min(POLL, due - now) if due is not None and due > now else POLL)
                    continue
                link = self._send_batch(name, destination, batch, link)
                last_study = batch[0].study_instance_uid
        finally:
            self._linked.pop((name, index), None)
            self._close(link)

    @staticmethod
    def _close(link: _Link | None) -> None:
        if link is None:
            return None
        if link.assoc.is_established:
            link.assoc.release()
        log.info("association to %s closed after %.1f s: %d delivered, %d not", link.destination,
                 time.monotonic() - link.opened, link.delivered, link.failed)
        return None

    def _send_batch(self, name: str, destination: Destination, batch: list[Work], link: _Link | None) -> _Link | None:
        started = time.monotonic()
        batch, wanted = self._fitting(batch)
        endpoint = _endpoint(destination, self.config)
        if link is not None and link.endpoint != endpoint:
            log.info("destination %s was reconfigured: closing the association to the old settings", name)
            link = self._close(link)
        if link is not None and (not link.assoc.is_established or not wanted <= link.proposed):
            link = self._close(link)
        if link is None:
            try:
                link = self._associate(destination, wanted, {(w.sop_class_uid, w.transfer_syntax) for w in batch})
            except AssociationFailed as exc:
                self._association_failed(name, destination, batch, exc)
                return None
            self._worker.busy_tries = 0
            self._linked[(name, self._worker.index)] = True
        counts = {"delivered": 0, "retry": 0, "dead": 0, "unknown": 0, "replaced": 0}
        position = 0
        interrupted = False
        while position < len(batch):
            if self._stop.is_set():
                self._persist(self.db.unclaim, batch[position:])
                interrupted = True
                break
            if position and not link.assoc.is_established:
                # Gone between two instances (the peer ended it while a record waited for room
                # on a full disk): what was not sent goes back, and nothing is charged for it.
                self._persist(self.db.unclaim, batch[position:])
                link = self._close(link)
                interrupted = True
                break
            if position:  # the claim marked the first; a chain marks its next ones as they go
                self._persist(self.db.sending, batch[position])
            run = self._chainable(name, link, batch, position)
            if len(run) > 1:
                delivered, chained = self._send_chain(name, destination, link, run)
                counts["delivered"] += delivered
                link.delivered += delivered
                position += delivered
                if chained is None:  # all sent, or the chain stopped before the next one
                    continue
                outcome = chained
            else:
                outcome = self._send_one(name, destination, link, batch[position])
            counts[outcome] += 1
            if outcome == "delivered":
                link.delivered += 1
            else:
                link.failed += 1
            if outcome in ("retry", "unknown") or not link.assoc.is_established:
                # The peer is refusing or the link is gone: the rest waits for the backoff.
                rest = batch[position + 1:]
                if rest:
                    self._persist(self.db.unclaim, rest)
                link = self._close(link)
                if outcome in ("retry", "unknown"):
                    self._failures[name] = self._failures.get(name, 0) + 1
                    delay = backoff(destination.retry, self._failures[name])
                    blocked_until = self.db.schedule_now() + delay
                    self._blocked_until[name] = blocked_until
                    log.warning("%s: %s not delivered (%s); trying %s again in %.0f s, the other waiting"
                                " instances first", name, batch[position].sop_instance_uid,
                                "no response" if outcome == "unknown" else "refused for now", name, delay)
                    # Its own backoff grows with the destination's, and it is deferred (see
                    # Database.claim): were it due and first when the block ends, it would lead
                    # the next association again, and one instance that the PACS aborts on would
                    # hold back everything behind it for days.
                    self._persist(self.db.postpone, batch[position], blocked_until + destination.retry.initial_delay,
                                  name)
                    self._give_up_waiting(name, destination, batch[position].sop_instance_uid + ": "
                                          + ("no response" if outcome == "unknown" else "refused for now"))
                interrupted = True
                break
            position += 1
        if not interrupted:
            if self._failures.get(name):
                # The journal's "unreachable" warnings end with this line, for whoever reads it
                # to see when the outage ended.
                log.warning("%s reachable again after %d failed tr%s: what waits for it goes out now", name,
                            self._failures[name], "y" if self._failures[name] == 1 else "ies")
            self._failures[name] = 0
        if link is not None:
            link.last_used = time.monotonic()
        log.debug("%s: %d delivered, %d to retry, %d dead, %d unknown of study %s in %.2f s", name,
                  counts["delivered"], counts["retry"], counts["dead"], counts["unknown"],
                  batch[0].study_instance_uid, time.monotonic() - started)
        return link

    def _association_failed(self, name: str, destination: Destination, batch: Sequence[Work],
                            exc: AssociationFailed) -> None:
        """No association for ``batch`` (claimed, one study). Only its first instance is charged
        — the one that would have gone first: a PACS that is down, or that refuses us for good
        (DCMTK-based ones answer "permanent" to any refusal, a maintenance window included),
        costs one attempt or one dead letter per try, never a whole study or a backlog; the
        rest go back to the queue, and the destination waits its backoff."""
        error = str(exc)
        if exc.kind == AssociationFailed.UNSUPPORTED:
            # It answered, and takes none of these SOP classes (in any syntax we can send): a
            # dead letter each, as when it refuses one class on an association it accepts
            # (_send_one). Not a failure of the destination: what it does take goes on at once.
            self._failures[name] = 0
            for work in batch:
                self._dead(name, work, None, error, offered=False)
            return
        if exc.kind == AssociationFailed.BUSY and self._others_linked(name):
            # Another of our associations to it is open: it takes fewer at once than
            # max_associations. That one goes on; this worker waits, and nothing is charged.
            self._persist(self.db.unclaim, batch)
            self._worker.busy_tries += 1
            delay = backoff(destination.retry, self._worker.busy_tries)
            self._worker.busy_until = time.monotonic() + delay
            say = log.debug if name in self._said_busy else log.warning
            self._said_busy.add(name)
            say("%s has no association to spare beside ours (%s): it takes fewer at once than max_associations"
                " (%d); the open one goes on, another is tried in %.0f s", name, error,
                destination.max_associations, delay)
            return
        failures = self._failures[name] = self._failures.get(name, 0) + 1
        delay = backoff(destination.retry, failures)
        blocked_until = self._blocked_until[name] = self.db.schedule_now() + delay
        first, rest = batch[0], batch[1:]
        if rest:
            self._persist(self.db.unclaim, rest)
        if exc.kind == AssociationFailed.PERMANENT:
            log.error("%s refused for good (%s): %s to the dead letters; the next instance is tried in %.0f s,"
                      " and `appliance retry %s` puts the dead letters back once the refusal is fixed",
                      name, error, first.sop_instance_uid, delay, name)
            self._persist(self.db.finish, first, "dead", None, error, offered=False)
            return
        log.warning("%s unreachable (%s): retrying in %.0f s (%d instance(s) waiting in this study)",
                    name, error, delay, len(batch))
        self._retry_or_give_up(name, destination, first, "retry", None, error, blocked_until, offered=False)
        self._give_up_waiting(name, destination, error)

    def _others_linked(self, name: str) -> bool:
        """Whether another worker of this destination holds an open association."""
        me = getattr(self._worker, "index", None)
        return any(open_ and index != me for (other, index), open_ in list(self._linked.items()) if other == name)

    def _give_up_waiting(self, name: str, destination: Destination, error: str) -> None:
        """The destination failed again: what has waited for it longer than its retry policy's
        give_up_after becomes a dead letter now, all of it, not only what this try carried."""
        policy = destination.retry
        given_up = self._persist(self.db.give_up_waiting, name, self.db.schedule_now() - policy.give_up_after,
                                 f"gave up after waiting {_duration(policy.give_up_after)}"
                                 f" (retry.give_up_after): {error}")
        if given_up:
            log.error("%s: %d instance(s) waited longer than retry.give_up_after (%s) and are now dead letters"
                      " (`appliance retry %s` puts them back): %s", name, given_up,
                      _duration(policy.give_up_after), name, error)

    def _missing(self, name: str, work: Work, exc: OSError) -> str:
        """The claimed file is gone. A new version of the instance that arrived meanwhile
        (``node.on_duplicate: replace``) removes the old file and has queued the delivery
        afresh, for its own file: nothing to record. Otherwise the cache lost it: a dead letter."""
        current = self.db.find_instance(work.sop_instance_uid)
        if current is not None and current.path != work.path:
            log.info("%s: %s was replaced by a new version while being sent; the new one is queued",
                     name, work.sop_instance_uid)
            return "replaced"
        return self._dead(name, work, None, f"cached file is missing: {exc}")

    def _dead(self, name: str, work: Work, status: int | None, error: str, maybe_sent: bool = False,
              offered: bool = True) -> str:
        self._dead_letter_lines.say(name, work.sop_instance_uid, error)
        self._persist(self.db.finish, work, "dead", status, error, maybe_sent=maybe_sent, offered=offered)
        return "dead"

    def _retry_or_give_up(self, name: str, destination: Destination, work: Work, outcome: str, status: int | None,
                          error: str, next_attempt_at: float | None = None, offered: bool = True) -> str:
        """Back to the queue after the backoff (or at ``next_attempt_at``), unless the retry
        policy gives up: then a dead letter.

        ``offered=False``: the instance never reached the PACS (no association was opened, or
        the box could not make its copy). The try is recorded but is not one of its attempts:
        ``max_attempts`` gives up on an instance the PACS fails on, while an outage is bounded
        by ``give_up_after`` alone. (Counted, a link down for a day with ``max_attempts`` set
        made a dead letter of the instance at the front every ``max_attempts`` tries, one after
        another, each a hole in a study at the PACS.)"""
        policy = destination.retry
        attempts = work.attempts + int(offered)
        # Both on the schedule clock: a step of the wall clock, or days switched off, do not age it.
        expired = self.db.schedule_now() - work.waiting_since >= policy.give_up_after
        if (offered and policy.max_attempts and attempts >= policy.max_attempts) or expired:
            given_up = f"gave up after {attempts} attempts" if not expired else \
                f"gave up after waiting {_duration(policy.give_up_after)} (retry.give_up_after), {attempts} attempts"
            return self._dead(name, work, status, f"{given_up}: {error}", maybe_sent=outcome == "unknown",
                              offered=offered)
        if next_attempt_at is None:
            next_attempt_at = self.db.schedule_now() + backoff(policy, attempts)
        self._persist(self.db.finish, work, outcome, status, error, next_attempt_at, offered=offered)
        return outcome

    # ---- one association, one instance -----------------------------------------------------

    def _fitting(self, batch: list[Work]) -> tuple[list[Work], set[tuple[str, str]]]:
        """The front of ``batch`` whose contexts fit in one association (MAX_CONTEXTS), and
        those contexts; the rest goes back to the queue, for the next association. A study of
        many SOP classes (a release of a held study, a backlog after an outage: up to BATCH
        instances) can need more; proposing only some would make a PACS that takes them all
        look as if it refused the others."""
        wanted = self._contexts_for(batch)
        if len(wanted) <= MAX_CONTEXTS:  # nearly always
            return batch, wanted
        wanted = set()
        for index, work in enumerate(batch):
            more = wanted | self._contexts_for([work])
            if len(more) > MAX_CONTEXTS and wanted:
                self._persist(self.db.unclaim, batch[index:])
                return batch[:index], wanted
            wanted = more
        return batch, wanted

    def _contexts_for(self, batch: Sequence[Work]) -> set[tuple[str, str]]:
        """For each SOP class: the instances' own transfer syntaxes first, then the uncompressed
        ones to fall back on — one context per syntax, so the acceptor's choice is ours."""
        wanted: set[tuple[str, str]] = set()
        for work in batch:
            wanted.add((work.sop_class_uid, work.transfer_syntax))
            for syntax in _UNCOMPRESSED:
                wanted.add((work.sop_class_uid, str(syntax)))
        return wanted

    def _associate(self, destination: Destination, wanted: set[tuple[str, str]],
                   own: set[tuple[str, str]]) -> _Link:
        """An association proposing the ``wanted`` (SOP class, transfer syntax) contexts, the
        ``own`` ones (the instances' own syntaxes) first."""
        calling = destination.calling_ae or self.config.node.ae_title
        ae = application_entity(calling)
        ae.connection_timeout = destination.timeouts.connect
        ae.acse_timeout = destination.timeouts.acse
        ae.dimse_timeout = destination.timeouts.dimse
        ae.network_timeout = destination.timeouts.network
        contexts: list[PresentationContext] = []
        # For each SOP class, the instances' own syntaxes first, then the fallbacks in their
        # order (Explicit VR before Implicit): a PACS that accepts only the first context of a
        # class must get an instance as it is, not re-encoded. Capped at the limit.
        def order(context: tuple[str, str]) -> tuple[str, bool, int, str]:
            sop_class, syntax = context
            fallback = _UNCOMPRESSED.index(syntax) if syntax in _UNCOMPRESSED else -1
            return sop_class, context not in own, fallback, syntax

        for sop_class, syntax in sorted(wanted, key=order)[:MAX_CONTEXTS]:
            contexts.append(build_context(sop_class, [syntax]))
        tls_args = None
        if destination.tls is not None:
            try:
                tls_args = (_ssl_context(destination), destination.host)
            except (OSError, ssl.SSLError) as exc:  # a missing or bad CA, certificate or key file
                raise AssociationFailed(f"cannot set up TLS for {destination.ae_title}: {exc}") from exc
        try:
            assoc = ae.associate(destination.host, destination.port, contexts=contexts,
                                 ae_title=destination.ae_title, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket), (evt.EVT_CONN_OPEN, throttle_sends)])
        except OSError as exc:
            # pynetdicom resolves the host name in this thread, before it connects: with the VPN
            # (and so the clinic's DNS) down, that fails here, and is as transient as a refusal.
            raise AssociationFailed(f"cannot resolve or reach {destination.host}: {exc}") from exc
        if (rj := rejection(assoc)) is not None:
            if getattr(rj, "result_source", None) == statuses.SOURCE_PRESENTATION:
                # Temporary congestion or its local limit (PS3.8 9.3.4): it has no association
                # to spare now, whatever the result field says (some answer "permanent").
                kind = AssociationFailed.BUSY
            elif getattr(rj, "result", None) == statuses.REJECTED_PERMANENT:
                kind = AssociationFailed.PERMANENT
            else:
                kind = AssociationFailed.TRANSIENT
            raise AssociationFailed(statuses.describe_rejection(rj), kind)
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # pynetdicom aborts when the peer accepts none of our contexts: no retry will change that.
            classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            raise AssociationFailed(f"{destination.ae_title} accepted no presentation context for "
                                    f"{', '.join(UID(c).name for c in classes)} in the instance's own or an"
                                    " uncompressed transfer syntax", AssociationFailed.UNSUPPORTED)
        if not assoc.is_established:
            raise AssociationFailed(why_not_associated(
                assoc, f"{destination.ae_title}@{destination.host}:{destination.port}", destination.timeouts.connect))
        direct = StoreReceiver.attach(assoc)  # C-STORE responses taken by the DUL thread itself (pdata.py)
        proposed = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in contexts}
        now = time.monotonic()
        return _Link(assoc, destination.ae_title, _endpoint(destination, self.config), proposed, last_used=now,
                     opened=now, direct=direct)

    def _send_one(self, name: str, destination: Destination, link: _Link, work: Work) -> str:
        """Send one instance; record the attempt; return its outcome."""
        accepted = link.contexts_for(work.sop_class_uid)
        syntaxes = [str(cx.transfer_syntax[0]) for cx in accepted]
        edits = _edits_for(work, name)
        transcoded = False
        temporary: Path | None = None
        try:
            if work.transfer_syntax in syntaxes and not edits:
                payload = Path(work.path)
            elif work.transfer_syntax in syntaxes:
                payload = temporary = outgoing.edited_copy(Path(work.path), edits, self.store.outgoing)
            elif UID(work.transfer_syntax).is_compressed and (
                    target := next((s for s in _UNCOMPRESSED if str(s) in syntaxes), None)) is not None:
                # Decoded into a file, a frame at a time, and sent from it in chunks: memory stays flat.
                payload = temporary = outgoing.decoded_copy(Path(work.path), edits, target, self.store.outgoing)
                transcoded = True
            elif (target := next((s for s in _UNCOMPRESSED if str(s) in syntaxes), None)) is not None:
                # Uncompressed, in a syntax it does not accept (Explicit VR to an Implicit-only PACS):
                # re-encoded into a file with the pixel data copied in chunks, and sent from it.
                payload = temporary = outgoing.reencoded_copy(Path(work.path), edits, target, self.store.outgoing)
                transcoded = True
            else:
                error = (f"{destination.ae_title} accepted no presentation context for SOP class {work.sop_class_uid}"
                         f" ({UID(work.sop_class_uid).name}) with transfer syntax {work.transfer_syntax} or an"
                         " uncompressed one")
                return self._dead(name, work, None, error)
        except FileNotFoundError as exc:
            return self._missing(name, work, exc)
        except OSError as exc:
            error = f"cannot prepare the copy for {name}: {exc}"
            if exc.errno not in _OUT_OF_RESOURCES:
                return self._dead(name, work, None, error)
            # A full disk (or no file descriptors, no memory) passes: try again after the backoff.
            # The box's own trouble, not the PACS failing with the image: not one of its
            # max_attempts, or a full disk would make dead letters the PACS never saw.
            return self._retry_or_give_up(name, destination, work, "retry", None, error, offered=False)
        except Exception as exc:  # noqa: BLE001 - a decoder or an edit that fails is that instance's problem
            return self._dead(name, work, None,
                              f"cannot prepare the copy for {name} (transcoding or tag edits failed): {exc}")
        try:
            response = self._store(link, payload, work)
        except FileNotFoundError as exc:
            return self._missing(name, work, exc)
        except (OSError, RuntimeError, ValueError, AttributeError) as exc:
            return self._retry_or_give_up(name, destination, work, "unknown", None, f"send failed: {exc}")
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
        return self._conclude(name, destination, link, work, response, transcoded)

    def _conclude(self, name: str, destination: Destination, link: _Link, work: Work,
                  response: tuple[int, str] | None, transcoded: bool) -> str:
        """Record the outcome of a C-STORE (its status and error comment, None if no response)."""
        if response is None:
            # No response: aborted, timed out or the connection broke. The PACS may or may not have
            # it; send it again on a fresh association.
            if link.assoc.is_established:
                link.assoc.abort()
            return self._retry_or_give_up(name, destination, work, "unknown", None,
                                          hotpath.invalid_response_of(link.assoc)
                                          or "no C-STORE response (abort, timeout or connection lost)")
        status, comment = response
        outcome = statuses.store_outcome(status)
        error = f"status 0x{status:04X}" + (f": {comment}" if comment else "")
        if outcome == "dead" and status == statuses.DUPLICATE_SOP_INSTANCE and work.maybe_sent:
            # Sent again because an earlier attempt got no answer (or the appliance stopped
            # while sending it): the PACS that refuses duplicates has it from that attempt.
            # Sent for the first time, 0x0111 stays a dead letter: the PACS holds another version.
            self._persist(self.db.finish, work, "delivered", status,
                          f"{error} (a duplicate: an earlier attempt that had no answer delivered it)",
                          transcoded=transcoded)
            return "delivered"
        if outcome == "delivered":
            self._persist(self.db.finish, work, "delivered", status, None, transcoded=transcoded)
            return "delivered"
        if outcome == "dead":
            return self._dead(name, work, status, error)
        return self._retry_or_give_up(name, destination, work, "retry", status, error)

    def _chainable(self, name: str, link: _Link, batch: list[Work],
                   position: int) -> list[tuple[Work, hotpath.ChainItem]]:
        """The instances from ``position`` on that go out as their cached files are (their own
        transfer syntax accepted, no tag edits): what a :class:`hotpath.StoreChain` can send."""
        run: list[tuple[Work, hotpath.ChainItem]] = []
        if not link.direct:
            return run
        for work in batch[position:]:
            context_id = link.context_id_for(work)
            if context_id is None or _edits_for(work, name):
                break
            run.append((work, hotpath.ChainItem(context_id, work.path, work.sop_class_uid,
                                                work.sop_instance_uid)))
        return run

    def _send_chain(self, name: str, destination: Destination, link: _Link,
                    run: list[tuple[Work, hotpath.ChainItem]]) -> tuple[int, str | None]:
        """Send ``run`` back to back: each delivery is recorded by the DUL thread as its
        response comes in, while the next request goes out but for its last byte, which waits
        for the record (so a crash leaves at most one instance stored by the peer and
        unrecorded, as one at a time does). Returns how many were
        delivered and recorded, and the outcome of the next one if it was sent (None if the
        chain stopped before it: the caller goes on from there)."""
        works = [work for work, _ in run]

        def goes_on(response: C_STORE) -> bool:  # DUL thread; if not, the worker records it its usual way
            return statuses.store_outcome(int(response.Status)) == "delivered"  # type: ignore[arg-type]

        unrecorded: dict[int, int] = {}  # index: status, of a response the database had no room for

        def record(index: int, response: C_STORE) -> None:  # DUL thread; the next request is going out
            following = works[index + 1] if index + 1 < len(works) else None
            try:
                self.db.finish(works[index], "delivered", int(response.Status), None,  # type: ignore[arg-type]
                               following=following)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                    # The chain ends, the next request (half sent) abandoned with the
                    # association; but the PACS has this one: the worker records it once there
                    # is room (_persist), not as an instance that had no response.
                    unrecorded[index] = int(response.Status)  # type: ignore[arg-type]
                raise

        chain = hotpath.StoreChain(link.assoc, [item for _, item in run], link.next_message_id(), goes_on, record,
                                   self._stop.is_set)
        try:
            delivered, response, sent = chain.run()
        except (hotpath.StoreUnsupported, OSError, RuntimeError) as exc:
            failed: Exception | None = exc
        else:
            failed = None
        finally:
            link.message_id = chain.message_id  # the last one the chain used
        if unrecorded:  # the chain ended there, with the association, whatever the sender saw then
            (index, status), = unrecorded.items()
            if link.assoc.is_established:
                # Its next request, half sent, was abandoned: the association may not have
                # ended yet. End it now, so that the rest of the batch goes back uncharged
                # (_send_batch) instead of out on it, unanswered, as "no response".
                link.assoc.abort()
            self._persist(self.db.finish, works[index], "delivered", status, None)
            return index + 1, None
        if failed is not None:
            log.debug("C-STORE of %s on its own: %s", works[0].sop_instance_uid, failed)
            return 0, self._send_one(name, destination, link, works[0])  # which says why, if it fails
        if delivered == len(works) or not sent:
            return delivered, None
        result = None if response is None else _status_of(response)
        return delivered, self._conclude(name, destination, link, works[delivered], result, transcoded=False)

    @staticmethod
    def _store(link: _Link, payload: Path, work: Work) -> tuple[int, str] | None:
        """C-STORE of a file on the link: the response's status and error comment, None if none came.

        A cached file sent as it is — the common case — goes out by ``hotpath.store_file``,
        which takes the UIDs from the queue instead of re-reading the file's meta and skips
        pynetdicom's primitives (a quarter of a millisecond per instance, on the path every
        instance waits on); a copy in another transfer syntax (outgoing.py) by pynetdicom's
        chunked ``send_c_store`` of its path."""
        context_id = link.context_id_for(work)
        if context_id is not None:
            try:
                primitive = hotpath.store_file(link.assoc, context_id, str(payload), work.sop_class_uid,
                                               work.sop_instance_uid, link.next_message_id())
            except hotpath.StoreUnsupported as exc:
                log.debug("C-STORE of %s by pynetdicom: %s", work.sop_instance_uid, exc)
            else:
                return None if primitive is None else _status_of(primitive)
        response = link.assoc.send_c_store(payload)
        if "Status" not in response:
            return None
        return int(response.Status), str(response.get("ErrorComment", "") or "")


def eviction_limit(disk: Disk, total: int) -> int:
    """The disk usage above which delivered instances are evicted whatever their age: the high
    watermark (storage.disk.evict_above), or, if it is lower, the usage at which intake would
    stop for want of room (storage.disk.min_free) less a margin. A min_free larger than the
    room evict_above leaves (30% free with evict_above 80%; 1GiB on a disk under 5 GiB) had
    intake refuse every image (0xA700) with the cache full of delivered ones, nothing evicted
    until their retention ran out, a day by default."""
    margin = max(min(total // 100, 64 << 20), 1 << 20)
    return min(disk.evict_above.of(total), total - disk.min_free.of(total) - margin)


def _described_limit(disk: Disk, total: int) -> str:
    if eviction_limit(disk, total) < disk.evict_above.of(total):
        return (f"the room storage.disk.min_free ({disk.min_free}) keeps, which comes before"
                f" evict_above ({disk.evict_above})")
    return f"storage.disk.evict_above ({disk.evict_above})"


def _status_of(response: C_STORE) -> tuple[int, str]:
    """A C-STORE response primitive's status and error comment."""
    return int(response.Status), str(response.ErrorComment or "")  # type: ignore[arg-type]


def _edits_for(work: Work, destination: str) -> tuple[rules.TagEdit, ...]:
    """The delivery's own tag edits; for one queued before they were recorded with it, its
    instance's decision's."""
    if work.edits is not None:
        return _recorded_edits(work.edits)
    return _edits(work.decision, destination) if work.decision else ()


@functools.lru_cache(maxsize=256)
def _recorded_edits(edits: str) -> tuple[rules.TagEdit, ...]:
    return rules.edits_from_json(edits)


@functools.lru_cache(maxsize=256)
def _edits(decision: str, destination: str) -> tuple[rules.TagEdit, ...]:
    """A decision's edits for a destination. Cached: the instances of a study mostly carry the
    same decision, and parsing it is otherwise done for every instance sent."""
    try:
        return rules.Decision.from_json(decision).edits_for(destination)
    except KeyError:  # sent here by `appliance send --to` or a retry: no edits
        return ()


def _ssl_context(destination: Destination) -> ssl.SSLContext:
    tls = destination.tls
    assert tls is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.sslsocket_class = TellingTLSSocket  # why a handshake failed, for the queue and the journal
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def _duration(seconds: float) -> str:
    """7 days, 10 min, 30 s: a retry policy's duration as an admin wrote it, roughly."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"
