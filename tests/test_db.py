"""The database's writers: one at a time, across processes, queued on the file lock."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

from appliance.db import WAL_SIZE_LIMIT, Database, Delivery, Instance, MovedQueue


def _count_up(path: str, times: int) -> None:
    db = Database(Path(path))
    try:
        for _ in range(times):
            with db.transaction(durable=False) as conn:
                value = conn.execute("SELECT value FROM counter").fetchone()[0]
                conn.execute("UPDATE counter SET value = ?", (value + 1,))
    finally:
        db.close()


def test_a_writer_waits_for_another_connections_transaction(tmp_path: Path) -> None:
    """Two connections (as two processes have): the second transaction begins only after the
    first one committed, and sees its write."""
    first, second = Database(tmp_path / "a.db"), Database(tmp_path / "a.db")
    with first.transaction() as conn:
        conn.execute("CREATE TABLE counter (value INTEGER)")
        conn.execute("INSERT INTO counter VALUES (0)")
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with first.transaction() as conn:
            conn.execute("UPDATE counter SET value = 1")
            holding.set()
            release.wait(10)
            order.append("first commits")

    def write() -> None:
        holding.wait(10)
        with second.transaction() as conn:
            order.append(f"second begins, sees {conn.execute('SELECT value FROM counter').fetchone()[0]}")

    threads = [threading.Thread(target=hold), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    holding.wait(10)
    threads[1].join(0.3)  # the second is queued, not failing
    assert threads[1].is_alive() and order == []
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first commits", "second begins, sees 1"]
    first.close(), second.close()


def test_writers_in_several_processes_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    db = Database(path)
    with db.transaction() as conn:
        conn.execute("CREATE TABLE counter (value INTEGER)")
        conn.execute("INSERT INTO counter VALUES (0)")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_count_up, args=(str(path), 200)) for _ in range(4)]
    for worker in workers:
        worker.start()
    _count_up(str(path), 200)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert db.query("SELECT value FROM counter")[0][0] == 1000
    db.close()


def test_the_schedule_clock_is_shared_within_a_boot_and_a_new_boot_resumes_where_the_last_was_seen(
        tmp_path: Path, monkeypatch) -> None:
    """Every process of a boot reads the same schedule clock; after a reboot it goes on from the
    last time the appliance was seen running, whatever the wall clock says and however long the
    box was off — so no retry, timer or give-up age counts the time it was switched off."""
    from appliance import clock

    boot, since_boot = ["boot-1"], [100.0]
    monkeypatch.setattr(clock, "boot_id", lambda: boot[0])
    monkeypatch.setattr(clock, "since_boot", lambda: since_boot[0])
    monkeypatch.setattr("appliance.db.time.time", lambda: 1_000_000.0)
    first, second = Database(tmp_path / "a.db"), Database(tmp_path / "a.db")
    assert first.schedule_now() == 1_000_000.0  # a new database starts at the wall clock
    since_boot[0] = 160.0
    assert first.schedule_now() == second.schedule_now() == 1_000_060.0
    first.schedule_seen()
    since_boot[0] = 170.0  # runs 10 s more, unseen (a power cut)

    # A week later, a new boot: the wall clock says anything at all.
    boot[0], since_boot[0] = "boot-2", 5.0
    monkeypatch.setattr("appliance.db.time.time", lambda: 1_000_000.0 + 7 * 86400)
    rebooted = Database(tmp_path / "a.db")
    assert rebooted.schedule_now() == 1_000_060.0
    since_boot[0] = 35.0
    assert rebooted.schedule_now() == 1_000_090.0
    for db in (first, second, rebooted):
        db.close()


def test_the_wal_does_not_keep_its_peak_size(tmp_path: Path) -> None:
    """A reader holding an old snapshot (a long ``appliance ls``) while the forwarder works
    through a backlog lets the WAL grow past any checkpoint. Once the reader is gone, the WAL is
    cut back to WAL_SIZE_LIMIT, not kept at its peak on the card."""
    import os
    import sqlite3

    path = tmp_path / "a.db"
    db = Database(path)
    with db.transaction() as conn:
        conn.execute("CREATE TABLE ballast (b BLOB)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM ballast").fetchone()
    for _ in range(40):
        with db.transaction() as conn:
            conn.execute("INSERT INTO ballast VALUES (?)", (os.urandom(1 << 20),))
    wal = Path(f"{path}-wal")
    peak = wal.stat().st_size
    assert peak > 3 * WAL_SIZE_LIMIT
    reader.execute("COMMIT")
    reader.close()
    for _ in range(2):  # a commit that checkpoints (SQLite's automatic one), one that starts the WAL afresh
        with db.transaction() as conn:
            conn.execute("DELETE FROM ballast WHERE rowid = (SELECT min(rowid) FROM ballast)")
    assert wal.stat().st_size <= WAL_SIZE_LIMIT, (peak, wal.stat().st_size)


def _ct(uid: int) -> Instance:
    return Instance(
        sop_instance_uid=f"1.2.3.{uid}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.9",
        series_instance_uid="1.2.8", patient_id="P", patient_name="N", study_date="", accession_number="",
        modality="CT", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="M", called_ae="EDGE", source_ip="127.0.0.1",
        size=1, sha256=str(uid), path=f"/cache/{uid}.dcm", received_at=100.0,
        decision=json.dumps({"status": "routed"}))


def test_what_was_in_flight_when_its_destination_was_moved_follows_unless_delivered(tmp_path: Path) -> None:
    """``appliance move old new`` while old's worker sends a claimed batch: what it delivers
    stays old's history; what it lets go of undelivered — put back, failed, given up, or left
    in flight by a stop — starts over at new, not back at old where nothing sends it. An
    instance new already has stays with old, as the move leaves it."""
    db = Database(tmp_path / "appliance.db")
    for uid in range(6):
        db.store_instance(_ct(uid), None, [Delivery("old")] + ([Delivery("new")] if uid == 5 else []))
    batch = db.claim("old", db.schedule_now() + 10**9, 10)
    assert len(batch) == 6
    assert db.move_queue("old", "new") == MovedQueue(moved=0, kept=0, following=6)
    db.finish(batch[0], "delivered", 0, None)
    db.finish(batch[1], "retry", 0xA700, "refused for now", db.schedule_now() + 60)
    db.postpone(batch[1], db.schedule_now() + 60, "old")  # its worker's backoff is old's
    db.finish(batch[2], "dead", 0xA900, "refused")
    db.unclaim([batch[3], batch[5]])
    db.close()
    db = Database(tmp_path / "appliance.db")  # the box stopped with batch[4] in flight
    db.requeue_in_flight()
    rows = {(r["sop_instance_uid"], r["destination"]): (r["state"], r["attempts"], r["deferred"]) for r in db.query(
        "SELECT i.sop_instance_uid, d.destination, d.state, d.attempts, d.deferred FROM deliveries d"
        " JOIN instances i ON i.id = d.instance_id")}
    assert rows == {("1.2.3.0", "old"): ("delivered", 1, 0), ("1.2.3.1", "new"): ("pending", 0, 0),
                    ("1.2.3.2", "new"): ("pending", 0, 0), ("1.2.3.3", "new"): ("pending", 0, 0),
                    ("1.2.3.4", "new"): ("pending", 0, 0), ("1.2.3.5", "old"): ("pending", 0, 0),
                    ("1.2.3.5", "new"): ("pending", 0, 0)}
    assert not db.query("SELECT 1 FROM deliveries WHERE moved_to IS NOT NULL")
    assert {w.sop_instance_uid for w in db.claim("new", db.schedule_now() + 1, 10)} == {
        "1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5"}
    db.close()
