"""The forwarder is nudged when work is queued, instead of finding it at its next poll."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from appliance import config as configuration
from appliance import forwarder as forwarding
from appliance import wakeup
from appliance.db import Database
from appliance.intake import Intake
from appliance.rules import Origin
from appliance.store import Store

from .corpus import Series, write_series
from .pacs import RecordingSCP
from .peers import free_port


def test_a_nudge_reaches_the_listener_of_the_same_data_directory(tmp_path: Path) -> None:
    heard = threading.Event()
    other = threading.Event()
    listener = wakeup.Listener(tmp_path / "a", heard.set)
    elsewhere = wakeup.Listener(tmp_path / "b", other.set)
    assert listener.start() and elsewhere.start()
    try:
        assert not wakeup.Listener(tmp_path / "a", heard.set).start()  # one forwarder per directory
        wakeup.Nudger(tmp_path / "a").nudge()
        assert heard.wait(5)
        assert not other.wait(0.2)
    finally:
        listener.stop(), elsewhere.stop()


def test_a_nudge_with_nobody_listening_is_harmless(tmp_path: Path) -> None:
    nudger = wakeup.Nudger(tmp_path)
    for _ in range(3):
        nudger.nudge()
    nudger.close()


def test_intake_nudges_an_idle_forwarder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With polling slowed to 60 s, an instance received while the forwarder idles is still on
    its way at once."""
    monkeypatch.setattr(forwarding, "POLL", 60.0)
    with RecordingSCP() as scp:
        config = configuration.loads(
            f"node: {{ae_title: EDGE, bind_address: 127.0.0.1, port: {free_port()}}}\n"
            f"storage: {{path: {tmp_path / 'data'}, disk: {{min_free: 0%}}}}\n"
            f"destinations: {{pacs: {{ae_title: RECORDER, host: 127.0.0.1, port: {scp.port}}}}}\n"
            "routes: [{send_to: [pacs]}]\n"
        )
        store = Store(config.storage.root)
        store.prepare()
        db = Database(config.storage.root / "appliance.db")
        forwarder = forwarding.Forwarder(config, db, store)
        forwarder.start()
        try:
            time.sleep(1.0)  # the workers have looked at the empty queue and sleep
            source = write_series(tmp_path / "in", "nudge", 1, 1, Series("CT", 1, 16, 16))[0]
            received = store.incoming / "one.dcm"
            shutil.copyfile(source, received)
            outcome = Intake(config, db, store).admit(received, Origin("MODALITY", "EDGE", "127.0.0.1"))
            assert outcome.kind == "stored"
            deadline = time.monotonic() + 20
            while not scp.stored() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(scp.stored()) == 1
        finally:
            forwarder.stop(timeout=5)
            db.close()
