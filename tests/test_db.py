"""The database's writers: one at a time, across processes, queued on the file lock."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from appliance.db import WAL_SIZE_LIMIT, Database


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
