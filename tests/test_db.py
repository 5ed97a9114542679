"""The database's writers: one at a time, across processes, queued on the file lock."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from appliance.db import Database


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
