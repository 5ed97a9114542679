"""A destination given by host name, whose name cannot be resolved while the VPN (and the
clinic's DNS behind it) is down: its instances wait with the reason and the destination's
backoff, the other destinations go on, and once the name resolves again everything is
delivered once. The DNS is ``tests/resolver`` (an LD_PRELOAD library: no query leaves the
machine)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from .corpus import Series, write_series
from .pacs import RecordingSCP, attempts, deliveries, destination, queue_of, sop_uid, wait_until
from .peers import storescu
from .resolver import Resolver
from .test_processes import forwarder_pid


def test_a_destination_whose_name_does_not_resolve_waits_and_blocks_nobody(appliance_factory, tmp_path: Path) -> None:
    resolver = Resolver(tmp_path / "dns", {"pacs.clinic.test": "127.0.0.1"})
    resolver.set_up(False)
    with ExitStack() as stack:
        central = stack.enter_context(RecordingSCP("CENTRAL", keep_datasets=False))
        local = stack.enter_context(RecordingSCP("LOCAL", keep_datasets=False))
        central_entry = destination(central.ae_title, central.port)
        central_entry["host"] = "pacs.clinic.test"
        box = appliance_factory({
            "destinations": {"central": central_entry, "local": destination(local.ae_title, local.port)},
            "routes": [{"send_to": ["central", "local"]}],
        }, env=resolver.env)
        assert box.process is not None
        forwarder = forwarder_pid(box.process.pid)
        files = write_series(tmp_path / "ct", "unresolvable", 1, 1, Series("CT", 3, 64, 64))
        assert not storescu(box.port, files).failed
        uids = {sop_uid(f) for f in files}

        # The other destination is served while the name does not resolve...
        wait_until(lambda: local.stored_uids().keys() == uids, 20, lambda: f"local got {local.stored_uids()}")
        # ...and this one waits, retried with its backoff (one instance at a time after the
        # first failure) and the reason recorded.
        # (Tries that reach no PACS are in the history, not among an instance's attempts.)
        wait_until(lambda: sum(len(tried) for tried in attempts(box, "central").values()) >= 3, 20,
                   lambda: f"not retried: {[dict(r) for r in deliveries(box, 'central').values()]}")
        for row in deliveries(box, "central").values():
            assert row["state"] in ("pending", "in_flight"), dict(row)
        last_error = queue_of(box, "central")["last_error"] or ""
        assert "cannot resolve or reach pacs.clinic.test" in last_error, last_error
        assert "Temporary failure in name resolution" in last_error, last_error
        assert forwarder_pid(box.process.pid) == forwarder, "the forwarder restarted"
        assert "to be started again" not in box.log_path.read_text()

        resolver.set_up(True)
        wait_until(lambda: central.stored_uids().keys() == uids, 20,
                   lambda: f"central: {[dict(r) for r in deliveries(box, 'central').values()]}")
        assert central.stored_uids() == {uid: 1 for uid in uids}
        assert local.stored_uids() == {uid: 1 for uid in uids}
