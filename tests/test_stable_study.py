"""``stable_after``: a study is forwarded only once no new instance of it has arrived for the
rule's window — whole, on one association — and what arrives after that goes out as a
follow-up without resending anything. The timer is per study and per destination, is visible in
``appliance queue``, and lives in the database: a restart neither loses it nor starts it over.

The destination is a recording pynetdicom SCP, which notes the association and the time of each
C-STORE. Timings are checked with generous margins: these are correctness checks, not benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pydicom
import pytest

from .corpus import Series, write_series
from .pacs import RecordingSCP, destination, queue, sop_uid, wait_until
from .peers import ApplianceProcess, storescu


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as peers:
        yield peers


def send(box: ApplianceProcess, files: list[Path]) -> float:
    """Send with storescu; every file must be acknowledged. Returns when the last one was (time.time())."""
    result = storescu(box.port, files)
    assert result.returncode == 0 and len(result.succeeded) == len(files) and not result.failed, result.output
    return time.time()


def holds(box: ApplianceProcess, study: str) -> dict[str, dict[str, Any]]:
    """The study's entries in ``appliance queue --json`` ``holds``, by destination."""
    return {h["destination"]: h for h in queue(box)["holds"] if h["study_instance_uid"] == study}


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_study_in_two_bursts_goes_out_once_whole_on_one_association_then_follow_up(appliance_factory, stack,
                                                                                 tmp_path) -> None:
    """Two bursts 2 s apart with ``stable_after: 4s``: nothing leaves until 4 s after the second;
    then all twelve go on one association in arrival order. Three more instances of the study
    afterwards are forwarded as a follow-up; nothing is sent twice."""
    scp = stack.enter_context(RecordingSCP("STABLE", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(scp.ae_title, scp.port)},
        "routes": [{"when": {"Modality": "CT"}, "send_to": ["central"], "stable_after": "4s"}],
    })
    files = write_series(tmp_path / "ct", "stable", 1, 1, Series("CT", 15, 64, 64))
    first, second, late = files[:6], files[6:12], files[12:]
    study = study_uid(files[0])

    send(box, first)
    time.sleep(2)
    last = send(box, second)
    hold = holds(box, study)["central"]
    assert hold["state"] == "waiting"
    assert last + 4 - 1.5 <= hold["release_at"] <= last + 4 + 1.5, (hold, last)
    held = next(d for d in queue(box)["destinations"] if d["name"] == "central")["held"]
    assert held == len(first) + len(second)
    table = box.cli("queue").stdout
    assert any(study in line and "central" in line for line in table.splitlines()), table  # the waiting study is listed

    time.sleep(max(0.0, last + 2.5 - time.time()))
    assert scp.receptions() == [], "released before the study was quiet for 4 s"

    wait_until(lambda: len(scp.stored()) >= 12, 15, lambda: f"not released: {queue(box)}")
    released = scp.stored()
    assert released[0].at >= last + 4 - 0.5, f"released {released[0].at - last:.1f} s after the last instance"
    assert len({r.association for r in released}) == 1, "the release used more than one association"
    assert [r.sop_instance_uid for r in released] == [sop_uid(p) for p in first + second]
    wait_until(lambda: holds(box, study)["central"]["state"] == "released", 10, lambda: str(holds(box, study)))

    send(box, late)
    wait_until(lambda: len(scp.stored()) >= len(files), 20, lambda: f"follow-up not sent: {queue(box)}")
    time.sleep(1)
    assert scp.stored_uids() == {sop_uid(p): 1 for p in files}, "an instance was lost or resent"


def test_stability_timer_is_per_destination(appliance_factory, stack, tmp_path) -> None:
    """One study, two rules: ``fast`` waits 1 s, ``slow`` 5 s. ``fast`` gets the study while
    ``slow`` still holds it."""
    fast = stack.enter_context(RecordingSCP("FAST", keep_datasets=False))
    slow = stack.enter_context(RecordingSCP("SLOW", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"fast": destination(fast.ae_title, fast.port),
                         "slow": destination(slow.ae_title, slow.port)},
        "routes": [
            {"when": {"Modality": "CT"}, "send_to": ["fast"], "stable_after": "1s", "continue": True},
            {"when": {"Modality": "CT"}, "send_to": ["slow"], "stable_after": "5s"},
        ],
    })
    files = write_series(tmp_path / "ct", "per-destination", 1, 1, Series("CT", 5, 64, 64))
    last = send(box, files)
    wait_until(lambda: len(fast.stored()) >= len(files), 10, lambda: f"fast not released: {queue(box)}")
    assert slow.receptions() == []
    waiting = holds(box, study_uid(files[0]))["slow"]
    assert waiting["state"] == "waiting" and waiting["held"] == len(files)
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (waiting["patient_name"], waiting["patient_id"]) == (str(patient.PatientName), patient.PatientID)
    assert f"{patient.PatientName} ({patient.PatientID}), {len(files)} instance(s) of" in box.cli("queue").stdout
    wait_until(lambda: len(slow.stored()) >= len(files), 15, lambda: f"slow not released: {queue(box)}")
    assert slow.stored()[0].at >= last + 5 - 0.5
    assert fast.stored()[-1].at < slow.stored()[0].at


def test_restart_while_a_study_waits_keeps_its_timer(appliance_factory, stack, tmp_path) -> None:
    """``stable_after: 8s``; the appliance is killed 4 s after the last instance and restarted
    (which takes about a second, more on a loaded machine: the window leaves it 4 s). The
    study is released about 8 s after its last instance — not 8 s after the restart — and its
    release time is the same before and after the restart."""
    scp = stack.enter_context(RecordingSCP("RESTART", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["central"], "stable_after": "8s"}],
    })
    files = write_series(tmp_path / "ct", "restart", 1, 1, Series("CT", 8, 64, 64))
    study = study_uid(files[0])
    last = send(box, files)
    before = holds(box, study)["central"]
    assert before["state"] == "waiting"

    time.sleep(4)
    box.kill()
    box.start()
    after = holds(box, study)["central"]
    assert after["state"] == "waiting" and abs(after["release_at"] - before["release_at"]) < 0.01, (before, after)

    wait_until(lambda: len(scp.stored()) >= len(files), 20, lambda: f"not released after restart: {queue(box)}")
    delay = scp.stored()[0].at - last
    # A timer started over at the restart would release at about 4 + start-up + 8 >= 12.5 s.
    assert 8 - 0.5 <= delay <= 10.5, f"released {delay:.1f} s after the last instance"
    assert scp.stored_uids() == {sop_uid(p): 1 for p in files}
    assert len({r.association for r in scp.stored()}) == 1


def test_a_shorter_window_of_another_rule_does_not_release_the_study_early(appliance_factory, stack,
                                                                           tmp_path) -> None:
    """Two rules hold the same study for the same destination, CT for 6 s and its other images
    for 1 s: the study waits the longer window after its last instance, and goes out whole."""
    scp = stack.enter_context(RecordingSCP("STABLE", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(scp.ae_title, scp.port)},
        "routes": [{"when": {"Modality": "CT"}, "send_to": ["central"], "stable_after": "6s", "continue": True},
                   {"when": {"Modality": "OT"}, "send_to": ["central"], "stable_after": "1s"}],
    })
    ct = write_series(tmp_path / "ct", "windows", 1, 1, Series("CT", 4, 64, 64))
    other = write_series(tmp_path / "ot", "windows", 1, 2, Series("OT", 1, 64, 64))
    assert study_uid(ct[0]) == study_uid(other[0])
    send(box, ct)
    last = send(box, other)
    wait_until(lambda: len(scp.stored()) >= len(ct) + len(other), 20, lambda: f"queue: {queue(box)}")
    stored = scp.stored()
    assert min(r.at for r in stored) >= last + 6 - 1.0, "released on the shorter window"
    assert len({r.association for r in stored}) == 1


def test_an_instance_without_a_window_waits_with_its_held_study(appliance_factory, stack, tmp_path) -> None:
    """A default rule sends everything to the destination at once, a CT rule holds CT studies
    for 4 s: an image of a held CT study that only the default rule matches waits with the
    study and goes out with it — not ahead of it, which would send the study in pieces."""
    scp = stack.enter_context(RecordingSCP("STABLE", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(scp.ae_title, scp.port)},
        "routes": [{"when": {"Modality": "CT"}, "send_to": ["central"], "stable_after": "4s"},
                   {"send_to": ["central"]}],
    })
    ct = write_series(tmp_path / "ct", "unheld", 1, 1, Series("CT", 4, 64, 64))
    other = write_series(tmp_path / "ot", "unheld", 1, 2, Series("OT", 1, 64, 64))
    send(box, ct)
    last = send(box, other)
    wait_until(lambda: len(scp.stored()) >= len(ct) + len(other), 20, lambda: f"queue: {queue(box)}")
    stored = scp.stored()
    assert min(r.at for r in stored) >= last + 4 - 1.0, "an image of the held study went out ahead of it"
    assert [r.sop_instance_uid for r in stored] == [sop_uid(p) for p in ct + other]
    assert len({r.association for r in stored}) == 1
