"""The cache's retention and eviction scans read the ``done_at`` index (migration 4) instead of
grouping every cached instance's deliveries. What they return must be exactly what the
definition says — and nothing owed to a destination, ever — after any sequence of receptions,
replacements, claims, outcomes, retries and evictions, and for a cache that existed before
the index did. So must `appliance queue`'s counts, taken from indexes. And the history of
evicted instances is forgotten after ``retention.keep_history_for``, never anything the box
still owes or keeps."""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
from pathlib import Path

import pytest

from appliance import db as dbmod
from appliance.db import Database, Delivery, Instance

# The definition, as a query over every cached instance (what Database.evictable ran before
# the index): every delivery delivered, the last before the cut-off; or discarded by a rule,
# with no delivery, received before the cut-off.
REFERENCE = """
    SELECT i.id, i.path FROM instances i
    LEFT JOIN deliveries d ON d.instance_id = i.id
    WHERE i.state = 'cached'
    GROUP BY i.id
    HAVING (count(d.id) > 0 AND sum(d.state != 'delivered') = 0 AND max(d.delivered_at) < :cut)
        OR (count(d.id) = 0 AND json_extract(i.decision, '$.status') = 'discarded' AND i.received_at < :cut)
    ORDER BY coalesce(max(d.delivered_at), i.received_at)
"""


def reference(db: Database, cut: float) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in db.query(REFERENCE, {"cut": cut})]


# What `appliance queue` counts per destination, from the rows (what queue_summaries ran before
# it counted from indexes).
QUEUE_REFERENCE = """
    SELECT destination, sum(state = 'pending'), sum(state = 'held'), sum(state = 'in_flight'),
           sum(state = 'delivered'), sum(state = 'dead'), sum(transcoded),
           min(CASE WHEN state IN ('pending', 'in_flight') THEN created_at END)
    FROM deliveries GROUP BY destination ORDER BY destination
"""


def queue_counts(db: Database) -> list[tuple]:
    now = db.schedule_now()
    return [(s.name, s.pending, s.held, s.in_flight, s.delivered, s.dead, s.transcoded,
             None if s.oldest_pending_age is None else pytest.approx(now - s.oldest_pending_age, abs=1e-3))
            for s in db.queue_summaries(["b", "a"]) if s.name in ("a", "b")]


def owed(db: Database) -> set[int]:
    return {int(r[0]) for r in db.query("SELECT instance_id FROM deliveries WHERE state != 'delivered'")}


class Clock:
    """A wall clock that moves forward a second at each reading: every time is distinct."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def instance(uid: int, version: int, at: float, decision: dict | None) -> Instance:
    return Instance(
        sop_instance_uid=f"1.2.3.{uid}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=f"1.2.9.{uid % 5}",
        series_instance_uid="1.2.8", patient_id="P", patient_name="N", study_date="", accession_number="",
        modality="CT", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="M", called_ae="EDGE", source_ip="127.0.0.1",
        size=1, sha256=f"{uid}-{version}", path=f"/cache/{uid}.{version}.dcm", received_at=at,
        decision=json.dumps(decision) if decision is not None else None)


def database_at(path: Path, version: int) -> sqlite3.Connection:
    """A database made by the first ``version`` migrations, as a box of that release left it."""
    conn = sqlite3.connect(path)
    for statements in dbmod.MIGRATIONS[:version]:
        for statement in statements:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={version}")
    return conn


def insert_instance(conn: sqlite3.Connection, row: Instance, state: str = "cached") -> None:
    columns = ", ".join(dbmod._INSTANCE_COLUMNS)
    marks = ", ".join("?" for _ in dbmod._INSTANCE_COLUMNS)
    conn.execute(f"INSERT INTO instances ({columns}, state) VALUES ({marks}, ?)",
                 [getattr(row, c) for c in dbmod._INSTANCE_COLUMNS] + [state])


@pytest.mark.parametrize("seed", range(6))
def test_the_index_finds_what_the_definition_says_after_any_history(tmp_path: Path, monkeypatch, seed: int) -> None:
    clock = Clock()
    monkeypatch.setattr("appliance.db.time.time", clock)
    db = Database(tmp_path / "appliance.db")
    rng = random.Random(seed)
    versions: dict[int, int] = {}
    checked = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35:  # a reception, or a replacement of a cached UID, routed any way
            uid = rng.randrange(30)
            versions[uid] = versions.get(uid, 0) + 1
            kind = rng.choice(["routed", "routed", "discarded", "unrouted"])
            destinations = rng.sample(["a", "b"], rng.randint(1, 2)) if kind == "routed" else []
            held = rng.random() < 0.2
            existing = db.find_instance(f"1.2.3.{uid}")
            db.store_instance(instance(uid, versions[uid], clock(), {"status": kind}), existing,
                              [Delivery(d, 30.0 if held else None) for d in destinations])
        elif op < 0.75:  # a destination sends some: each comes back with any outcome
            works = db.claim(rng.choice(["a", "b"]), db.schedule_now() + 10**9, rng.randint(1, 4))
            for work in works:
                outcome = rng.choice(["delivered", "delivered", "delivered", "retry", "dead", "unknown"])
                db.finish(work, outcome, 0 if outcome == "delivered" else 0xA700, None, db.schedule_now(),
                          transcoded=outcome == "delivered" and rng.random() < 0.3)
        elif op < 0.8:
            db.retry_dead(rng.choice(["a", "b", None]))
        elif op < 0.85:
            db.release_stable_studies(db.schedule_now() + 10**9)
        elif op < 0.9:
            db.requeue_in_flight()
        else:  # a scan, and some of what it found evicted
            cut = clock.now - rng.uniform(0, 200)
            found = db.evictable(cut, limit=10**6)
            assert found == reference(db, cut)
            assert not {i for i, _ in found} & owed(db), "an instance still owed to a destination is evictable"
            checked += len(found)
            expected = {row[0]: tuple(row) for row in db.query(QUEUE_REFERENCE)}
            assert queue_counts(db) == [expected.get(name, (name, 0, 0, 0, 0, 0, 0, None)) for name in ("b", "a")]
            for instance_id, path in found[: rng.randint(0, 3)]:
                assert db.mark_evicted(instance_id, path)
    for cut in (clock.now - 100, clock.now + 1):
        assert db.evictable(cut, limit=10**6) == reference(db, cut)
    assert checked > 10, "the history produced too few evictable instances to mean anything"
    db.close()


def test_a_cache_from_before_the_index_gets_it_filled_in(tmp_path: Path) -> None:
    """The migration computes done_at for what is already cached: delivered, partly delivered,
    dead, discarded and unrouted instances, and evicted ones."""
    path = tmp_path / "appliance.db"
    conn = database_at(path, 3)
    cases = {  # uid: (decision status, [(destination, state, delivered_at)], instance state)
        1: ("routed", [("a", "delivered", 500.0), ("b", "delivered", 700.0)], "cached"),
        2: ("routed", [("a", "delivered", 100.0), ("b", "pending", None)], "cached"),
        3: ("routed", [("a", "dead", None)], "cached"),
        4: ("discarded", [], "cached"),
        5: ("unrouted", [], "cached"),
        6: ("routed", [("a", "delivered", 50.0)], "evicted"),
        7: ("routed", [("a", "delivered", 300.0)], "cached"),
    }
    for uid, (status, deliveries, state) in cases.items():
        row = instance(uid, 1, 200.0 + uid, {"status": status})
        insert_instance(conn, row, state)
        for destination, delivery_state, delivered_at in deliveries:
            conn.execute("INSERT INTO deliveries (instance_id, destination, study_instance_uid, state, created_at,"
                         " next_attempt_at, delivered_at) VALUES (?, ?, ?, ?, 0, 0, ?)",
                         (uid, destination, row.study_instance_uid, delivery_state, delivered_at))
    conn.commit()
    conn.close()

    db = Database(path)
    assert [i for i, _ in db.evictable(10**9, limit=100)] == [4, 7, 1]  # by done_at: 204, 300, 700
    assert [i for i, _ in db.evictable(600.0, limit=100)] == [4, 7]
    for cut in (0.0, 250.0, 600.0, 10**9):
        assert db.evictable(cut, limit=100) == reference(db, cut)
    plan = " ".join(str(r[-1]) for r in db.query("EXPLAIN QUERY PLAN SELECT id FROM instances WHERE state = 'cached'"
                                                  " AND done_at IS NOT NULL AND done_at < 5 ORDER BY done_at"))
    assert "instances_done" in plan, plan
    db.close()


def test_history_past_keep_history_for_is_forgotten_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    """Evicted instances done with before the cut-off go with their deliveries and attempts, as
    do older repeated receptions and holds released long ago; everything the box still owes, or
    keeps, stays: delivered but cached, dead letters, unrouted, pending with its attempts."""
    clock = Clock()
    monkeypatch.setattr("appliance.db.time.time", clock)
    db = Database(tmp_path / "appliance.db")

    def receive(uid: int, destinations: list[str], kind: str = "routed") -> None:
        existing = db.find_instance(f"1.2.3.{uid}")
        db.store_instance(instance(uid, 1, clock(), {"status": kind}), existing, [Delivery(d) for d in destinations])

    def send_all(destination: str, outcome: str) -> None:
        """One attempt for everything pending for ``destination`` (a claim takes one study)."""
        claimed = []
        while works := db.claim(destination, db.schedule_now() + 10**9, 100):
            claimed += works
        for work in claimed:
            db.finish(work, outcome, 0 if outcome == "delivered" else 0xA700, None, db.schedule_now() + 10**6)

    receive(1, ["a"])  # delivered, evicted: before the cut-off
    receive(2, [], "discarded")  # discarded, evicted: before the cut-off
    send_all("a", "delivered")
    for instance_id, path in db.evictable(clock.now + 1):
        db.mark_evicted(instance_id, path)
    receive(1, ["a"])  # 1 again, after its eviction: its record is cached again, and owed
    receive(3, ["b"])  # fails once (an attempt), then dead
    send_all("b", "retry")
    send_all("b", "dead")
    receive(4, [], "unrouted")
    receive(5, ["a"])  # delivered, still cached
    receive(6, ["b"])  # pending, with an attempt
    send_all("b", "retry")
    db.store_instance(instance(4, 2, clock(), {"status": "unrouted"}), db.find_instance("1.2.3.4"))  # a reception
    send_all("a", "delivered")
    cut = clock()
    db.store_instance(instance(4, 3, clock(), {"status": "unrouted"}), db.find_instance("1.2.3.4"))  # another
    receive(7, ["a"])  # delivered and evicted after the cut-off
    send_all("a", "delivered")
    for instance_id, path in db.evictable(clock.now + 1):
        if path.startswith("/cache/7."):
            db.mark_evicted(instance_id, path)
    attempts_before = {r[0]: r[1] for r in db.query(
        "SELECT i.sop_instance_uid, count(a.id) FROM instances i JOIN deliveries d ON d.instance_id = i.id"
        " JOIN attempts a ON a.delivery_id = d.id GROUP BY i.id")}

    assert db.prune_history(cut, db.schedule_now() + 1) == 1  # 2; not 7, evicted after the cut-off
    left = {r[0]: r[1] for r in db.query("SELECT sop_instance_uid, state FROM instances")}
    assert left == {"1.2.3.1": "cached", "1.2.3.3": "cached", "1.2.3.4": "cached", "1.2.3.5": "cached",
                    "1.2.3.6": "cached", "1.2.3.7": "evicted"}
    attempts_after = {r[0]: r[1] for r in db.query(
        "SELECT i.sop_instance_uid, count(a.id) FROM instances i JOIN deliveries d ON d.instance_id = i.id"
        " JOIN attempts a ON a.delivery_id = d.id GROUP BY i.id")}
    assert attempts_after == {u: n for u, n in attempts_before.items() if u in left}
    assert attempts_after["1.2.3.3"] == 2 and attempts_after["1.2.3.6"] == 1
    orphans = db.query("SELECT count(*) FROM deliveries WHERE instance_id NOT IN (SELECT id FROM instances)")[0][0]
    orphans += db.query("SELECT count(*) FROM attempts WHERE delivery_id NOT IN (SELECT id FROM deliveries)")[0][0]
    assert orphans == 0
    assert [r[0] for r in db.query("SELECT sha256 FROM receptions")] == ["4-3"]  # the one after the cut-off
    assert db.prune_history(cut, db.schedule_now() + 1) == 0
    db.close()


def test_holds_released_long_ago_are_forgotten_waiting_ones_never(tmp_path: Path) -> None:
    db = Database(tmp_path / "appliance.db")
    now = db.schedule_now()
    for uid in (1, 2):  # studies 1.2.9.1 and 1.2.9.2, held for a minute, then released
        db.store_instance(instance(uid, 1, 0.0, {"status": "routed"}), None, [Delivery("a", 60.0)])
    assert len(db.release_stable_studies(now + 61)) == 2
    db.store_instance(instance(3, 1, 0.0, {"status": "routed"}), None, [Delivery("a", 60.0)])  # 1.2.9.3 waits
    assert db.prune_history(0.0, now + 61) == 0
    assert len(db.holds()) == 3  # released at now + 61: not before it
    db.prune_history(0.0, now + 10**6)
    assert [(r["study_instance_uid"], r["state"]) for r in db.holds()] == [("1.2.9.3", "waiting")]
    db.close()


def test_a_correction_no_rule_routes_is_kept_as_unrouted_not_evicted_as_delivered(tmp_path: Path) -> None:
    """The first version went to ``a``; a correction (same SOP Instance UID) that no rule
    routes is the new version: nothing delivered it, so it is unrouted and kept — the first
    version's delivery does not make it evictable."""
    db = Database(tmp_path / "appliance.db")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    for work in db.claim("a", db.schedule_now() + 10**9, 10):
        db.finish(work, "delivered", 0, None, db.schedule_now())
    assert len(db.evictable(10**12)) == 1
    db.store_instance(instance(1, 2, 200.0, {"status": "unrouted"}), db.find_instance("1.2.3.1"), [])
    assert db.evictable(10**12) == [] and db.evictable(None) == []
    assert db.count_unrouted() == 1
    db.close()


def test_a_correction_that_moves_to_another_held_study_is_released_with_it(tmp_path: Path) -> None:
    """The first version was held with its study and delivered; a correction names another
    study, held for the same destination. Its delivery is filed under the new study and goes
    out when that study is released — not left held for ever under the old one."""
    db = Database(tmp_path / "appliance.db")
    first = instance(1, 1, 100.0, {"status": "routed"})
    db.store_instance(first, None, [Delivery("a", 30.0)])
    db.release_stable_studies(db.schedule_now() + 60)
    for work in db.claim("a", db.schedule_now() + 10**9, 10):
        db.finish(work, "delivered", 0, None, db.schedule_now())
    moved = Instance(**{**first.__dict__, "study_instance_uid": "1.2.9.99", "sha256": "1-2", "path": "/cache/1.2.dcm"})
    db.store_instance(moved, db.find_instance("1.2.3.1"), [Delivery("a", 30.0)])
    assert [r[0] for r in db.query("SELECT state FROM deliveries")] == ["held"]
    assert db.release_stable_studies(db.schedule_now() + 10**6) == [("1.2.9.99", "a")]
    works = db.claim("a", db.schedule_now() + 10**6, 10)
    assert [w.study_instance_uid for w in works] == ["1.2.9.99"], "the moved instance was not released"
    db.close()


def test_deliveries_stuck_under_a_study_their_instance_left_are_repaired_by_the_migration(tmp_path: Path) -> None:
    """Migration 7: a delivery left held under its instance's old study (before the fix) is
    filed under the new one; with no waiting hold there, it is sent at once. One still held
    under its own study's waiting hold stays held."""
    path = tmp_path / "appliance.db"
    conn = database_at(path, 6)
    for uid in (1, 2):
        insert_instance(conn, instance(uid, 1, 100.0, {"status": "routed"}))
    conn.execute("INSERT INTO holds (study_instance_uid, destination, stable_after, last_arrival, release_at, state)"
                 " VALUES ('1.2.9.2', 'a', 30, 0, 30, 'waiting')")
    conn.execute("INSERT INTO deliveries (instance_id, destination, study_instance_uid, state, created_at,"
                 " next_attempt_at) VALUES (1, 'a', 'old-study', 'held', 0, 0), (2, 'a', '1.2.9.2', 'held', 0, 0)")
    conn.commit()
    conn.close()
    db = Database(path)
    assert [tuple(r) for r in db.query("SELECT instance_id, state, study_instance_uid FROM deliveries ORDER BY 1")] == [
        (1, "pending", "1.2.9.1"), (2, "held", "1.2.9.2")]
    db.close()


def _delivered_everywhere(db: Database, destination: str) -> None:
    for work in db.claim(destination, db.schedule_now() + 10**9, 100):
        db.finish(work, "delivered", 0, None, db.schedule_now())


def test_a_correction_of_an_evicted_instance_that_no_rule_routes_is_kept_as_unrouted(tmp_path: Path) -> None:
    """As above, when the first version has been evicted already: its record is still there
    (history), but what it was delivered to does not count for the correction."""
    db = Database(tmp_path / "appliance.db")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    _delivered_everywhere(db, "a")
    ((instance_id, path),) = db.evictable(None)
    assert db.mark_evicted(instance_id, path)
    assert db.find_instance("1.2.3.1") is None
    db.store_instance(instance(1, 2, 200.0, {"status": "unrouted"}), None, [])
    assert db.evictable(None) == [] and db.count_unrouted() == 1
    db.close()


def test_the_cached_copy_queued_again_leaves_a_delivery_on_its_way_alone_and_retries_a_delivered_one(
        tmp_path: Path) -> None:
    """``appliance send --to`` of a copy the duplicate policy keeps (Database.queue_cached):
    it is the same version, so a delivery in flight goes on (its outcome counts), and one
    delivered goes back to the queue knowing the destination has it already (a PACS that
    refuses duplicates then answers 0x0111, a delivery), its age kept."""
    db = Database(tmp_path / "appliance.db")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    cached = db.find_instance("1.2.3.1")
    assert cached is not None
    (work,) = db.claim("a", db.schedule_now() + 10**9, 10)
    assert db.queue_cached(cached, [Delivery("a")])
    assert db.finish(work, "delivered", 0, None, db.schedule_now()), "the delivery on its way was started over"
    created = db.query("SELECT created_at FROM deliveries")[0][0]
    assert db.queue_cached(cached, [Delivery("a")])
    row = db.query("SELECT state, maybe_sent, created_at, requeued_at IS NOT NULL FROM deliveries")[0]
    assert tuple(row) == ("pending", 1, created, 1)
    db.close()


def test_a_replacement_sent_to_one_destination_is_at_none_of_the_others_yet(tmp_path: Path) -> None:
    """After an unanswered attempt to ``a`` (maybe sent there), ``appliance send --to b``
    replaces the file: the new version is not at ``a``, so a 0x0111 from ``a`` must not count
    as its delivery."""
    db = Database(tmp_path / "appliance.db")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    (work,) = db.claim("a", db.schedule_now() + 10**9, 10)
    db.finish(work, "unknown", None, "no response", db.schedule_now())
    assert db.query("SELECT maybe_sent FROM deliveries")[0][0] == 1
    db.store_instance(instance(1, 2, 200.0, {"status": "routed"}), db.find_instance("1.2.3.1"), [Delivery("b")],
                      rerouted=False)
    assert {r[0]: r[1] for r in db.query("SELECT destination, maybe_sent FROM deliveries")} == {"a": 0, "b": 0}
    db.close()


def test_only_the_delivery_on_the_wire_gets_an_attempt_when_the_appliance_stopped(tmp_path: Path) -> None:
    """Of a claimed batch, the first is on the wire; each ``finish`` marks the one whose request
    goes out next, ``sending`` one sent on its own. At start-up only the delivery on the wire
    gets an ``unknown`` attempt (and counts it); the others go back as they were, every one
    marked as maybe sent."""
    db = Database(tmp_path / "appliance.db")
    for uid in range(5):
        db.store_instance(instance(uid * 5, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    works = db.claim("a", db.schedule_now() + 10**9, 10)
    assert len(works) == 5
    db.finish(works[0], "delivered", 0, None, db.schedule_now(), following=works[1])
    db.finish(works[1], "retry", 0xA700, "out of resources", db.schedule_now())
    db.sending(works[2])  # on the wire when the appliance stops
    assert db.requeue_in_flight() == 3
    rows = {r["id"]: r for r in db.query("SELECT id, state, attempts, maybe_sent, last_error FROM deliveries")}
    tried = {r[0] for r in db.query("SELECT delivery_id FROM attempts WHERE outcome = 'unknown'")}
    assert tried == {works[2].delivery_id}
    assert [(rows[w.delivery_id]["state"], rows[w.delivery_id]["attempts"], rows[w.delivery_id]["maybe_sent"])
            for w in works] == [("delivered", 1, 0), ("pending", 1, 0), ("pending", 1, 1), ("pending", 0, 1),
                                ("pending", 0, 1)]
    assert rows[works[1].delivery_id]["last_error"] == "out of resources"
    assert rows[works[2].delivery_id]["last_error"] == dbmod.STOPPED_WHILE_SENDING
    assert rows[works[3].delivery_id]["last_error"] is None
    # Claimed again, only the new first is on the wire: the earlier mark does not stay.
    again = db.claim("a", db.schedule_now() + 10**9, 10)
    assert [w.delivery_id for w in again] == [w.delivery_id for w in works[1:]]
    assert [r[0] for r in db.query("SELECT on_wire FROM deliveries WHERE state = 'in_flight' ORDER BY id")] == [
        1, 0, 0, 0]
    db.close()


def test_what_an_older_release_left_in_flight_is_taken_as_sent(tmp_path: Path) -> None:
    """Migration 11: an older release did not record which delivery was on the wire; what it
    left in flight gets the attempt it would have given it."""
    path = tmp_path / "appliance.db"
    conn = database_at(path, 10)
    insert_instance(conn, instance(1, 1, 100.0, {"status": "routed"}))
    conn.execute("INSERT INTO deliveries (instance_id, destination, study_instance_uid, state, created_at,"
                 " next_attempt_at) VALUES (1, 'a', '1.2.9.1', 'in_flight', 0, 0)")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.requeue_in_flight() == 1
    assert [tuple(r) for r in db.query("SELECT state, attempts, maybe_sent FROM deliveries")] == [("pending", 1, 1)]
    assert [r[0] for r in db.query("SELECT outcome FROM attempts")] == ["unknown"]
    db.close()


def test_giving_back_a_claim_leaves_alone_the_new_version_another_association_has_claimed(tmp_path: Path) -> None:
    """A replacement arrives while the old version's delivery is claimed; another association
    claims the new version. The first association gives back what it had not sent (its chain
    broke): that must not put the new version, on its way on the other association, back in
    the queue to be sent a second time."""
    db = Database(tmp_path / "appliance.db")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    (old,) = db.claim("a", db.schedule_now() + 10**9, 10)
    db.store_instance(instance(1, 2, 200.0, {"status": "routed"}), db.find_instance("1.2.3.1"), [Delivery("a")],
                      rerouted=False)
    (new,) = db.claim("a", db.schedule_now() + 10**9, 10)
    assert new.delivery_id == old.delivery_id and new.path != old.path
    db.unclaim([old])
    assert [r[0] for r in db.query("SELECT state FROM deliveries")] == ["in_flight"]
    assert db.claim("a", db.schedule_now() + 10**9, 10) == []
    db.unclaim([new])
    assert [r[0] for r in db.query("SELECT state FROM deliveries")] == ["pending"]
    db.close()


def test_a_resend_of_the_same_bytes_is_known_to_be_where_it_was_delivered(tmp_path: Path) -> None:
    """A modality sends an image again as it was: it is queued again (a resend is how a
    technician pushes a study once more), knowing that where it was delivered it is already
    (a 0x0111 then is its delivery). A different version is not; nor is the same bytes with
    other tag edits for that destination."""
    db = Database(tmp_path / "appliance.db")
    first = instance(1, 1, 100.0, {"status": "routed"})
    db.store_instance(first, None, [Delivery("a"), Delivery("b", edits='{"set": 1}'), Delivery("c")])
    for destination in ("a", "b"):
        _delivered_everywhere(db, destination)

    def maybe_sent() -> dict[str, tuple[str, int]]:
        return {r[0]: (r[1], r[2]) for r in db.query("SELECT destination, state, maybe_sent FROM deliveries")}

    again = dataclasses.replace(first, path="/cache/1.again.dcm", received_at=200.0)
    db.store_instance(again, db.find_instance("1.2.3.1"), [Delivery("a"), Delivery("b", edits='{"set": 2}'),
                                                           Delivery("c")])
    assert maybe_sent() == {"a": ("pending", 1), "b": ("pending", 0), "c": ("pending", 0)}
    _delivered_everywhere(db, "a")
    changed = instance(1, 2, 300.0, {"status": "routed"})
    assert changed.sha256 != first.sha256
    db.store_instance(changed, db.find_instance("1.2.3.1"), [Delivery("a")])
    assert maybe_sent()["a"] == ("pending", 0)
    db.close()


def test_a_study_s_state_is_what_its_cached_instances_wait_for(tmp_path: Path) -> None:
    """``appliance ls``: a dead letter is shown first, then sending, held, unrouted, delivered;
    a study whose instances were all discarded says so; one with nothing cached, evicted."""
    db = Database(tmp_path / "appliance.db")

    def study(uid: int, decision: str, deliveries: list[Delivery]) -> None:
        db.store_instance(dataclasses.replace(instance(uid, 1, 100.0 + uid, {"status": decision}),
                                              study_instance_uid=f"study-{uid // 10}"), None, deliveries)

    study(10, "routed", [Delivery("a")])  # study-1: delivered
    study(20, "routed", [Delivery("a")])  # study-2: delivered, and one dead
    study(21, "routed", [Delivery("b")])
    study(30, "routed", [Delivery("c")])  # study-3: sending
    study(40, "routed", [Delivery("d", stable_after=30.0)])  # study-4: held
    study(50, "unrouted", [])  # study-5: unrouted beside a delivered one
    study(51, "routed", [Delivery("a")])
    study(60, "discarded", [])  # study-6: discarded
    study(70, "routed", [Delivery("a")])  # study-7: evicted
    while works := db.claim("a", db.schedule_now() + 10**9, 10):  # a study at a time
        for work in works:
            db.finish(work, "delivered", 0, None)
    for work in db.claim("b", db.schedule_now() + 10**9, 10):
        db.finish(work, "dead", 0xA900, "refused")
    ((evicted_id, evicted_path),) = [(i, p) for i, p in db.evictable(None) if "70" in p]
    assert db.mark_evicted(evicted_id, evicted_path)
    states = {s.study_instance_uid: s.state for s in db.studies()}
    assert states == {"study-1": "delivered", "study-2": "dead", "study-3": "sending", "study-4": "held",
                      "study-5": "unrouted", "study-6": "discarded", "study-7": "evicted"}
    db.close()


def test_a_deferred_delivery_goes_after_the_others_of_its_study_and_of_the_next(tmp_path: Path) -> None:
    """``postpone`` (its own send failed) defers a delivery: once due again it comes after every
    other due delivery, in the choice of the study and within it."""
    db = Database(tmp_path / "appliance.db")
    for uid in (0, 5, 10, 1):  # study 1.2.9.0: 0, 5, 10; study 1.2.9.1: 1
        db.store_instance(instance(uid, 1, 100.0, {"status": "routed"}), None, [Delivery("a")])
    now = db.schedule_now()
    first = db.claim("a", now, 10)
    assert [w.sop_instance_uid for w in first] == ["1.2.3.0", "1.2.3.5", "1.2.3.10"]
    db.unclaim(first[1:])
    db.finish(first[0], "unknown", None, "aborted", now)
    db.postpone(first[0], now)
    again = db.claim("a", now + 1, 10)
    assert [w.sop_instance_uid for w in again] == ["1.2.3.5", "1.2.3.10", "1.2.3.0"]
    for work in again[:2]:
        db.finish(work, "delivered", 0, None)
    db.unclaim(again[2:])
    assert [w.sop_instance_uid for w in db.claim("a", now + 1, 10)] == ["1.2.3.1"]
    db.close()


def test_moving_a_renamed_destination_s_queue_to_its_new_name(tmp_path: Path) -> None:
    """``appliance move old new``: pending, dead and held deliveries of ``old`` start over at
    ``new`` (a waiting study keeps waiting there); what ``old`` delivered stays its history;
    an instance ``new`` already has keeps its ``old`` delivery."""
    db = Database(tmp_path / "appliance.db")
    for uid in (0, 5):  # study 1.2.9.0: delivered to old, then pending
        db.store_instance(instance(uid, 1, 100.0, {"status": "routed"}), None, [Delivery("old")])
    (first, second) = db.claim("old", db.schedule_now() + 10**9, 10)
    db.finish(first, "delivered", 0, None)
    db.finish(second, "dead", 0xA900, "refused")
    db.store_instance(instance(1, 1, 100.0, {"status": "routed"}), None, [Delivery("old", stable_after=60.0)])
    db.store_instance(instance(2, 1, 100.0, {"status": "routed"}), None, [Delivery("old"), Delivery("new")])
    assert db.move_deliveries("old", "new") == (2, 1)
    rows = {(r["sop_instance_uid"], r["destination"]): (r["state"], r["attempts"]) for r in db.query(
        "SELECT i.sop_instance_uid, d.destination, d.state, d.attempts FROM deliveries d"
        " JOIN instances i ON i.id = d.instance_id")}
    assert rows == {("1.2.3.0", "old"): ("delivered", 1), ("1.2.3.5", "new"): ("pending", 0),
                    ("1.2.3.1", "new"): ("held", 0), ("1.2.3.2", "old"): ("pending", 0),
                    ("1.2.3.2", "new"): ("pending", 0)}
    assert [(r["study_instance_uid"], r["destination"], r["state"]) for r in db.holds()] == [
        ("1.2.9.1", "new", "waiting")]
    db.close()


def test_the_same_bytes_sent_to_one_destination_stay_maybe_sent_to_the_others(tmp_path: Path) -> None:
    """As above, but the file `appliance send --to b` brings is the very version that had no
    answer from ``a``: ``a`` may have it still, and a 0x0111 from it counts as delivered."""
    db = Database(tmp_path / "appliance.db")
    first = instance(1, 1, 100.0, {"status": "routed"})
    db.store_instance(first, None, [Delivery("a")])
    (work,) = db.claim("a", db.schedule_now() + 10**9, 10)
    db.finish(work, "unknown", None, "no response", db.schedule_now())
    again = dataclasses.replace(first, path="/cache/1.again.dcm", received_at=200.0)
    db.store_instance(again, db.find_instance("1.2.3.1"), [Delivery("b")], rerouted=False)
    assert {r[0]: r[1] for r in db.query("SELECT destination, maybe_sent FROM deliveries")} == {"a": 1, "b": 0}
    db.close()
