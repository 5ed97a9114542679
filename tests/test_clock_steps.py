"""The wall clock steps under a running appliance, as it does on a box without a battery-backed
clock (a Raspberry Pi boots at the time it last saved, and NTP steps it forward once the VPN is
up — by days for a field unit that sat on a shelf) or when an admin sets it back. Retries,
stable-study timers and give-up ages keep their real durations: a step back stalls nothing, a
step forward gives nothing up and releases no study early.

The appliance's processes read a stepped wall clock through ``tests/wallclock`` (an LD_PRELOAD
library); the machine's clock, and every peer's, is left alone.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

from .corpus import Series, write_series
from .pacs import RecordingSCP, attempts, deliveries, destination, queue, sop_uid, wait_until
from .peers import free_port, storescu
from .wallclock import WallClock

DAY = 86400.0


def test_a_step_back_of_a_day_neither_stalls_a_retry_nor_a_stable_study(appliance_factory, tmp_path: Path) -> None:
    """A destination that is down has an instance waiting out its 2 s backoff, and another
    destination holds a study for ``stable_after: 3s``, when the clock steps back a day. Once the
    first destination listens, the instance is delivered within seconds, and the study is
    released about 3 s after its last instance — not a day later."""
    clock = WallClock(tmp_path / "clock")
    down_port = free_port()
    with ExitStack() as stack:
        stable = stack.enter_context(RecordingSCP("STABLE", keep_datasets=False))
        box = appliance_factory({
            "destinations": {
                "down": destination("DOWN", down_port, retry={"initial_delay": "2s", "max_delay": "2s", "jitter": 0}),
                "stable": destination(stable.ae_title, stable.port),
            },
            "routes": [{"when": {"Modality": "CT"}, "send_to": ["down"]},
                       {"when": {"Modality": "MR"}, "send_to": ["stable"], "stable_after": "3s"}],
        }, env=clock.env)
        ct = write_series(tmp_path / "ct", "step-back", 1, 1, Series("CT", 1, 64, 64))
        mr = write_series(tmp_path / "mr", "step-back", 1, 2, Series("MR", 4, 64, 64))  # instances of their own
        assert not storescu(box.port, ct).failed
        uid = sop_uid(ct[0])
        wait_until(lambda: uid in attempts(box, "down"), 20, "the down destination was never tried")

        assert not storescu(box.port, mr).failed
        last_mr = time.time()
        clock.step(-DAY)
        up = stack.enter_context(RecordingSCP("DOWN", port=down_port, keep_datasets=False))
        wait_until(lambda: len(up.stored()) == 1, 20,
                   lambda: f"the retry stalled after the clock stepped back: {dict(deliveries(box, 'down')[uid])}")
        wait_until(lambda: len(stable.stored()) == len(mr), 20,
                   lambda: f"the stable study stalled after the clock stepped back: {queue(box)['holds']}")
        released = stable.stored()[0].at - last_mr
        assert 3 - 0.5 <= released <= 6, f"released {released:.1f} s after its last instance"


def test_a_step_forward_of_eight_days_gives_nothing_up(appliance_factory, tmp_path: Path) -> None:
    """The default retry policy never gives up before 7 days. An instance waits for a
    destination that is down; the clock steps 8 days forward (a box that sat a week switched
    off, meeting NTP); the next attempts fail too, and it is still pending, not a dead letter.
    Once the destination listens it is delivered."""
    clock = WallClock(tmp_path / "clock")
    down_port = free_port()
    with ExitStack() as stack:
        box = appliance_factory({
            "destinations": {"down": destination("DOWN", down_port, retry={
                "initial_delay": "0.5s", "max_delay": "1s", "jitter": 0, "give_up_after": "7d"})},
            "routes": [{"send_to": ["down"]}],
        }, env=clock.env)
        files = write_series(tmp_path / "ct", "step-forward", 1, 1, Series("CT", 1, 64, 64))
        assert not storescu(box.port, files).failed
        uid = sop_uid(files[0])
        wait_until(lambda: uid in attempts(box, "down"), 20, "the down destination was never tried")

        clock.step(8 * DAY)
        tried = len(attempts(box, "down")[uid])
        wait_until(lambda: len(attempts(box, "down")[uid]) >= tried + 2
                   or deliveries(box, "down")[uid]["state"] == "dead", 20, "no attempt after the step")
        row = deliveries(box, "down")[uid]
        assert row["state"] in ("pending", "in_flight"), f"given up after the clock stepped forward: {dict(row)}"
        # What the queue reports as the oldest pending age is real time, not eight days.
        age = next(d for d in queue(box)["destinations"] if d["name"] == "down")["oldest_pending_age"]
        assert age < 60, f"oldest pending age {age:.0f} s"

        up = stack.enter_context(RecordingSCP("DOWN", port=down_port, keep_datasets=False))
        wait_until(lambda: len(up.stored()) == 1, 20, lambda: f"not delivered: {dict(deliveries(box, 'down')[uid])}")


def test_an_association_held_open_between_images_survives_a_step_forward(appliance_factory, tmp_path: Path) -> None:
    """A modality that keeps its association open through an exam (an ultrasound unit) sends an
    image, the clock steps eight days forward, and its next image is stored on the same
    association: the network timeout measures idle time on the monotonic clock, so the step does
    not look like eight idle days."""
    clock = WallClock(tmp_path / "clock")
    box = appliance_factory({"node": {"timeouts": {"network": "60s"}}}, env=clock.env)
    files = write_series(tmp_path / "us", "held-open", 1, 1, Series("US", 2, 64, 64))
    ae = AE(ae_title="ULTRASOUND")
    ae.add_requested_context(UltrasoundImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title=box.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0x0000
        time.sleep(0.5)
        clock.step(8 * DAY)
        time.sleep(1.0)  # the appliance's association loop looks at its timers every 20 ms
        assert assoc.is_established, "the appliance aborted the association when its clock stepped"
        status = assoc.send_c_store(pydicom.dcmread(files[1]))
        assert getattr(status, "Status", None) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
