"""The cache's files against the database that points at them, in one process with real files:
a resend of identical content while eviction runs, a study directory removed under a new
arrival, eviction above the watermark after the wall clock went back, and a data directory
reached by another path at start-up. Each is an acknowledged instance that must not lose its
file."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from appliance.config import loads
from appliance.db import Database, open_database
from appliance.forwarder import Forwarder
from appliance.intake import Intake, Outcome
from appliance.rules import Origin
from appliance.store import Store

from .corpus import Series, write_series
from .pacs import RecordingSCP, destination, queue_of, wait_until
from .peers import storescu

ORIGIN = Origin("MODALITY", "EDGE", "127.0.0.1")


class Box:
    """A cache, its database and intake, routed to one destination nobody listens on."""

    def __init__(self, root: Path, evict_above: str = "90%", on_duplicate: str = "replace") -> None:
        self.config = loads(f"storage: {{path: {root}, disk: {{min_free: '0%', evict_above: '{evict_above}'}}}}\n"
                            f"node: {{on_duplicate: {on_duplicate}}}\n"
                            "destinations: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 9}}\n"
                            "routes: [{send_to: [pacs]}]\nretention: {keep_delivered_for: 30d}\n")
        self.store = Store(root)
        self.store.prepare()
        self.db = open_database(root)
        self.intake = Intake(self.config, self.db, self.store)

    def receive(self, source: Path, only_to: str | None = None) -> Outcome:
        received = self.store.incoming / f"rx-{time.monotonic_ns()}"
        shutil.copyfile(source, received)
        outcome = self.intake.admit(received, ORIGIN, only_to=only_to)
        received.unlink(missing_ok=True)
        return outcome

    def deliver_all(self) -> None:
        while works := self.db.claim("pacs", self.db.schedule_now() + 10**6, 100):
            for work in works:
                self.db.finish(work, "delivered", 0, None, self.db.schedule_now())

    def row(self, sop_uid: str) -> tuple[str, str, list[str]]:
        """The instance's state, path, and its deliveries' states."""
        state, path, instance_id = self.db.query(
            "SELECT state, path, id FROM instances WHERE sop_instance_uid = ?", (sop_uid,))[0]
        deliveries = [r[0] for r in self.db.query("SELECT state FROM deliveries WHERE instance_id = ?",
                                                  (instance_id,))]
        return str(state), str(path), deliveries


def evict(db: Database, store: Store, found: list[tuple[int, str]]) -> None:
    """What Forwarder.evict does with what Database.evictable found."""
    for instance_id, path in found:
        if db.mark_evicted(instance_id, path):
            store.discard(Path(path))


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return write_series(tmp_path / "ct", "store", 1, 1, Series("CT", 1, 32, 32))[0]


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_resend_of_identical_content_while_eviction_looks_keeps_its_file(tmp_path: Path, ct: Path) -> None:
    """Eviction has found the delivered instance; the modality sends it again (acknowledged,
    to be delivered again); then eviction goes on with what it found."""
    box = Box(tmp_path / "data")
    assert box.receive(ct).kind == "stored"
    box.deliver_all()
    found = box.db.evictable(time.time() + 1)
    assert len(found) == 1
    assert box.receive(ct).kind == "replaced"
    evict(box.db, box.store, found)
    state, path, deliveries = box.row(_uid(ct))
    assert (state, deliveries) == ("cached", ["pending"])
    assert Path(path).is_file(), "the acknowledged resend's file was removed by eviction"


def test_a_resend_of_identical_content_just_after_an_eviction_keeps_its_file(tmp_path: Path, ct: Path) -> None:
    """Eviction has committed; the modality sends the instance again (stored anew); then
    eviction removes the file it evicted."""
    box = Box(tmp_path / "data")
    assert box.receive(ct).kind == "stored"
    box.deliver_all()
    (instance_id, old), = box.db.evictable(time.time() + 1)
    assert box.db.mark_evicted(instance_id, old)
    assert box.receive(ct).kind == "stored"
    box.store.discard(Path(old))
    state, path, deliveries = box.row(_uid(ct))
    assert (state, deliveries) == ("cached", ["pending"])
    assert Path(path).is_file(), "the acknowledged resend's file was removed by eviction"


def test_eviction_rechecks_that_nothing_is_owed_when_it_commits(tmp_path: Path, ct: Path) -> None:
    """Found evictable, then owed again (``appliance send --to`` queues a delivery without a
    new file): the row is not marked evicted."""
    box = Box(tmp_path / "data")
    assert box.receive(ct).kind == "stored"
    box.deliver_all()
    (instance_id, path), = box.db.evictable(time.time() + 1)
    with box.db.transaction() as conn:
        conn.execute("UPDATE deliveries SET state = 'pending' WHERE instance_id = ?", (instance_id,))
    assert not box.db.mark_evicted(instance_id, path)
    assert box.row(_uid(ct))[0] == "cached"


def test_send_to_of_a_kept_copy_evicted_meanwhile_caches_the_copy_it_has(tmp_path: Path, ct: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance send --to` under ``on_duplicate: keep-first`` queues the cached copy; evicted
    between the look-up and the queuing, the row must not come back pointing at the removed
    file: the copy being sent is cached instead."""
    box = Box(tmp_path / "data", on_duplicate="keep-first")
    assert box.receive(ct).kind == "stored"
    box.deliver_all()
    found = box.db.evictable(time.time() + 1)
    look_up = box.db.find_instance

    def evicted_after_the_look_up(sop_uid: str):  # type: ignore[no-untyped-def]
        cached = look_up(sop_uid)
        evict(box.db, box.store, found)
        return cached

    monkeypatch.setattr(box.db, "find_instance", evicted_after_the_look_up)
    assert box.receive(ct, only_to="pacs").kind == "stored"
    state, path, deliveries = box.row(_uid(ct))
    assert (state, deliveries) == ("cached", ["pending"])
    assert Path(path).is_file(), "the row points at the evicted file"


def test_a_study_directory_removed_under_a_new_arrival_is_made_again(tmp_path: Path, ct: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Eviction removes a study's last file, and its directory, between intake finding the
    directory and renaming the new file into it: the arrival is stored, not refused."""
    box = Box(tmp_path / "data")
    others = write_series(tmp_path / "more", "store", 1, 1, Series("CT", 2, 32, 32))
    assert box.receive(others[0]).kind == "stored"
    study_dir = next(p for p in box.store.cache.iterdir() if p.is_dir())
    real_replace = os.replace
    evictions = []

    def evicted_meanwhile(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == study_dir and not evictions:
            evictions.append(dst)
            for entry in study_dir.iterdir():
                entry.unlink()
            study_dir.rmdir()
        real_replace(src, dst)

    monkeypatch.setattr("appliance.store.os.replace", evicted_meanwhile)
    assert box.receive(others[1]).kind == "stored"
    assert Path(box.row(_uid(others[1]))[1]).is_file()


def test_above_the_watermark_eviction_goes_on_after_the_wall_clock_went_back(tmp_path: Path, ct: Path) -> None:
    """Delivered instances carry wall-clock delivery times; a clock set back an hour (an admin,
    or NTP correcting a clock that ran ahead) must not make them unevictable while the disk
    fills."""
    box = Box(tmp_path / "data", evict_above="1%")  # this disk is above 1 % used
    assert box.receive(ct).kind == "stored"
    box.deliver_all()
    forwarder = Forwarder(box.config, box.db, box.store)
    assert forwarder.evict(time.time() - 3600) == 1
    assert box.row(_uid(ct))[0] == "evicted"


def test_a_data_directory_reached_by_another_path_keeps_its_cache(appliance_factory, tmp_path: Path,
                                                                  ct: Path) -> None:
    """The same data directory through a symlink (or moved, and storage.path edited): start-up
    neither removes its files as unknown nor leaves the rows pointing at the old path, and
    what was queued is still sent."""
    scp = RecordingSCP("PACS")
    box = appliance_factory({"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["pacs"]}]})
    assert not storescu(box.port, [ct]).failed
    box.stop()
    moved = tmp_path / "moved"
    box.data.rename(moved)
    (tmp_path / "link").symlink_to(moved)
    config = yaml.safe_load(box.config_path.read_text())
    config["storage"]["path"] = str(tmp_path / "link")
    box.write_config(config)
    box.data = tmp_path / "link"
    with scp:
        box.start()
        wait_until(lambda: scp.stored_uids(), 30, lambda: f"not delivered: {queue_of(box, 'pacs')}")
    assert "unindexed" not in box.log()
    assert "1 cached instance(s) were recorded under another path of the data directory" in box.log()
    assert list((moved / "cache").rglob("*.dcm")), "the cached file was removed"


def test_a_claimed_file_replaced_by_a_new_version_is_no_dead_letter(tmp_path: Path, ct: Path) -> None:
    """The forwarder finds the file it claimed gone. A new version of the instance removed it
    (``on_duplicate: replace``) and queued the delivery for itself: no dead letter, nothing
    recorded. A file the cache lost otherwise is a dead letter with the reason."""
    import pydicom

    box = Box(tmp_path / "data")
    forwarder = Forwarder(box.config, box.db, box.store)
    assert box.receive(ct).kind == "stored"
    [old] = box.db.claim("pacs", box.db.schedule_now() + 10**6, 10)
    corrected = pydicom.dcmread(ct)
    corrected.PatientName = "CORRECTED^NAME"
    corrected.save_as(tmp_path / "corrected.dcm")
    assert box.receive(tmp_path / "corrected.dcm").kind in ("stored", "replaced")
    assert not Path(old.path).exists()
    assert forwarder._missing("pacs", old, FileNotFoundError(2, "No such file or directory", old.path)) == "replaced"
    state, path, deliveries = box.row(_uid(ct))
    assert deliveries == ["pending"] and path != old.path
    assert box.db.query("SELECT count(*) FROM attempts")[0][0] == 0

    [new] = box.db.claim("pacs", box.db.schedule_now() + 10**6, 10)
    Path(new.path).unlink()  # lost: a disk error, someone's rm
    assert forwarder._missing("pacs", new, FileNotFoundError(2, "No such file or directory", new.path)) == "dead"
    assert box.row(_uid(ct))[2] == ["dead"]
