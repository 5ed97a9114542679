"""The destination's retry policy gives up: after ``max_attempts`` attempts, or once a queued
instance is older than ``give_up_after`` — then it is a dead letter with the reason, and
``appliance retry`` brings it back. And the cache's high watermark evicts only what is
delivered."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from .corpus import Series, write_series
from .pacs import (
    RecordingSCP,
    as_status,
    attempts,
    cache_rows,
    closed_port,
    deliveries,
    destination,
    queue_of,
    sop_uid,
    wait_until,
)
from .peers import ApplianceProcess, storescu


def test_max_attempts_then_dead_letter_then_retry(appliance_factory, tmp_path: Path) -> None:
    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("BUSYPACS", status=0xA700))  # out of resources, always
        box = appliance_factory({
            "destinations": {"busy": destination(scp.ae_title, scp.port, retry={
                "initial_delay": "0.2s", "max_delay": "0.5s", "max_attempts": 3})},
            "routes": [{"send_to": ["busy"]}],
        })
        files = write_series(tmp_path / "ct", "giveup", 1, 1, Series("CT", 1, 64, 64))
        assert not storescu(box.port, files).failed
        uid = sop_uid(files[0])

        wait_until(lambda: deliveries(box, "busy")[uid]["state"] == "dead", 30,
                   lambda: f"never given up: {dict(deliveries(box, 'busy')[uid])}")
        row = deliveries(box, "busy")[uid]
        assert row["attempts"] == 3
        assert "gave up after 3 attempts" in row["last_error"] and "0xA700" in row["last_error"]
        assert [as_status(a["status"]) for a in attempts(box, "busy")[uid]] == [0xA700] * 3

        scp.status = 0x0000
        assert "1 dead letter(s)" in box.cli("retry", "busy").stdout
        wait_until(lambda: deliveries(box, "busy")[uid]["state"] == "delivered", 30,
                   lambda: f"not delivered after retry: {dict(deliveries(box, 'busy')[uid])}")


def test_an_outage_does_not_use_up_max_attempts(appliance_factory, tmp_path: Path) -> None:
    """max_attempts gives up on an instance the PACS fails on, not on one it never reached. The
    PACS is down through many tries (``max_attempts: 2``): each try is in the history of the
    instance it would have sent first, none is counted as its attempt, nothing becomes a dead
    letter, and once the PACS is up the whole study arrives."""
    port = closed_port()
    box = appliance_factory({
        "destinations": {"down": destination("LATER", port, retry={
            "initial_delay": "0.2s", "max_delay": "0.3s", "jitter": 0, "max_attempts": 2})},
        "routes": [{"send_to": ["down"]}],
    })
    files = write_series(tmp_path / "ct", "outage-attempts", 1, 1, Series("CT", 4, 64, 64))
    assert not storescu(box.port, files).failed
    wait_until(lambda: sum(len(tried) for tried in attempts(box, "down").values()) >= 6, 30,
               lambda: f"not tried often enough: {queue_of(box, 'down')}")
    state = queue_of(box, "down")
    assert state["dead"] == 0, state
    assert all(row["attempts"] == 0 for row in deliveries(box, "down").values())
    assert all(a["outcome"] == "retry" and "refused" in a["error"]
               for tried in attempts(box, "down").values() for a in tried)

    with RecordingSCP("LATER", port=port, keep_datasets=False) as scp:
        wait_until(lambda: queue_of(box, "down")["delivered"] == len(files), 30,
                   lambda: f"not delivered once up: {queue_of(box, 'down')}")
        assert sorted(r.sop_instance_uid for r in scp.receptions()) == sorted(sop_uid(f) for f in files)
    assert all(row["attempts"] == 1 for row in deliveries(box, "down").values())


def test_give_up_after_a_duration(appliance_factory, tmp_path: Path) -> None:
    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("SLOWPACS", status=0xA700))
        box = appliance_factory({
            "destinations": {"slow": destination(scp.ae_title, scp.port, retry={
                "initial_delay": "0.3s", "max_delay": "0.5s", "give_up_after": "2s"})},
            "routes": [{"send_to": ["slow"]}],
        })
        files = write_series(tmp_path / "ct", "duration", 1, 1, Series("CT", 1, 64, 64))
        assert not storescu(box.port, files).failed
        uid = sop_uid(files[0])

        wait_until(lambda: deliveries(box, "slow")[uid]["state"] == "dead", 30,
                   lambda: f"never given up: {dict(deliveries(box, 'slow')[uid])}")
        row = deliveries(box, "slow")[uid]
        assert row["attempts"] >= 2, "it must have been retried before the duration ran out"
        assert "gave up after" in row["last_error"]
        history = attempts(box, "slow")[uid]
        assert history[-1]["at"] - row["created_at"] >= 2.0


def test_a_retried_dead_letter_keeps_its_age_and_gets_the_whole_give_up_time_again(
        appliance_factory, tmp_path: Path) -> None:
    """A destination stays down: an image gives up after ``give_up_after`` (2 s), and waits a
    while as a dead letter. ``appliance retry`` puts it back: ``appliance queue`` still shows
    how long it has waited since it was first queued (not since the retry), and the retry
    gives it the whole ``give_up_after`` again before it is a dead letter once more."""
    box = appliance_factory({
        "destinations": {"down": destination("DOWN", closed_port(), retry={
            "initial_delay": "0.2s", "max_delay": "0.3s", "give_up_after": "2s"})},
        "routes": [{"send_to": ["down"]}],
    })
    files = write_series(tmp_path / "ct", "retry-age", 1, 1, Series("CT", 1, 64, 64))
    queued = time.monotonic()
    assert not storescu(box.port, files).failed
    uid = sop_uid(files[0])
    wait_until(lambda: deliveries(box, "down")[uid]["state"] == "dead", 30,
               lambda: f"never given up: {dict(deliveries(box, 'down')[uid])}")
    time.sleep(max(0.0, queued + 5 - time.monotonic()))

    assert "1 dead letter(s)" in box.cli("retry", "down").stdout
    retried = time.monotonic()
    state = queue_of(box, "down")
    assert state["dead"] == 0, state
    assert state["oldest_pending_age"] >= 4.5, state  # since it was queued, 5 s ago
    wait_until(lambda: deliveries(box, "down")[uid]["state"] == "dead", 30,
               lambda: f"never given up again: {dict(deliveries(box, 'down')[uid])}")
    assert time.monotonic() - retried >= 1.8, "the retry did not get the whole give_up_after"
    assert len(attempts(box, "down")[uid]) >= 2 + 2


def test_a_backlog_gives_up_together_once_the_destination_has_failed_for_give_up_after(
        appliance_factory, tmp_path: Path) -> None:
    """Three studies wait for a destination that stays down. After the first failure only one
    instance at a time is tried there, but when give_up_after has passed they all become dead
    letters at the next failure, not one study (or one instance) per retry."""
    box = appliance_factory({
        "destinations": {"down": destination("DOWN", closed_port(), retry={
            "initial_delay": "0.5s", "max_delay": "0.5s", "give_up_after": "3s"})},
        "routes": [{"send_to": ["down"]}],
    })
    files = [f for study in (1, 2, 3)
             for f in write_series(tmp_path / f"s{study}", "backlog-give-up", study, 1, Series("CT", 10, 64, 64))]
    assert not storescu(box.port, files).failed
    wait_until(lambda: queue_of(box, "down")["dead"] == len(files), 15,
               lambda: f"not all given up: {queue_of(box, 'down')}")
    rows = deliveries(box, "down").values()
    assert all("gave up after" in row["last_error"] for row in rows), [row["last_error"] for row in rows]
    assert any("gave up after waiting 3 s (retry.give_up_after): " in row["last_error"] for row in rows)
    assert "are now dead letters (`appliance retry down` puts them back)" in box.log()


def test_above_high_watermark_delivered_are_evicted_oldest_first_undelivered_never(
        appliance_factory, small_disk: Path, tmp_path: Path) -> None:
    """On a real 64 MB filesystem: above ``evict_above`` the delivered instances go, oldest
    first, long before ``keep_delivered_for``; the ones whose destination is down all stay."""
    import sqlite3

    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("PACS"))
        box = appliance_factory({
            "storage": {"path": str(small_disk / "data"), "disk": {"min_free": "0%", "evict_above": "25%"}},
            "destinations": {"pacs": destination(scp.ae_title, scp.port),
                             "down": destination("DOWN", closed_port())},
            "routes": [{"when": {"SeriesNumber": 1}, "send_to": ["pacs"]},
                       {"when": {"SeriesNumber": 2}, "send_to": ["down"]}],
            "retention": {"keep_delivered_for": "1d"},
        })
        delivered = write_series(tmp_path / "s1", "evict", 1, 1, Series("CT", 20, 512, 512))
        waiting = write_series(tmp_path / "s2", "evict", 1, 2, Series("CT", 10, 512, 512))
        assert not storescu(box.port, delivered + waiting).failed
        wait_until(lambda: len(scp.stored_uids()) == 20, 30, lambda: f"delivered {len(scp.stored_uids())}")
        (small_disk / "ballast").write_bytes(b"\0" * 10_000_000)  # now above 25 % of 64 MB

        def states() -> dict[str, str]:
            with sqlite3.connect(small_disk / "data" / "appliance.db") as conn:
                return dict(conn.execute("SELECT sop_instance_uid, state FROM instances").fetchall())

        wait_until(lambda: list(states().values()).count("evicted") >= 10, 40,
                   lambda: f"not evicted: {states()}")
        now = states()
        assert all(now[sop_uid(p)] == "cached" for p in waiting), "an undelivered instance was evicted"
        evicted = [sop_uid(p) for p in delivered if now[sop_uid(p)] == "evicted"]
        kept = [sop_uid(p) for p in delivered if now[sop_uid(p)] == "cached"]
        order = [sop_uid(p) for p in delivered]
        # oldest delivered first: everything evicted was delivered before everything kept
        assert not kept or max(map(order.index, evicted)) < min(map(order.index, kept))
        files = {p.name for p in (small_disk / "data" / "cache").rglob("*.dcm")}
        # Eviction goes on while this looks: a file per instance cached before the listing, or after.
        later = list(states().values()).count("evicted")
        assert len(now) - later <= len(files) <= len(now) - len(evicted), (len(files), len(evicted), later)


def test_above_high_watermark_with_nothing_delivered_it_says_so_every_few_minutes_not_every_10_s(
        appliance_factory, small_disk: Path, tmp_path: Path) -> None:
    """A destination down for days fills the cache above ``evict_above`` with instances that
    may not be evicted. The appliance says so once, and again only every few minutes — not at
    every look (every 10 s, an indexed query), which would fill the journal."""
    import time

    box = appliance_factory({
        "storage": {"path": str(small_disk / "data"), "disk": {"min_free": "0%", "evict_above": "1%"}},
        "destinations": {"down": destination("DOWN", closed_port())},
        "routes": [{"send_to": ["down"]}],
    })
    assert not storescu(box.port, write_series(tmp_path / "ct", "stuck", 1, 1, Series("CT", 3, 512, 512))).failed

    def warnings() -> int:
        return box.log_path.read_text().count("nothing delivered is left to evict")

    wait_until(lambda: warnings() >= 1, 30, "no warning above the watermark")
    time.sleep(12)  # more than the 10 s between looks at the watermark
    assert warnings() == 1, box.log_path.read_text()[-2000:]


def test_above_high_watermark_what_is_delivered_later_is_evicted_within_seconds(
        appliance_factory, small_disk: Path, tmp_path: Path) -> None:
    """Above ``evict_above`` with nothing delivered to evict (a destination down), instances
    delivered afterwards to another destination are evicted at the next look, 10 s later —
    not after the few minutes between warnings, while the disk goes on filling."""
    import time

    with RecordingSCP("PACS", keep_datasets=False) as pacs:
        box = appliance_factory({
            "storage": {"path": str(small_disk / "data"), "disk": {"min_free": "0%", "evict_above": "1%"}},
            "destinations": {"down": destination("DOWN", closed_port()), "pacs": destination(pacs.ae_title, pacs.port)},
            "routes": [{"when": {"Modality": "CT"}, "send_to": ["pacs"]}, {"send_to": ["down"]}],
        })
        assert not storescu(box.port, write_series(tmp_path / "mr", "stuck", 1, 1, Series("MR", 3, 256, 256))).failed
        wait_until(lambda: "nothing delivered is left to evict" in box.log_path.read_text(), 30,
                   "no warning above the watermark")
        ct = write_series(tmp_path / "ct", "later", 2, 1, Series("CT", 3, 256, 256), patient="PAT002")
        assert not storescu(box.port, ct).failed
        wait_until(lambda: len(pacs.stored()) == len(ct), 20, "the CT did not reach the PACS")
        delivered_at = time.monotonic()
        paths = [Path(row["path"]) for uid, row in cache_rows(box).items() if uid in {sop_uid(p) for p in ct}]
        assert len(paths) == len(ct)
        wait_until(lambda: not any(p.exists() for p in paths), 15,
                   lambda: f"still cached {time.monotonic() - delivered_at:.0f} s after delivery")
        assert {row["state"] for uid, row in cache_rows(box).items()
                if uid in {sop_uid(p) for p in ct}} == {"evicted"}


def _delivered_cache(appliance_factory, scp: RecordingSCP, data: Path, tmp_path: Path, name: str,
                     disk: dict[str, str]) -> ApplianceProcess:
    """An appliance with these watermarks whose cache holds 40 CT (21 MB), all delivered to
    ``scp`` and kept for a day."""
    box = appliance_factory({
        "storage": {"path": str(data), "disk": disk},
        "destinations": {"pacs": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["pacs"]}],
        "retention": {"keep_delivered_for": "1d"},
    })
    files = write_series(tmp_path / "ct", name, 1, 1, Series("CT", 40, 512, 512))
    assert not storescu(box.port, files).failed
    wait_until(lambda: len(scp.stored_uids()) == len(files), 30, lambda: f"delivered {len(scp.stored_uids())}")
    return box


def test_a_disk_filled_by_something_else_is_freed_by_evicting_delivered_instances(
        appliance_factory, small_disk: Path, tmp_path: Path) -> None:
    """Something else (the print spool, logs, an admin's copy) fills the data disk to the last
    byte while the cache holds delivered instances. Evicting them takes database writes, which
    a full disk refuses: the first one removes the reserve laid down for this, eviction frees
    what it may, intake resumes, the forwarder is never restarted — and the reserve is laid
    down again."""
    import os
    import subprocess

    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
        data = small_disk / "data"
        box = _delivered_cache(appliance_factory, scp, data, tmp_path, "full", {"min_free": "5%", "evict_above": "60%"})
        assert (data / "reserve").exists()

        subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'filler'}", "bs=1M", "count=100"],
                       capture_output=True, check=False)  # until the disk is full

        def free_share() -> float:
            st = os.statvfs(small_disk)
            return st.f_bavail / st.f_blocks

        assert free_share() < 0.01
        # The filler alone is above evict_above: every delivered instance goes (a third of the disk).
        wait_until(lambda: not any((data / "cache").rglob("*.dcm")), 40,
                   lambda: f"free {free_share():.0%}; log: {box.log()[-800:]}")
        assert free_share() > 0.25
        more = write_series(tmp_path / "more", "full", 2, 1, Series("CT", 1, 512, 512), patient="PAT002")
        assert not storescu(box.port, more).failed, "intake did not resume"
        wait_until(lambda: sop_uid(more[0]) in scp.stored_uids(), 30, "the new image was not forwarded")
        log = box.log()
        assert "the disk is full: removed the 1 MiB reserve" in log
        assert "died with exit code" not in log and "exiting, to be started again" not in log, log[-2000:]
        wait_until(lambda: (data / "reserve").exists(), 30, "the reserve was not laid down again")


def test_a_min_free_above_the_room_evict_above_leaves_still_lets_intake_resume(
        appliance_factory, small_disk: Path, tmp_path: Path) -> None:
    """``min_free: 30%`` with ``evict_above: 80%``: intake stops at 70 % used, eviction began
    only above 80 %. With the cache full of delivered instances every new image was refused
    (0xA700) until their retention ran out, a day later. Delivered instances now go once the
    disk comes near the point where intake stops, and intake resumes by itself."""
    import os

    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
        data = small_disk / "data"
        box = _delivered_cache(appliance_factory, scp, data, tmp_path, "gap", {"min_free": "30%", "evict_above": "80%"})
        st = os.statvfs(small_disk)
        total, used = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bavail) * st.f_frsize
        (small_disk / "ballast").write_bytes(b"\0" * int(0.76 * total - used))  # between 70 % and 80 % used
        more = write_series(tmp_path / "more", "gap", 2, 1, Series("CT", 1, 512, 512), patient="PAT002")

        def accepted() -> bool:
            # -td: a poll that got no answer (as a C-STORE served before its association was
            # marked established did: test_pdata) costs 5 s, not the box's 60 s network timeout.
            return bool(storescu(box.port, more, extra=["-td", "5"]).succeeded)

        wait_until(accepted, 60, lambda: f"intake still refused; log: {box.log()[-800:]}")
        assert "evicted" in box.log() and "delivered instance(s) from the cache" in box.log()
        wait_until(lambda: sop_uid(more[0]) in scp.stored_uids(), 30, "the new image was not forwarded")
