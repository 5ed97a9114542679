"""Forwarding, proven against real peers: DCMTK's storescu as the modality, the appliance as a
separate process, and as destinations Orthanc (checked over its REST API), DCMTK's storescp and a
recording pynetdicom SCP that answers the statuses a test asks for.

What a user relies on: every acknowledged instance reaches every destination its rules name —
with the rule's tag edits, in a transfer syntax the destination accepts — through PACS outages
and appliance crashes, without a slow or dead destination holding up intake or the others; and
the queue, the dead letters and the cache are visible and manageable from the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from .conftest import mounted_tmpfs
from .corpus import Series, write_series
from .pacs import (
    ABORT,
    Blackhole,
    Orthanc,
    ReadingSCP,
    RecordingSCP,
    StoreSCP,
    as_status,
    attempts,
    cache_rows,
    closed_port,
    deliveries,
    destination,
    queue,
    queue_of,
    sop_uid,
    wait_until,
)
from .peers import (
    DCMTK_ENV,
    ApplianceProcess,
    StoreResult,
    free_port,
    parse_storescu,
    read_until_acknowledged,
    require_tool,
    storescu,
)

# storescu proposes one compressed family per run; these flags add the one a file needs.
_STORESCU_FLAGS = {
    "1.2.840.10008.1.2.5": ["-xr"],  # RLE Lossless
    "1.2.840.10008.1.2.4.80": ["-xt"],  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": ["-xv"],  # JPEG 2000 Lossless
}


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Peers entered here are stopped at the end of the test, whatever happened."""
    with ExitStack() as peers:
        yield peers


@pytest.fixture
def orthanc(tmp_path: Path, stack: ExitStack) -> Orthanc:
    return stack.enter_context(Orthanc(tmp_path / "orthanc"))


def send(box: ApplianceProcess, files: list[Path]) -> StoreResult:
    """Send files to the appliance with storescu (one run per transfer syntax family) and
    require that every one was acknowledged with success."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(syntax, []).append(path)
    total = StoreResult(0, "")
    for syntax, group in groups.items():
        result = storescu(box.port, group, extra=_STORESCU_FLAGS.get(syntax, []))
        assert result.returncode == 0 and not result.failed and len(result.succeeded) == len(group), result.output
        total.succeeded += result.succeeded
        total.output += result.output
    return total


def edit_config(box: ApplianceProcess, **sections: Any) -> None:
    """Rewrite sections of the appliance's configuration file (for a reload)."""
    config = yaml.safe_load(box.config_path.read_text())
    config.update(sections)
    box.write_config(config)


def uids(paths: list[Path]) -> set[str]:
    return {sop_uid(p) for p in paths}


def dataset_without(path_or_ds: Path | pydicom.Dataset, *keywords: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path_or_ds) if isinstance(path_or_ds, Path) else path_or_ds
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


# ---- 1. a corpus routed by modality, with tag edits -------------------------------------------------

def test_corpus_routed_by_modality_arrives_complete_with_tag_edits(appliance_factory, corpus, orthanc, stack,
                                                                    tmp_path) -> None:
    """CT and MR go to Orthanc with InstitutionName rewritten; everything goes to a storescp
    untouched. Each destination ends up with exactly its instances, in their own transfer
    syntax, pixel data intact; the cached originals are unchanged."""
    archive = stack.enter_context(StoreSCP(tmp_path / "archive"))
    box = appliance_factory({
        "destinations": {"central": destination(orthanc.ae_title, orthanc.dicom_port),
                         "archive": destination(archive.ae_title, archive.port)},
        "routes": [
            {"name": "ct-mr-central", "when": {"Modality": ["CT", "MR"]}, "send_to": ["central"],
             "set": {"InstitutionName": "Routed By Edge"}, "continue": True},
            {"name": "all-archive", "send_to": ["archive"]},
        ],
    })
    files = [p for paths in corpus.values() for p in paths]
    send(box, files)
    originals = {sop_uid(p): p for p in files}
    to_central = {u for u, p in originals.items()
                  if pydicom.dcmread(p, stop_before_pixels=True).Modality in ("CT", "MR")}
    assert 0 < len(to_central) < len(originals)

    wait_until(lambda: orthanc.count() >= len(to_central) and len(archive.receptions()) >= len(originals), 120,
               lambda: f"Orthanc has {orthanc.count()}/{len(to_central)}, storescp "
                       f"{len(archive.receptions())}/{len(originals)}; queue: {queue(box)}")

    assert orthanc.sop_instance_uids() == to_central
    for uid in to_central:
        original = pydicom.dcmread(originals[uid])
        assert orthanc.tags(uid)["InstitutionName"] == "Routed By Edge"
        assert orthanc.transfer_syntax(uid) == original.file_meta.TransferSyntaxUID  # no needless transcoding
        stored = orthanc.dataset(uid)
        assert stored.PixelData == original.PixelData
        assert dataset_without(stored, "InstitutionName") == dataset_without(original, "InstitutionName")

    received = archive.datasets()
    assert set(received) == set(originals)
    for uid, stored in received.items():
        original = pydicom.dcmread(originals[uid])
        assert stored.InstitutionName == "Test Clinic"  # the edit belongs to the central rule only
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored == original

    index = cache_rows(box)
    for uid, path in originals.items():
        cached = Path(index[uid]["path"])
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == index[uid]["sha256"]
        assert pydicom.dcmread(cached) == pydicom.dcmread(path)  # the cached original is untouched

    state = {d["name"]: d for d in queue(box)["destinations"]}
    assert state["central"]["delivered"] == len(to_central)
    assert state["archive"]["delivered"] == len(originals)
    for entry in state.values():
        assert (entry["pending"], entry["in_flight"], entry["dead"], entry["transcoded"]) == (0, 0, 0, 0), entry


# ---- 2. the PACS goes down mid-stream and comes back --------------------------------------------------

def test_orthanc_down_mid_stream_everything_delivered_after_recovery(appliance_factory, orthanc, tmp_path) -> None:
    """Orthanc stops while the appliance forwards; intake goes on; when Orthanc is back every
    instance reaches it, each delivered once, without restarting the appliance."""
    box = appliance_factory({
        "destinations": {"central": destination(orthanc.ae_title, orthanc.dicom_port)},
        "routes": [{"send_to": ["central"]}],
    })
    before = write_series(tmp_path / "before", "outage", 1, 1, Series("CT", 150, 256, 256))
    during = write_series(tmp_path / "during", "outage", 1, 2, Series("CT", 40, 256, 256))
    pid = box.process.pid if box.process else None

    send(box, before)
    wait_until(lambda: orthanc.count() >= 10, 30, "nothing reached Orthanc")
    orthanc.stop()
    send(box, during)  # intake does not depend on the destination

    def failed_attempts() -> int:
        return sum(1 for rows in attempts(box, "central").values() for a in rows if a["outcome"] != "delivered")

    wait_until(lambda: failed_attempts() >= 3, 30, "no failed attempts recorded while Orthanc was down")
    central = queue_of(box, "central")
    assert central["pending"] + central["in_flight"] > 0 and central["last_error"], central
    assert f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port} refused" in central["last_error"], central
    time.sleep(2)  # a few more retries against a PACS that is down
    orthanc.start()

    expected = uids(before) | uids(during)
    wait_until(lambda: orthanc.count() >= len(expected), 60,
               lambda: f"Orthanc has {orthanc.count()}/{len(expected)}; queue: {queue_of(box, 'central')}")
    assert orthanc.sop_instance_uids() == expected
    assert box.process is not None and box.process.poll() is None and box.process.pid == pid

    central = queue_of(box, "central")
    assert (central["delivered"], central["pending"], central["in_flight"], central["dead"]) == (len(expected), 0, 0, 0)
    history = attempts(box, "central")
    for uid in expected:
        outcomes = [a["outcome"] for a in history[uid]]
        assert outcomes.count("delivered") == 1 and outcomes[-1] == "delivered", (uid, outcomes)


# ---- 3. the appliance killed while forwarding -------------------------------------------------------

def test_sigkill_during_forwarding_every_acknowledged_instance_delivered(appliance_factory, orthanc, stack,
                                                                        tmp_path) -> None:
    """Kill -9 the appliance at random moments while it receives and forwards, five times,
    restarting it each time: in the end every acknowledged instance is in Orthanc, and a storescp
    that keeps every reception shows at most one duplicate per kill."""
    require_tool("storescu")
    counter = stack.enter_context(StoreSCP(tmp_path / "counter", ae_title="COUNTER", unique=True))
    box = appliance_factory({
        "destinations": {"central": destination(orthanc.ae_title, orthanc.dicom_port),
                         "counter": destination(counter.ae_title, counter.port)},
        "routes": [{"send_to": ["central", "counter"]}],
    })
    rng = random.Random(2024)
    acknowledged: set[str] = set()
    kills = mid_forwarding = 0
    for round_no in range(5):
        files = write_series(tmp_path / f"round{round_no}", "forward-crash", round_no + 1, 1,
                             Series("CT", 250, 256, 256))
        sender = subprocess.Popen(
            ["storescu", "-v", "-nh", "-aet", "MODALITY", "-aec", box.ae_title, "127.0.0.1", str(box.port),
             *map(str, files)],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # A random moment while it receives (and so forwards): after a random share of this
        # round has been acknowledged. A fixed delay would drift past the round's end as the
        # appliance gets faster.
        before = read_until_acknowledged(sender, rng.randint(10, 200))
        in_orthanc = orthanc.count()
        box.kill()
        kills += 1
        out, _ = sender.communicate(timeout=60)
        acknowledged |= uids(parse_storescu(sender.returncode, before + out).succeeded)
        if in_orthanc < len(cache_rows(box)):
            mid_forwarding += 1
        box.start()
    assert acknowledged
    assert mid_forwarding >= 3, f"only {mid_forwarding} of {kills} kills came while instances were still queued"

    wait_until(lambda: acknowledged <= orthanc.sop_instance_uids(), 120,
               lambda: f"missing in Orthanc: {len(acknowledged - orthanc.sop_instance_uids())}; "
                       f"queue: {queue(box)}")
    wait_until(lambda: acknowledged <= set(counter.receptions()), 60,
               lambda: f"missing at storescp: {len(acknowledged - set(counter.receptions()))}")
    wait_until(lambda: all(d["pending"] == d["in_flight"] == 0 for d in queue(box)["destinations"]), 30,
               lambda: f"queues not drained: {queue(box)}")
    received = counter.receptions()
    duplicates = sum(received.values()) - len(received)
    print(f"{kills} kills ({mid_forwarding} mid-forwarding), {len(acknowledged)} acknowledged, "
          f"{duplicates} duplicate C-STOREs at storescp")
    assert duplicates <= kills, f"{duplicates} duplicate C-STOREs after {kills} kills: " \
        f"{[u for u, n in received.items() if n > 1]}"
    assert all(d["dead"] == 0 for d in queue(box)["destinations"])


# ---- 4. transcoding for a destination that accepts only Explicit VR Little Endian ---------------------

def test_compressed_instances_are_decompressed_for_an_explicit_only_destination(appliance_factory, corpus,
                                                                                stack) -> None:
    """RLE, JPEG-LS and JPEG 2000 lossless instances reach an SCP that accepts only Explicit VR
    Little Endian, decompressed with the original pixel values, and are recorded as transcoded;
    an uncompressed instance goes as it is."""
    scp = stack.enter_context(RecordingSCP("EXPLICIT", transfer_syntaxes=[ExplicitVRLittleEndian]))
    box = appliance_factory({
        "destinations": {"explicit": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["explicit"]}],
    })
    compressed = corpus["rle"] + corpus["jpegls"] + corpus["j2k"]
    plain = corpus["ct"][5]
    send(box, [*compressed, plain])

    wait_until(lambda: len(scp.stored()) >= len(compressed) + 1, 60,
               lambda: f"received {len(scp.stored())}; queue: {queue_of(box, 'explicit')}")
    received = {r.sop_instance_uid: r for r in scp.stored()}
    assert set(received) == uids([*compressed, plain]), "the destination got other SOP Instance UIDs than were sent"
    sources = {p.name: p for p in corpus["ct"] + corpus["us"]}
    for path in compressed:
        uid = sop_uid(path)
        reception = received[uid]
        assert reception.transfer_syntax == ExplicitVRLittleEndian
        assert reception.dataset is not None
        source = pydicom.dcmread(sources[path.name])  # the uncompressed image it was made from
        np.testing.assert_array_equal(reception.dataset.pixel_array, source.pixel_array, err_msg=path.name)
    assert received[sop_uid(plain)].dataset == pydicom.dcmread(plain)

    state = queue_of(box, "explicit")
    assert state["transcoded"] == len(compressed) and state["delivered"] == len(compressed) + 1, state
    rows = deliveries(box, "explicit")
    assert {u for u, r in rows.items() if r["transcoded"]} == uids(compressed)


def test_a_large_compressed_cine_is_decoded_for_an_explicit_only_destination_in_flat_memory(
        appliance_factory, stack, tmp_path) -> None:
    """An ultrasound cine loop, RLE-compressed, that decodes to 211 MiB (240 frames of 640×480
    RGB) reaches a destination that accepts only Explicit VR Little Endian, decoded, frame for
    frame; the forwarder's peak memory stays far below the decoded size (it decodes a frame at a
    time into a file beside the cache and sends that in chunks)."""
    from .test_processes import forwarder_pid

    frames, rows, columns = 240, 480, 640
    us = write_series(tmp_path / "us", "cine", 1, 1, Series("US", 1, rows, columns, rgb=True))[0]
    dataset = pydicom.dcmread(us)
    one = np.frombuffer(dataset.PixelData, np.uint8).reshape(rows, columns, 3)
    dataset.NumberOfFrames = frames
    dataset.PixelData = b"".join(np.roll(one, 4 * i, axis=1).tobytes() for i in range(frames))
    dataset.compress(RLELossless)
    cine = tmp_path / "cine.dcm"
    dataset.save_as(cine, enforce_file_format=True)
    del dataset

    scp = stack.enter_context(RecordingSCP("EXPLICIT", transfer_syntaxes=[ExplicitVRLittleEndian]))
    box = appliance_factory({
        "destinations": {"explicit": destination(scp.ae_title, scp.port, timeouts={"dimse": "120s",
                                                                                    "network": "120s"})},
        "routes": [{"send_to": ["explicit"]}],
    })
    assert box.process is not None
    forwarder = forwarder_pid(box.process.pid)
    assert forwarder is not None
    send(box, [cine])
    wait_until(lambda: len(scp.stored()) == 1, 120, lambda: f"not delivered: {queue_of(box, 'explicit')}")
    peak_mb = next(int(line.split()[1]) for line in Path(f"/proc/{forwarder}/status").read_text().splitlines()
                   if line.startswith("VmHWM:")) / 1024
    received = scp.stored()[0]
    assert received.transfer_syntax == ExplicitVRLittleEndian
    assert received.dataset is not None and received.dataset.NumberOfFrames == frames
    expected = pydicom.dcmread(cine)
    expected.decompress(generate_instance_uid=False)
    assert received.dataset.PixelData == expected.PixelData
    decoded_mb = frames * rows * columns * 3 / 2**20
    assert peak_mb < decoded_mb / 2, f"forwarder peak {peak_mb:.0f} MB for a {decoded_mb:.0f} MB decoded instance"
    assert queue_of(box, "explicit")["transcoded"] == 1
    assert list((box.data / "outgoing").iterdir()) == [], "the decoded copy was left behind"


def test_explicit_vr_instances_are_reencoded_for_an_implicit_only_destination(appliance_factory, corpus,
                                                                            stack) -> None:
    """Uncompressed Explicit VR Little Endian instances (16-bit CT, 8-bit colour US) reach an SCP
    that accepts only Implicit VR Little Endian (an old PACS) with every value and the pixel data
    unchanged but for the rule's tag edit, and are recorded as transcoded; the re-encoded copies
    are removed."""
    scp = stack.enter_context(RecordingSCP("IMPLICIT", transfer_syntaxes=[ImplicitVRLittleEndian]))
    box = appliance_factory({
        "destinations": {"implicit": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["implicit"], "set": {"InstitutionName": "Routed By Edge"}}],
    })
    plain = [*corpus["ct"][:2], corpus["us"][0]]
    send(box, plain)

    wait_until(lambda: len(scp.stored()) >= len(plain), 60,
               lambda: f"received {len(scp.stored())}; queue: {queue_of(box, 'implicit')}")
    received = {r.sop_instance_uid: r for r in scp.stored()}
    assert set(received) == uids(plain)
    for path in plain:
        reception = received[sop_uid(path)]
        assert reception.transfer_syntax == ImplicitVRLittleEndian and reception.dataset is not None
        expected = pydicom.dcmread(path)
        expected.InstitutionName = "Routed By Edge"
        assert reception.dataset.PixelData == expected.PixelData, path.name
        for element in expected:
            assert reception.dataset[element.tag].value == element.value, (path.name, element)
        assert set(reception.dataset.keys()) == set(expected.keys())

    state = queue_of(box, "implicit")
    assert state["transcoded"] == len(plain) and state["delivered"] == len(plain), state
    assert list((box.data / "outgoing").iterdir()) == [], "a re-encoded copy was left behind"


class FirstContextOnlySCP(RecordingSCP):
    """A :class:`RecordingSCP` that, of the presentation contexts proposed for each SOP class,
    accepts only the first (as some PACS do), and records what each association proposed, in
    order (``proposals``: lists of (SOP class, transfer syntax))."""

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title)
        self.proposals: list[list[tuple[str, str]]] = []

    def start(self) -> FirstContextOnlySCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        handlers = [(evt.EVT_REQUESTED, self._first_only), (evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def _first_only(self, event: evt.Event) -> None:
        proposed = [(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in event.assoc.requestor.requested_contexts]
        self.proposals.append(proposed)
        first: dict[str, str] = {}
        for sop_class, syntax in proposed:
            first.setdefault(sop_class, syntax)
        event.assoc.acceptor.supported_contexts = [build_context(c, [s]) for c, s in first.items()]


@pytest.mark.parametrize("own", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_the_instances_own_transfer_syntax_is_proposed_first(appliance_factory, stack, tmp_path, own: UID) -> None:
    """A PACS that accepts only the first presentation context proposed for each SOP class
    gets a CT in the transfer syntax it was received in, not re-encoded (an Explicit VR
    instance sent as Implicit VR would lose the VRs of its private elements)."""
    scp = stack.enter_context(FirstContextOnlySCP("FIRSTONLY"))
    box = appliance_factory({"destinations": {"first": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["first"]}]})
    image = write_series(tmp_path / "ct", "first-context", 1, 1, Series("CT", 1, 64, 64))[0]
    dataset = pydicom.dcmread(image)
    if own == RLELossless:
        dataset.compress(RLELossless)
    elif own != dataset.file_meta.TransferSyntaxUID:
        dataset.file_meta.TransferSyntaxUID = own
    dataset.save_as(image, enforce_file_format=True)
    assert "imported 1" in box.cli("send", str(image)).stdout
    assert cache_rows(box)[sop_uid(image)]["transfer_syntax"] == own

    wait_until(lambda: len(scp.stored()) == 1, 20, lambda: f"queue: {queue_of(box, 'first')}")
    assert scp.stored()[0].transfer_syntax == own
    assert queue_of(box, "first")["transcoded"] == 0
    proposed_for_ct = [syntax for sop_class, syntax in scp.proposals[0] if sop_class == sop_class_of(image)]
    assert proposed_for_ct[0] == own, proposed_for_ct


def sop_class_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)


def test_instance_that_cannot_be_transcoded_is_a_dead_letter_with_the_reason(appliance_factory, corpus,
                                                                            stack) -> None:
    """A destination that accepts CT only as JPEG Baseline cannot take an uncompressed CT (the
    appliance only decompresses): the instance is a dead letter, with a reason, at once."""
    scp = stack.enter_context(RecordingSCP("JPEGONLY", transfer_syntaxes=[JPEGBaseline8Bit]))
    box = appliance_factory({
        "destinations": {"jpegonly": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["jpegonly"]}],
    })
    send(box, [corpus["ct"][0]])
    state = wait_until(lambda: (q := queue_of(box, "jpegonly"))["dead"] == 1 and q, 30,
                       lambda: f"not a dead letter: {queue_of(box, 'jpegonly')}")
    assert state["delivered"] == 0 and state["pending"] == 0
    row = deliveries(box, "jpegonly")[sop_uid(corpus["ct"][0])]
    assert row["state"] == "dead" and row["last_error"], dict(row)
    assert scp.receptions() == []


def test_a_full_disk_while_making_an_edited_copy_is_retried_not_a_dead_letter(appliance_factory, stack,
                                                                            tmp_path) -> None:
    """The edited copy of an instance cannot be written because ``outgoing/`` (a 1 MB tmpfs
    here) is full: the delivery is retried with the reason, not made a dead letter that would
    wait for an admin, and it goes out, edited, once there is room again. The box's own disk is
    not the PACS failing with the image: those tries are in its history but are not among the
    ``max_attempts`` (here 1, which gives up at the PACS's first failure)."""
    scp = stack.enter_context(RecordingSCP("EDITED"))
    box = appliance_factory({
        "destinations": {"edited": destination(scp.ae_title, scp.port, retry={"max_attempts": 1})},
        "routes": [{"send_to": ["edited"], "set": {"InstitutionName": "Routed By Edge"}}],
    })
    outgoing_dir = box.data / "outgoing"
    stack.enter_context(mounted_tmpfs(outgoing_dir, "1m"))
    ballast = outgoing_dir / "ballast"
    room = os.statvfs(outgoing_dir)
    ballast.write_bytes(b"\0" * (room.f_bavail * room.f_frsize))

    files = write_series(tmp_path / "ct", "full-outgoing", 1, 1, Series("CT", 1, 256, 256))
    send(box, files)
    uid = sop_uid(files[0])
    wait_until(lambda: len(attempts(box, "edited").get(uid, [])) >= 2 or queue_of(box, "edited")["dead"], 30,
               lambda: f"not retried: {queue_of(box, 'edited')}")
    row = deliveries(box, "edited")[uid]
    assert row["state"] != "dead" and "No space left on device" in row["last_error"], dict(row)
    assert row["attempts"] == 0, dict(row)
    assert scp.receptions() == []

    ballast.unlink()
    wait_until(lambda: queue_of(box, "edited")["delivered"] == 1, 30, lambda: f"queue: {queue_of(box, 'edited')}")
    [reception] = scp.stored()
    assert reception.dataset is not None and reception.dataset.InstitutionName == "Routed By Edge"


def test_a_disk_full_while_recording_deliveries_holds_the_forwarding_up_without_a_restart(
        appliance_factory, stack, small_disk, tmp_path) -> None:
    """Something else fills the data disk, and keeps filling what frees up, while a study goes
    out: the database cannot record the deliveries (SQLITE_FULL). The forwarding waits for room
    and goes on where it was — no restart of the forwarder (which aborted every destination's
    associations), no "stopped while sending" attempt for an image never sent, nothing sent
    twice."""
    pacs = stack.enter_context(RecordingSCP("PACS", delay=0.3, keep_datasets=False))
    box = appliance_factory({
        "storage": {"path": str(small_disk / "data")},
        "destinations": {"pacs": destination(pacs.ae_title, pacs.port)},
        "routes": [{"send_to": ["pacs"]}],
    })
    files = write_series(tmp_path / "ct", "disk-full", 1, 1, Series("CT", 30, 64, 64))
    send(box, files)
    wait_until(lambda: len(pacs.stored()) >= 3, 20, lambda: f"forwarding did not start: {queue(box)}")

    stop_filling = threading.Event()

    def fill() -> None:  # the disk stays full: whatever the box frees (its reserve, evictions) is taken
        count = 0
        while not stop_filling.is_set():
            for size in (1 << 20, 1 << 12):
                while not stop_filling.is_set():
                    count += 1
                    try:
                        (small_disk / f"filler-{count}").write_bytes(b"\0" * size)
                    except OSError:
                        break
            stop_filling.wait(0.02)

    filler = threading.Thread(target=fill, daemon=True)
    filler.start()
    try:
        wait_until(lambda: "database or disk is full" in box.log(), 20, lambda: box.log()[-2000:])
        time.sleep(5)
    finally:
        stop_filling.set()
        filler.join(10)
        for path in small_disk.glob("filler-*"):
            path.unlink()
    wait_until(lambda: set(pacs.stored_uids()) == uids(files) and queue_of(box, "pacs")["delivered"] == len(files),
               60, lambda: f"queue: {queue_of(box, 'pacs')}; log: {box.log()[-2000:]}")
    log = box.log()
    assert not re.search(r"forwarder \(pid \d+\) died", log) and "exiting, to be started again" not in log, log[-3000:]
    assert not [row for rows in attempts(box, "pacs").values() for row in rows if row["outcome"] == "unknown"]
    assert pacs.stored_uids() == Counter(uids(files)), "sent twice"


def _fill_up(directory: Path) -> list[Path]:
    """Files in ``directory`` until the disk has not one more byte (as another writer would)."""
    made: list[Path] = []
    for size in (1 << 20, 1 << 12, 1):
        while True:
            path = directory / f"filler-{len(made)}"
            try:
                with open(path, "wb") as f:
                    f.write(b"\0" * size)
            except OSError:
                path.unlink(missing_ok=True)
                break
            made.append(path)
    return made


def test_a_box_stopped_cleanly_starts_again_on_a_disk_filled_meanwhile(appliance_factory, stack, small_disk,
                                                                        tmp_path) -> None:
    """Images acknowledged while the PACS is down; the box stopped cleanly (which removes the
    database's WAL files); something else fills the disk to the last byte. SQLite could not
    make the WAL files again ("disk I/O error"), the box could not start — modalities refused
    at the door, `appliance queue` failing — and stayed down once space was freed: its images
    stranded. Opening the database gives up the reserve that is there for it; the box starts,
    refuses images for want of room (0xA700), and delivers what it holds once the PACS is up."""
    pacs = RecordingSCP("PACS", keep_datasets=False)
    box = appliance_factory({
        "storage": {"path": str(small_disk / "data"), "disk": {"min_free": "10%"}},
        "destinations": {"pacs": destination(pacs.ae_title, pacs.port)},
        "routes": [{"send_to": ["pacs"]}],
    })
    files = write_series(tmp_path / "ct", "full-start", 1, 1, Series("CT", 10, 64, 64))
    send(box, files)
    assert box.stop() == 0
    assert not (box.data / "appliance.db-wal").exists()
    fillers = _fill_up(small_disk)
    try:
        box.start()
        assert "removed the 1 MiB reserve so that the database can be opened" in box.log()
        assert queue_of(box, "pacs")["pending"] == len(files)
        refused = storescu(box.port, write_series(tmp_path / "more", "full-start", 2, 1, Series("CT", 1, 64, 64)))
        assert not refused.succeeded and "OutOfResources" in refused.output, refused.output[-1500:]  # 0xA700
    finally:
        for path in fillers:
            path.unlink()
    with pacs:
        wait_until(lambda: set(pacs.stored_uids()) == uids(files), 60, lambda: f"queue: {queue_of(box, 'pacs')}")


# ---- 5. statuses: delivered, retried, dead letters; `appliance retry` --------------------------------------

def test_a_study_refused_instance_by_instance_is_one_journal_line_and_a_count(appliance_factory, stack,
                                                                              tmp_path) -> None:
    """A PACS that refuses a SOP class answers each instance of a study alike: every one is a
    dead letter with its status, and the journal names the first and counts the others instead
    of one ERROR line each (a 500-slice study gave 500) — streamed, as a modality sends them."""
    files = write_series(tmp_path / "ct", "refused", 1, 1, Series("CT", 30, 32, 32))
    scp = stack.enter_context(RecordingSCP("REFUSING", status=0x0122))  # SOP class not supported
    box = appliance_factory({
        "destinations": {"refusing": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["refusing"]}],
    })
    send(box, files)
    wait_until(lambda: queue_of(box, "refusing")["dead"] == 30, 60, lambda: f"{queue_of(box, 'refusing')}")
    assert len(scp.receptions()) == 30
    assert box.stop() == 0  # the count not said yet is said at stop
    log = box.log()
    named = [line for line in log.splitlines() if re.search(r"ERROR .*dead letter [0-9.]+ for refusing", line)]
    counted = [int(m.group(1)) for m in re.finditer(r"ERROR .*?(\d+) more dead letter\(s\) for refusing", log)]
    assert len(named) == 1 and "status 0x0122" in named[0], named
    assert counted == [29], counted


def test_a_response_to_another_request_is_recorded_as_such_and_the_instance_sent_again(
        appliance_factory, stack, tmp_path, monkeypatch) -> None:
    """A PACS whose C-STORE responses name another request's Message ID: the association is
    aborted and the instance sent again (delivery unknown), and the record says what came —
    not "no C-STORE response", which would send an admin looking at the network."""
    from pynetdicom.dimse import DIMSEServiceProvider

    send_msg = DIMSEServiceProvider.send_msg
    wrong = {"on": True}

    def off_by_one(self, primitive, context_id):  # the SCP runs in this process, the box in its own
        if wrong["on"] and getattr(primitive, "MessageIDBeingRespondedTo", None) is not None:
            primitive.MessageIDBeingRespondedTo += 1
        return send_msg(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", off_by_one)
    files = write_series(tmp_path / "ct", "msgid", 1, 1, Series("CT", 1, 32, 32))
    scp = stack.enter_context(RecordingSCP("MSGID"))
    box = appliance_factory({"destinations": {"central": destination("MSGID", scp.port)},
                             "routes": [{"send_to": ["central"]}]})
    send(box, files)
    wait_until(lambda: queue_of(box, "central")["last_error"], 30, lambda: f"{queue_of(box, 'central')}")
    error = queue_of(box, "central")["last_error"]
    assert "answered with a C-STORE response to message 2 (status 0x0000), not to ours, 1" in error, error
    wrong["on"] = False
    wait_until(lambda: queue_of(box, "central")["delivered"] == 1, 30, lambda: f"{queue_of(box, 'central')}")


def test_statuses_decide_delivered_retry_or_dead_letter_and_retry_requeues(appliance_factory, stack,
                                                                           tmp_path) -> None:
    """Warnings count as delivered; 0xA700 is retried until it succeeds; 0xA900 and 0xC000 are
    dead letters at once, with the status recorded; ``appliance retry`` re-queues them and they
    are delivered once the destination accepts them."""
    files = write_series(tmp_path / "ct", "statuses", 1, 1, Series("CT", 7, 64, 64))
    ids = [sop_uid(p) for p in files]
    planned = {ids[0]: 0x0000, ids[1]: 0xB000, ids[2]: 0xB007, ids[3]: 0xB006, ids[4]: 0xA700,
               ids[5]: 0xA900, ids[6]: 0xC000}
    scp = stack.enter_context(RecordingSCP("STATUSES"))
    accept_all = False

    def respond(uid: str, nth: int) -> int:
        if accept_all:
            return 0x0000
        if planned[uid] == 0xA700 and nth > 2:
            return 0x0000  # out of resources twice, then fine
        return planned[uid]

    scp.respond = respond
    box = appliance_factory({
        "destinations": {"statuses": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["statuses"]}],
    })
    send(box, files)

    wait_until(lambda: deliveries(box, "statuses")[ids[4]]["state"] == "delivered", 30,
               lambda: f"0xA700 instance not delivered: {dict(deliveries(box, 'statuses')[ids[4]])}")
    time.sleep(2.5)  # longer than the backoff: a dead letter must not be retried by itself
    rows = deliveries(box, "statuses")
    history = attempts(box, "statuses")
    for uid in ids[:4]:
        assert rows[uid]["state"] == "delivered" and rows[uid]["attempts"] == 1, dict(rows[uid])
        assert as_status(history[uid][-1]["status"]) == planned[uid]
    assert [as_status(a["status"]) for a in history[ids[4]]] == [0xA700, 0xA700, 0x0000]
    assert [a["outcome"] for a in history[ids[4]]][-1] == "delivered"
    for uid in ids[5:]:
        assert rows[uid]["state"] == "dead" and rows[uid]["attempts"] == 1, dict(rows[uid])
        assert as_status(rows[uid]["last_status"]) == planned[uid]
        assert [as_status(a["status"]) for a in history[uid]] == [planned[uid]]
    assert scp.stored_uids() == {u: 1 for u in ids[:5]}
    state = queue_of(box, "statuses")
    assert (state["delivered"], state["dead"], state["pending"]) == (5, 2, 0), state
    # Which instances, and why: what an admin reads before `appliance retry`.
    letters = json.loads(box.cli("queue", "--json", "--dead").stdout)
    assert letters["dead_letters_total"] == 2
    assert {(d["sop_instance_uid"], d["destination"], d["status"], d["attempts"]) for d in letters["dead_letters"]} \
        == {(ids[5], "statuses", 0xA900, 1), (ids[6], "statuses", 0xC000, 1)}
    listed = box.cli("queue", "--dead", "--limit", "1").stdout
    assert "dead letters (the 1 most recent of 2;" in listed, listed
    assert sum(ids[5] in line or ids[6] in line for line in listed.splitlines()) == 1, listed

    retried = box.cli("retry", "statuses")
    assert re.search(r"\b2\b", retried.stdout), retried.stdout
    wait_until(lambda: queue_of(box, "statuses")["dead"] == 2 and len(scp.receptions()) >= 5 + 2 + 2 + 2, 30,
               lambda: f"re-queued dead letters not attempted again: {queue_of(box, 'statuses')}")

    accept_all = True
    retried = box.cli("retry", "--all")
    assert re.search(r"\b2\b", retried.stdout), retried.stdout
    wait_until(lambda: queue_of(box, "statuses")["delivered"] == 7, 30,
               lambda: f"not delivered after `retry --all`: {queue_of(box, 'statuses')}")
    assert scp.stored_uids() == {u: 1 for u in ids}
    assert queue_of(box, "statuses")["dead"] == 0
    mistyped = box.cli("retry", "statuse", check=False)
    assert mistyped.returncode == 2 and 'unknown destination "statuse"' in mistyped.stderr, mistyped.stderr


def test_no_response_is_delivery_unknown_and_retried_never_success(appliance_factory, stack, tmp_path) -> None:
    """A storescp that aborts after each C-STORE request gives no status: the appliance must not
    count that as delivered; it retries on a new association, and delivers once a working
    storescp is on that port."""
    files = write_series(tmp_path / "ct", "no-response", 1, 1, Series("CT", 3, 64, 64))
    aborting = StoreSCP(tmp_path / "aborting", ae_title="ABORTS", flags=["--abort-after"]).start()
    stack.callback(aborting.stop)
    box = appliance_factory({
        "destinations": {"flaky": destination("ABORTS", aborting.port, timeouts={"dimse": "3s"})},
        "routes": [{"send_to": ["flaky"]}],
    })
    send(box, files)
    ids = uids(files)

    def failed_attempts() -> list[sqlite3.Row]:
        return [a for rows in attempts(box, "flaky").values() for a in rows]

    wait_until(lambda: len(failed_attempts()) >= 3, 40, "no attempts recorded")
    history = failed_attempts()
    assert {a["outcome"] for a in history} == {"unknown"}, [dict(a) for a in history]
    assert all(a["status"] is None for a in history)
    assert all(r["state"] != "delivered" for r in deliveries(box, "flaky").values())
    assert queue_of(box, "flaky")["delivered"] == 0

    aborting.stop()
    working = stack.enter_context(StoreSCP(tmp_path / "working", ae_title="ABORTS", port=aborting.port))
    wait_until(lambda: set(working.receptions()) >= ids, 30, lambda: f"not delivered: {queue_of(box, 'flaky')}")
    wait_until(lambda: queue_of(box, "flaky")["delivered"] == len(ids), 10, lambda: str(queue_of(box, "flaky")))


def test_queue_last_error_is_the_error_of_the_latest_failed_attempt(appliance_factory, stack, tmp_path) -> None:
    """``appliance queue`` shows, as LAST ERROR, what the destination said most recently when
    something failed: not '-' because the image that failed last was later delivered while a
    dead letter waits, and not an older error in front of a newer dead letter."""
    first, second = write_series(tmp_path / "ct", "last-error", 1, 1, Series("CT", 2, 64, 64))
    refused = sop_uid(first)

    def respond(uid: str, nth: int) -> int:
        if uid == refused:
            return 0xC000
        return 0xA700 if nth == 1 else 0x0000

    scp = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
    scp.respond = respond
    box = appliance_factory({"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["pacs"]}]})
    send(box, [first])
    wait_until(lambda: queue_of(box, "pacs")["dead"] == 1, 20, lambda: str(queue_of(box, "pacs")))
    send(box, [second])
    wait_until(lambda: queue_of(box, "pacs")["delivered"] == 1, 20, lambda: str(queue_of(box, "pacs")))
    state = queue_of(box, "pacs")
    assert state["dead"] == 1 and "0xA700" in (state["last_error"] or ""), state
    table = box.cli("queue").stdout
    assert re.search(r"0xA700.* \(\d+s ago\)$", table, re.MULTILINE), table  # when, as well as what
    assert time.time() - 60 < state["last_error_at"] <= time.time(), state

    box.cli("retry", "pacs")
    wait_until(lambda: len([r for r in scp.receptions() if r.sop_instance_uid == refused]) == 2
               and queue_of(box, "pacs")["dead"] == 1, 20, lambda: str(queue_of(box, "pacs")))
    state = queue_of(box, "pacs")
    assert "0xC000" in (state["last_error"] or ""), state


class DuplicateRejectingPACS:
    """What a PACS that refuses duplicates (0x0111) answers, for a :class:`RecordingSCP`:
    success the first time it stores an image, 0x0111 for any later copy. ``held`` (a UID)
    is stored but its answer waits for ``release`` (a crash or a lost connection meanwhile
    loses it); ``lost`` (UIDs) are stored but their answer is never sent (an abort instead);
    ``holds`` are UIDs it has from elsewhere (another version)."""

    def __init__(self, holds: set[str] = frozenset(), lost: set[str] = frozenset(), held: str | None = None) -> None:
        self.stored = set(holds)
        self.lost = set(lost)
        self.held = held
        self.arrived, self.release = threading.Event(), threading.Event()

    def __call__(self, uid: str, nth: int) -> int:
        if uid in self.stored:
            return 0x0111
        self.stored.add(uid)
        if uid == self.held:
            self.arrived.set()
            self.release.wait(30)
        return ABORT if uid in self.lost else 0x0000


def test_a_duplicate_refused_after_a_send_whose_answer_was_lost_is_delivered(appliance_factory, stack,
                                                                           tmp_path) -> None:
    """A PACS that refuses duplicates (0x0111) stores an image but its answer never comes (the
    association aborts); the appliance sends it again, as it must, and gets 0x0111: the image
    is at the PACS, from the first attempt — delivered, with the status and why in its
    history, not a dead letter for an admin. An image the PACS refuses as a duplicate the
    first time it is sent is a dead letter: the PACS holds another version of it."""
    files = write_series(tmp_path / "ct", "dup-unknown", 1, 1, Series("CT", 3, 64, 64))
    lost, elsewhere, plain = (sop_uid(p) for p in files)
    scp = stack.enter_context(RecordingSCP("DEDUP", keep_datasets=False))
    scp.respond = DuplicateRejectingPACS(holds={elsewhere}, lost={lost})
    box = appliance_factory({"destinations": {"dedup": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["dedup"]}]})
    send(box, files)
    wait_until(lambda: queue_of(box, "dedup")["pending"] + queue_of(box, "dedup")["in_flight"] == 0, 30,
               lambda: f"queue: {queue_of(box, 'dedup')}")
    rows, history = deliveries(box, "dedup"), attempts(box, "dedup")
    assert rows[lost]["state"] == "delivered", dict(rows[lost])
    assert [(a["outcome"], as_status(a["status"])) for a in history[lost]] == [("unknown", None),
                                                                             ("delivered", 0x0111)]
    assert "no answer" in history[lost][-1]["error"], history[lost][-1]["error"]
    assert rows[elsewhere]["state"] == "dead" and as_status(rows[elsewhere]["last_status"]) == 0x0111
    assert rows[plain]["state"] == "delivered"
    state = queue_of(box, "dedup")
    assert (state["delivered"], state["dead"]) == (2, 1), state


def test_a_duplicate_refused_after_the_appliance_stopped_while_sending_is_delivered(appliance_factory, stack,
                                                                                  tmp_path) -> None:
    """The appliance is killed while a PACS that refuses duplicates (0x0111) has stored an image
    but not yet answered. After the restart the image is sent again and refused as a duplicate:
    it is delivered, and its history says that the appliance stopped while sending it."""
    image = write_series(tmp_path / "ct", "dup-crash", 1, 1, Series("CT", 1, 64, 64))[0]
    uid = sop_uid(image)
    pacs = DuplicateRejectingPACS(held=uid)
    scp = stack.enter_context(RecordingSCP("DEDUP", keep_datasets=False))
    scp.respond = pacs
    box = appliance_factory({"destinations": {"dedup": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["dedup"]}]})
    send(box, [image])
    assert pacs.arrived.wait(20), "the image never reached the PACS"
    box.kill()
    pacs.release.set()
    box.start()
    wait_until(lambda: deliveries(box, "dedup")[uid]["state"] in ("delivered", "dead"), 30,
               lambda: f"queue: {queue_of(box, 'dedup')}")
    history = attempts(box, "dedup")[uid]
    assert deliveries(box, "dedup")[uid]["state"] == "delivered", [dict(a) for a in history]
    assert [(a["outcome"], as_status(a["status"])) for a in history] == [("unknown", None), ("delivered", 0x0111)]
    assert "stopped while sending" in history[0]["error"], history[0]["error"]


def test_an_image_a_modality_sends_again_as_it_was_is_not_a_dead_letter_at_a_pacs_that_has_it(
        appliance_factory, stack, tmp_path) -> None:
    """A modality sends a series again, unchanged (node.on_duplicate: replace). The appliance
    forwards it again; a PACS that refuses duplicates answers 0x0111, and since it is the very
    version delivered there, that is its delivery. An image changed in between is a new
    version: 0x0111 from that PACS is a dead letter."""
    files = write_series(tmp_path / "ct", "resend", 1, 1, Series("CT", 3, 64, 64))
    pacs = DuplicateRejectingPACS()
    scp = stack.enter_context(RecordingSCP("DEDUP", keep_datasets=False))
    scp.respond = pacs
    box = appliance_factory({"destinations": {"dedup": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["dedup"]}]})
    send(box, files)
    wait_until(lambda: queue_of(box, "dedup")["delivered"] == 3, 30, lambda: f"queue: {queue_of(box, 'dedup')}")
    changed = pydicom.dcmread(files[2])
    changed.SeriesDescription = "corrected"
    changed.save_as(files[2])
    send(box, files)
    wait_until(lambda: len(scp.receptions()) == 6 and queue_of(box, "dedup")["delivered"]
               + queue_of(box, "dedup")["dead"] == 3, 30, lambda: f"queue: {queue_of(box, 'dedup')}")
    rows = deliveries(box, "dedup")
    assert {uid: (row["state"], as_status(row["last_status"])) for uid, row in rows.items()} == {
        **{sop_uid(p): ("delivered", 0x0111) for p in files[:2]}, sop_uid(files[2]): ("dead", 0x0111)}


class HoldsTheFirst(DuplicateRejectingPACS):
    """A :class:`DuplicateRejectingPACS` that holds the answer to the first image it gets."""

    def __call__(self, uid: str, nth: int) -> int:
        if self.held is None:
            self.held = uid
        return super().__call__(uid, nth)


def test_a_restart_counts_an_attempt_only_for_the_image_that_was_on_the_wire(appliance_factory, stack,
                                                                             tmp_path) -> None:
    """Five images of a study queued while the appliance was off are claimed together; the
    appliance is killed while the PACS holds the answer to the first. After the restart the
    first has an attempt that says the appliance stopped while sending it (then 0x0111: the
    PACS had it), and the four never sent have none: a restart during a backlog does not use
    up their retry policy (``max_attempts: 2`` here) or write a history of sends that did not
    happen."""
    files = write_series(tmp_path / "ct", "on-wire", 1, 1, Series("CT", 5, 64, 64))
    pacs = HoldsTheFirst()
    scp = stack.enter_context(RecordingSCP("DEDUP", keep_datasets=False))
    scp.respond = pacs
    box = appliance_factory({"destinations": {"dedup": destination(scp.ae_title, scp.port,
                                                                    retry={"max_attempts": 2})},
                             "routes": [{"send_to": ["dedup"]}]})
    box.stop()
    assert "imported 5" in box.cli("send", str(tmp_path / "ct")).stdout
    box.start()
    assert pacs.arrived.wait(20), "no image reached the PACS"
    assert queue_of(box, "dedup")["in_flight"] == 5, queue_of(box, "dedup")
    box.kill()
    pacs.release.set()
    box.start()
    wait_until(lambda: queue_of(box, "dedup")["delivered"] == 5, 30, lambda: f"queue: {queue_of(box, 'dedup')}")
    rows, history = deliveries(box, "dedup"), attempts(box, "dedup")
    outcomes = {uid: [(a["outcome"], as_status(a["status"])) for a in tried] for uid, tried in history.items()}
    assert outcomes == {uid: [("unknown", None), ("delivered", 0x0111)] if uid == pacs.held else [("delivered", 0)]
                        for uid in uids(files)}
    assert {uid: row["attempts"] for uid, row in rows.items()} == {uid: 2 if uid == pacs.held else 1
                                                                  for uid in uids(files)}


def test_association_rejected_permanently_is_dead_transiently_is_retried(appliance_factory, stack,
                                                                        tmp_path) -> None:
    """A storescp that refuses every association (A-ASSOCIATE-RJ, rejected permanent) makes dead
    letters at once, re-queued by ``appliance retry`` once a working storescp listens there; an
    SCP at its association limit (rejected transient) is retried until it has room."""
    files = write_series(tmp_path / "ct", "rejections", 1, 1, Series("CT", 3, 64, 64))
    ids = uids(files)
    refusing = StoreSCP(tmp_path / "refusing", ae_title="REFUSES", flags=["--refuse"]).start()
    stack.callback(refusing.stop)
    busy = stack.enter_context(RecordingSCP("BUSY", max_associations=1, keep_datasets=False))
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", busy.port, ae_title=busy.ae_title)
    assert held.is_established
    stack.callback(lambda: held.release() if held.is_established else None)
    box = appliance_factory({
        "destinations": {"refusing": destination("REFUSES", refusing.port),
                         "busy": destination(busy.ae_title, busy.port)},
        "routes": [{"send_to": ["refusing", "busy"]}],
    })
    send(box, files)

    wait_until(lambda: queue_of(box, "refusing")["dead"] == len(ids), 20,
               lambda: f"not dead letters: {queue_of(box, 'refusing')}")
    for rows in attempts(box, "refusing").values():
        # The first rejection is final (earlier attempts may have met storescp between two associations).
        rejections = [i for i, a in enumerate(rows) if "reject" in (a["error"] or "")]
        assert rejections and rejections[0] == len(rows) - 1 and rows[-1]["outcome"] == "dead", \
            [dict(a) for a in rows]
        assert rows[-1]["error"] == ("association rejected permanently by the service user (the peer's"
                                     " application): no reason given (result 1, source 1, reason 1)"), rows[-1]["error"]
    # pynetdicom's own account of a rejection stays in the journal, at INFO: the appliance's
    # WARNING says it, and an ordinary outage is no ERROR.
    assert re.search(r" INFO +pynetdicom\.acse: Association Rejected", box.log()), box.log()[-3000:]
    assert not re.search(r" ERROR +pynetdicom\.\w+: (Association Rejected|Result: |Reason: )", box.log())
    wait_until(lambda: sum(len(r) for r in attempts(box, "busy").values()) >= 2 * len(ids), 20,
               lambda: f"a busy destination was not retried: {queue_of(box, 'busy')}")
    assert {a["outcome"] for rows in attempts(box, "busy").values() for a in rows} == {"retry"}
    state = queue_of(box, "busy")
    assert state["dead"] == 0 and state["pending"] + state["in_flight"] == len(ids) and state["last_error"], state

    held.release()
    wait_until(lambda: set(busy.stored_uids()) == ids, 20, lambda: f"not delivered: {queue_of(box, 'busy')}")
    refusing.stop()
    working = stack.enter_context(StoreSCP(tmp_path / "working", ae_title="REFUSES", port=refusing.port))
    time.sleep(1.5)
    assert working.receptions() == {}, "a dead letter was retried without `appliance retry`"
    assert re.search(r"\b3\b", box.cli("retry", "refusing").stdout)
    wait_until(lambda: set(working.receptions()) == ids, 20, lambda: f"not delivered: {queue_of(box, 'refusing')}")
    assert queue_of(box, "refusing")["dead"] == 0


def test_after_a_failure_one_instance_probes_the_destination(appliance_factory, stack, tmp_path) -> None:
    """A backlog waits for a PACS that is down, then refuses us for a few seconds (a DCMTK-based
    PACS answers "permanent" to any refusal), then works. While it is down, each retry records
    one attempt, not one for each waiting instance (on a box whose disk fills, those records
    are what the database's reserve is for); its refusal makes one dead letter per try, not a
    backlog of them, and waits the backoff; once it works, everything else goes out without
    `appliance retry`."""
    files = write_series(tmp_path / "ct", "probe", 1, 1, Series("CT", 40, 64, 64))
    ids = uids(files)
    port = closed_port()
    box = appliance_factory({"destinations": {"central": destination("PROBED", port)},
                             "routes": [{"send_to": ["central"]}]})
    send(box, files)

    def tries() -> int:
        return sum(len(rows) for rows in attempts(box, "central").values())

    wait_until(lambda: box.log().count("central unreachable") >= 4, 30, lambda: box.log()[-2000:])
    # one attempt per try, the first included: the study's other instances were not tried
    assert tries() <= box.log().count("central unreachable"), tries()

    refusing = StoreSCP(tmp_path / "refusing", ae_title="PROBED", flags=["--refuse"], port=port).start()
    try:
        wait_until(lambda: queue_of(box, "central")["dead"] >= 1, 30, lambda: f"queue: {queue_of(box, 'central')}")
    finally:
        refusing.stop()
    working = stack.enter_context(StoreSCP(tmp_path / "working", ae_title="PROBED", port=port))
    dead = queue_of(box, "central")["dead"]
    assert dead <= 2, queue_of(box, "central")
    wait_until(lambda: queue_of(box, "central")["delivered"] == len(ids) - dead, 30,
               lambda: f"queue: {queue_of(box, 'central')}")
    assert "to the dead letters; the next instance is tried in" in box.log()
    assert re.search(r"central reachable again after \d+ failed tries: what waits for it goes out now", box.log())
    box.cli("retry", "central")
    wait_until(lambda: set(working.receptions()) == ids, 30, lambda: f"queue: {queue_of(box, 'central')}")



def test_a_refusal_for_good_makes_one_dead_letter_per_try_even_of_a_whole_released_study(
        appliance_factory, stack, tmp_path) -> None:
    """A study held by stable_after is released whole, onto one claim, while the PACS refuses us
    "permanently" (as storescp --refuse, and DCMTK-based PACS in maintenance, do) — the first
    failure of this process: one dead letter, the rest waits the backoff. (All 30 were dead.)"""
    files = write_series(tmp_path / "ct", "held", 1, 1, Series("CT", 30, 32, 32))
    port = closed_port()
    refusing = stack.enter_context(StoreSCP(tmp_path / "refusing", ae_title="MAINT", flags=["--refuse"], port=port))
    slow_retry = {"initial_delay": "60s", "max_delay": "60s"}
    box = appliance_factory({"destinations": {"central": destination("MAINT", port, retry=slow_retry)},
                             "routes": [{"send_to": ["central"], "stable_after": "1s"}]})
    send(box, files)
    wait_until(lambda: queue_of(box, "central")["dead"] >= 1, 30, lambda: f"queue: {queue_of(box, 'central')}")
    time.sleep(1)
    state = queue_of(box, "central")
    assert (state["dead"], state["pending"]) == (1, 29), state
    assert refusing.receptions() == {}


def test_a_sop_class_the_pacs_does_not_take_holds_nothing_else_back(appliance_factory, stack, tmp_path) -> None:
    """A PACS that takes CT and not US: an association proposing only the US study's contexts
    is refused context by context. Its instances are dead letters, each with the reason, and
    the CT study behind it goes out at once — not after the destination's backoff (10 s and
    growing, by default), once for each US instance."""
    us = write_series(tmp_path / "us", "classes", 1, 1, Series("US", 5, 32, 32))
    ct = write_series(tmp_path / "ct", "classes", 2, 1, Series("CT", 5, 32, 32))
    scp = stack.enter_context(RecordingSCP("CTONLY", sop_classes=[CTImageStorage]))
    box = appliance_factory({"destinations": {"central": destination("CTONLY", scp.port,
                                                                     retry={"initial_delay": "60s",
                                                                            "max_delay": "60s"})},
                             "routes": [{"send_to": ["central"]}]})
    send(box, us)
    wait_until(lambda: queue_of(box, "central")["dead"] == 5, 30, lambda: f"queue: {queue_of(box, 'central')}")
    send(box, ct)
    wait_until(lambda: set(scp.stored_uids()) == uids(ct), 20, lambda: f"queue: {queue_of(box, 'central')}")
    letters = json.loads(box.cli("queue", "--json", "--dead").stdout)["dead_letters"]
    assert {d["sop_instance_uid"] for d in letters} == uids(us)
    assert all("accepted no presentation context" in d["error"] for d in letters), letters


def test_a_pacs_with_fewer_associations_than_max_associations_gets_everything_and_charges_nothing(
        appliance_factory, stack, tmp_path) -> None:
    """The PACS takes one association at a time and rejects more (transient, local limit
    exceeded, as pynetdicom and DCMTK do); the destination says max_associations: 3. The open
    association carries on; the rejected workers wait, charge no attempt to anything, and with
    max_attempts: 2 nothing becomes a dead letter."""
    files = [path for study in (1, 2, 3)
             for path in write_series(tmp_path / f"s{study}", "slots", study, 1, Series("CT", 10, 32, 32))]
    scp = stack.enter_context(RecordingSCP("ONESLOT", max_associations=1, delay=0.05))
    box = appliance_factory({"destinations": {"central": destination(
        "ONESLOT", scp.port, max_associations=3, retry={"initial_delay": "1s", "max_attempts": 2})},
        "routes": [{"send_to": ["central"]}]})
    send(box, files)
    wait_until(lambda: queue_of(box, "central")["delivered"] == 30, 60, lambda: f"queue: {queue_of(box, 'central')}")
    assert queue_of(box, "central")["dead"] == 0
    assert scp.stored_uids() == {uid: 1 for uid in uids(files)}
    assert sum(len(rows) for rows in attempts(box, "central").values()) == 30
    assert "it takes fewer at once than max_associations (3)" in box.log()


# ---- association use: reuse, grouping by study, parallel limit ----------------------------------------

def test_backlog_goes_out_on_reused_associations_by_study_in_arrival_order(appliance_factory, tmp_path) -> None:
    """With the destination down, two studies queue up (the first in two parts, the second in
    between); when it comes up they go out on a few associations carrying many C-STOREs, each
    study's instances together and in the order they arrived."""
    study_a = write_series(tmp_path / "a", "grouping", 1, 1, Series("CT", 15, 64, 64))
    study_b = write_series(tmp_path / "b", "grouping", 2, 1, Series("CT", 10, 64, 64), patient="PAT002")
    scp = RecordingSCP("GROUPS")  # not started yet: connections are refused
    box = appliance_factory({
        "destinations": {"groups": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["groups"]}],
    })
    arrival = study_a[:10] + study_b + study_a[10:]
    for part in (study_a[:10], study_b, study_a[10:]):
        send(box, part)
    wait_until(lambda: queue_of(box, "groups")["last_error"], 20, "no failed attempt while the SCP was down")
    with scp:
        wait_until(lambda: len(scp.stored()) >= len(arrival), 30, lambda: f"queue: {queue_of(box, 'groups')}")
        received = scp.stored()
    assert len(received) == len(arrival)
    associations = {r.association for r in received}
    assert len(associations) <= 3, f"{len(associations)} associations for {len(arrival)} instances"

    order = {sop_uid(p): i for i, p in enumerate(arrival)}
    study_of = {**{sop_uid(p): "A" for p in study_a}, **{sop_uid(p): "B" for p in study_b}}
    for association in associations:
        sequence = [r.sop_instance_uid for r in received if r.association == association]
        studies = [study_of[u] for u in sequence]
        runs = [s for i, s in enumerate(studies) if i == 0 or s != studies[i - 1]]
        assert len(runs) == len(set(runs)), f"association {association} interleaves studies: {studies}"
        for study in set(studies):
            in_study = [order[u] for u in sequence if study_of[u] == study]
            assert in_study == sorted(in_study), f"study {study} out of arrival order"


def test_parallel_associations_up_to_the_destinations_limit(appliance_factory, tmp_path) -> None:
    """``max_associations: 2`` with three studies queued: two associations work at once, never three."""
    scp = RecordingSCP("PARALLEL", delay=0.05, keep_datasets=False)
    box = appliance_factory({
        "destinations": {"parallel": destination(scp.ae_title, scp.port, max_associations=2)},
        "routes": [{"send_to": ["parallel"]}],
    })
    files = [p for study in (1, 2, 3)
             for p in write_series(tmp_path / str(study), "parallel", study, 1, Series("CT", 12, 64, 64))]
    send(box, files)
    wait_until(lambda: queue_of(box, "parallel")["last_error"], 20, "no failed attempt while the SCP was down")
    with scp:
        wait_until(lambda: len(scp.stored()) >= len(files), 30, lambda: f"queue: {queue_of(box, 'parallel')}")
    assert scp.max_concurrent == 2


def test_a_destination_named_scheduler_is_sent_to(appliance_factory, tmp_path) -> None:
    """The forwarder's scheduler thread was kept under the key of a destination named
    "scheduler"'s first worker, which was then never started: its images waited for ever."""
    scp = RecordingSCP("SCHED", keep_datasets=False)
    box = appliance_factory({
        "destinations": {"scheduler": destination(scp.ae_title, scp.port)},
        "routes": [{"send_to": ["scheduler"]}],
    })
    files = write_series(tmp_path / "s", "scheduler", 1, 1, Series("CT", 3, 64, 64))
    with scp:
        send(box, files)
        wait_until(lambda: len(scp.stored()) >= len(files), 30, lambda: f"queue: {queue_of(box, 'scheduler')}")


# ---- 8. one bad destination does not hold up the others ----------------------------------------------

def test_down_or_hung_destination_does_not_block_intake_or_other_destinations(appliance_factory, stack,
                                                                             tmp_path) -> None:
    """Routed to three destinations — one fine, one refusing connections, one that accepts TCP
    and never answers — intake acknowledges everything and the good destination receives it all
    promptly; the other two keep it pending with their last error visible."""
    good = stack.enter_context(RecordingSCP("GOOD", keep_datasets=False))
    hung = stack.enter_context(Blackhole())
    box = appliance_factory({
        "destinations": {
            "good": destination(good.ae_title, good.port),
            "down": destination("DOWN", closed_port()),
            "hung": destination("HUNG", hung.port, timeouts={"acse": "20s", "network": "20s", "dimse": "20s"}),
        },
        "routes": [{"send_to": ["hung", "down", "good"]}],
    })
    files = write_series(tmp_path / "ct", "blocking", 1, 1, Series("CT", 30, 128, 128))
    send(box, files)
    sent_at = time.monotonic()
    wait_until(lambda: len(good.stored()) >= len(files), 15, lambda: f"good has {len(good.stored())}")
    assert time.monotonic() - sent_at < 10, "the good destination waited on the hung one"
    assert set(good.stored_uids()) == uids(files)

    down = wait_until(lambda: (q := queue_of(box, "down"))["last_error"] and q, 20, "no error recorded for 'down'")
    assert down["pending"] + down["in_flight"] == len(files) and down["delivered"] == 0
    assert down["oldest_pending_age"] is not None and down["oldest_pending_age"] > 0
    hung_state = queue_of(box, "hung")
    assert hung_state["pending"] + hung_state["in_flight"] == len(files) and hung_state["delivered"] == 0

    table = box.cli("queue").stdout
    for name in ("good", "down", "hung"):
        assert name in table, table


def test_a_pacs_that_stops_reading_mid_instance_is_given_up_after_the_network_timeout(appliance_factory,
                                                                                        tmp_path) -> None:
    """A PACS that takes part of a large instance and then stops reading (its storage hangs;
    its TCP stack still answers) used to hold the send — and that destination's worker — for
    as long as the stall lasted. The send now fails after the network timeout: the attempt is
    recorded as delivery unknown, the association is gone, and once the PACS reads again the
    instance is delivered on a new one."""
    reading = threading.Event()

    def stall(received: int) -> None:  # the PACS's own association thread
        if received > 2_000_000:
            reading.wait(60)

    try:
        with ReadingSCP("STALLS", on_data=stall) as pacs:
            box = appliance_factory({
                "destinations": {"stalls": destination("STALLS", pacs.port, timeouts={"dimse": "3s", "network": "3s"})},
                "routes": [{"send_to": ["stalls"]}],
            })
            files = write_series(tmp_path / "big", "stall", 1, 1, Series("CT", 1, 4096, 4096))  # 33 MB
            send(box, files)
            stalled_at = time.monotonic()
            first = wait_until(lambda: attempts(box, "stalls"), 20,
                               lambda: f"nothing recorded {time.monotonic() - stalled_at:.0f} s into the stall")
            [(uid, tries)] = first.items()
            assert tries[0]["outcome"] in ("unknown", "retry"), dict(tries[0])
            assert not pacs.stored
            reading.set()
            wait_until(lambda: deliveries(box, "stalls")[uid]["state"] == "delivered", 30,
                       lambda: f"queue: {queue_of(box, 'stalls')}")
            assert [stored_uid for stored_uid, _ in pacs.stored] == [uid]
    finally:
        reading.set()


# ---- `appliance send` ----------------------------------------------------------------------------

def test_cli_send_imports_files_and_delivers_them(appliance_factory, stack, tmp_path) -> None:
    """``appliance send DIR --to archive`` imports a directory tree into the running appliance's
    cache and delivers it to that destination only; ``appliance send FILE`` follows the rules."""
    central = stack.enter_context(RecordingSCP("CENTRAL", keep_datasets=False))
    archive = stack.enter_context(RecordingSCP("ARCHIVE", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(central.ae_title, central.port),
                         "archive": destination(archive.ae_title, archive.port)},
        "routes": [{"send_to": ["central"]}],
    })
    tree = tmp_path / "import"
    files = (write_series(tree / "one", "cli-send", 1, 1, Series("CT", 5, 64, 64))
             + write_series(tree / "two" / "deeper", "cli-send", 1, 2, Series("CT", 3, 64, 64)))
    result = box.cli("send", str(tree), "--to", "archive")
    assert f"imported {len(files)}, skipped 0" in result.stdout, result.stdout + result.stderr

    wait_until(lambda: len(archive.stored()) >= len(files), 30, lambda: f"queue: {queue(box)}")
    assert set(archive.stored_uids()) == uids(files)
    assert set(cache_rows(box)) == uids(files)
    time.sleep(1)
    assert central.stored() == []  # --to overrides the rules
    assert {r["destination"] for r in deliveries(box).values()} == {"archive"}

    extra = write_series(tmp_path / "extra", "cli-send", 2, 1, Series("MR", 1, 64, 64))
    result = box.cli("send", str(extra[0]))
    assert "imported 1, skipped 0" in result.stdout, result.stdout + result.stderr
    wait_until(lambda: central.stored_uids() == {sop_uid(extra[0]): 1}, 30, lambda: f"queue: {queue(box)}")


def test_cli_send_skips_what_it_cannot_import_says_why_and_imports_the_rest(appliance_factory, tmp_path) -> None:
    """A path that does not exist and a file that is not DICOM are each skipped with the reason;
    the other files are imported, and the exit status says that something was skipped."""
    box = appliance_factory()
    files = write_series(tmp_path / "import", "cli-skip", 1, 1, Series("CT", 2, 64, 64))
    (tmp_path / "import" / "notes.txt").write_text("not DICOM\n")
    missing = tmp_path / "no-such-file.dcm"
    result = box.cli("send", str(tmp_path / "import"), str(missing), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imported 2, skipped 2" in result.stdout, result.stdout + result.stderr
    assert f"skipped {missing}: cannot read it: No such file or directory" in result.stderr, result.stderr
    assert "No such file or directory" in result.stderr, result.stderr
    assert f"skipped {tmp_path / 'import' / 'notes.txt'}: not a DICOM file" in result.stderr, result.stderr
    assert set(cache_rows(box)) == uids(files)


# ---- cache lifecycle ---------------------------------------------------------------------------------

def ct_to_good_mr_also_to_down(good: RecordingSCP, retention: dict[str, str]) -> dict[str, Any]:
    """CT goes to ``good``; MR to ``good`` and to a destination that is down for good."""
    return {
        "destinations": {"good": destination(good.ae_title, good.port),
                         "down": destination("DOWN", closed_port())},
        "routes": [{"when": {"Modality": "CT"}, "send_to": ["good"]},
                   {"when": {"Modality": "MR"}, "send_to": ["good", "down"]}],
        "retention": retention,
    }


def test_delivered_instances_are_evicted_after_retention_undelivered_never(appliance_factory, stack,
                                                                          tmp_path) -> None:
    """With ``keep_delivered_for: 1s``, instances delivered everywhere leave the cache a second
    after delivery (``appliance ls`` shows them evicted); instances whose destination is down stay."""
    good = stack.enter_context(RecordingSCP("GOOD", keep_datasets=False))
    box = appliance_factory(ct_to_good_mr_also_to_down(good, {"keep_delivered_for": "1s"}))
    ct = write_series(tmp_path / "ct", "evict", 1, 1, Series("CT", 3, 64, 64))
    mr = write_series(tmp_path / "mr", "evict", 2, 1, Series("MR", 2, 64, 64), patient="PAT002")
    send(box, ct + mr)
    wait_until(lambda: len(good.stored()) >= len(ct) + len(mr), 20, lambda: f"queue: {queue(box)}")
    index = cache_rows(box)
    ct_files = {sop_uid(p): Path(index[sop_uid(p)]["path"]) for p in ct}
    mr_files = [Path(index[sop_uid(p)]["path"]) for p in mr]

    gone_at: dict[str, float] = {}

    def all_gone() -> bool:
        for uid, path in ct_files.items():
            if uid not in gone_at and not path.exists():
                gone_at[uid] = time.time()
        return len(gone_at) == len(ct_files)

    wait_until(all_gone, 30, lambda: f"still cached: {[p for p in ct_files.values() if p.exists()]}", interval=0.05)
    delivered = deliveries(box, "good")
    for uid in ct_files:
        assert gone_at[uid] >= delivered[uid]["delivered_at"] + 1 - 0.1, "evicted before the retention window"
    time.sleep(2)
    assert all(p.exists() for p in mr_files), "an undelivered instance was evicted"

    index = cache_rows(box)
    assert {index[u]["state"] for u in ct_files} == {"evicted"}
    assert {index[sop_uid(p)]["state"] for p in mr} == {"cached"}
    listing = box.cli("ls").stdout
    ct_study = pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    mr_study = pydicom.dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID
    lines = {line.split()[-1]: line for line in listing.splitlines() if line.strip()}
    # The MR study still waits for the destination that is down.
    assert "evicted" in lines[ct_study] and "sending" in lines[mr_study], listing


def test_records_of_evicted_instances_are_forgotten_after_keep_history_for(appliance_factory, stack,
                                                                             tmp_path) -> None:
    """With ``keep_history_for: 1s``, an evicted instance's record, deliveries and attempts leave
    the database soon after; an instance still owed to a destination keeps all of its own."""
    good = stack.enter_context(RecordingSCP("GOOD", keep_datasets=False))
    box = appliance_factory(ct_to_good_mr_also_to_down(good, {"keep_delivered_for": "0s", "keep_history_for": "1s"}))
    ct = write_series(tmp_path / "ct", "history", 1, 1, Series("CT", 3, 64, 64))
    mr = write_series(tmp_path / "mr", "history", 2, 1, Series("MR", 2, 64, 64), patient="PAT002")
    send(box, ct + mr)
    wait_until(lambda: len(good.stored()) >= len(ct) + len(mr), 20, lambda: f"queue: {queue(box)}")
    ct_uids, mr_uids = {sop_uid(p) for p in ct}, {sop_uid(p) for p in mr}
    wait_until(lambda: not ct_uids & set(cache_rows(box)), 40, lambda: f"still recorded: {cache_rows(box).keys()}")

    rows = cache_rows(box)
    assert {rows[u]["state"] for u in mr_uids} == {"cached"} and all(Path(rows[u]["path"]).exists() for u in mr_uids)
    assert set(deliveries(box, "down")) == mr_uids and set(deliveries(box, "good")) == mr_uids
    waited = attempts(box, "down")
    # (after the first failure, one instance at a time is tried there: not each has an attempt)
    assert waited and set(waited) <= mr_uids and all(a["outcome"] == "retry" for u in waited for a in waited[u])
    assert not ct_uids & set(attempts(box, "good")), "attempts of a forgotten instance are left"
    assert "forgot the records of 3 evicted instance(s)" in box.log_path.read_text()


# ---- reload on SIGHUP -----------------------------------------------------------------------------

def test_sighup_reload_applies_to_new_work_keeps_associations_and_ignores_invalid_config(appliance_factory, stack,
                                                                                        tmp_path) -> None:
    """A valid new configuration sent with SIGHUP while an association is busy routes new
    instances by the new rules, and the busy association finishes its work undisturbed; an invalid
    one is logged and changes nothing."""
    first = stack.enter_context(RecordingSCP("FIRST", delay=0.1, keep_datasets=False))
    second = stack.enter_context(RecordingSCP("SECOND", keep_datasets=False))
    destinations = {"first": destination(first.ae_title, first.port),
                    "second": destination(second.ae_title, second.port)}
    box = appliance_factory({"destinations": destinations, "routes": [{"send_to": ["first"]}]})
    batch1 = write_series(tmp_path / "b1", "reload", 1, 1, Series("CT", 20, 64, 64))
    batch2 = write_series(tmp_path / "b2", "reload", 1, 2, Series("CT", 5, 64, 64))
    batch3 = write_series(tmp_path / "b3", "reload", 1, 3, Series("CT", 5, 64, 64))

    send(box, batch1)
    wait_until(lambda: len(first.stored()) >= 3, 20, "forwarding to 'first' did not start")
    edit_config(box, routes=[{"send_to": ["second"]}])
    box.reload()
    time.sleep(1)
    send(box, batch2)
    wait_until(lambda: len(first.stored()) >= len(batch1) and len(second.stored()) >= len(batch2), 30,
               lambda: f"queue: {queue(box)}")
    assert first.aborts == 0
    assert all(len(rows) == 1 for rows in attempts(box, "first").values()), "a C-STORE in flight was interrupted"
    assert set(first.stored_uids()) == uids(batch1) and set(second.stored_uids()) == uids(batch2)

    edit_config(box, routes=[{"send_to": ["nowhere"]}])
    box.reload()
    time.sleep(1)
    assert box.process is not None and box.process.poll() is None
    assert "nowhere" in box.log()  # the refusal names the problem
    send(box, batch3)
    wait_until(lambda: len(second.stored()) >= len(batch2) + len(batch3), 30, lambda: f"queue: {queue(box)}")
    assert set(first.stored_uids()) == uids(batch1)


def test_a_reload_that_moves_a_destination_sends_new_work_to_the_new_address(appliance_factory, stack,
                                                                             tmp_path) -> None:
    """A reload that gives a destination another address (a PACS replaced) while its association
    to the old one is open: what that association has in flight finishes there, and everything
    queued after the reload goes to the new address — not on the old association, kept open by
    the work that keeps coming."""
    old = stack.enter_context(RecordingSCP("OLDPACS", delay=0.05, keep_datasets=False))
    new = stack.enter_context(RecordingSCP("NEWPACS", keep_datasets=False))
    box = appliance_factory({"destinations": {"pacs": destination(old.ae_title, old.port)},
                             "routes": [{"send_to": ["pacs"]}]})
    before = write_series(tmp_path / "before", "moved", 1, 1, Series("CT", 30, 64, 64))
    after = write_series(tmp_path / "after", "moved", 2, 1, Series("CT", 10, 64, 64), patient="PAT002")
    send(box, before)
    wait_until(lambda: len(old.stored()) >= 3, 20, "forwarding to the old address did not start")
    edit_config(box, destinations={"pacs": destination(new.ae_title, new.port)})
    box.reload()
    wait_until(lambda: "destination pacs now NEWPACS" in box.log(), 10, "the reload was not applied")
    send(box, after)
    wait_until(lambda: len(old.stored()) + len(new.stored()) >= len(before) + len(after), 30,
               lambda: f"queue: {queue(box)}")
    assert not uids(after) & set(old.stored_uids()), "work queued after the reload went to the old address"
    assert set(new.stored_uids()) >= uids(after)
    assert old.stored_uids() + new.stored_uids() == Counter(uids(before) | uids(after)), "lost or sent twice"
    assert old.aborts == 0


def test_a_reload_that_corrects_an_address_is_tried_at_once(appliance_factory, stack, tmp_path) -> None:
    """A destination configured with a wrong port waits out its backoff (here 60 s) between
    attempts; the reload that corrects the port is tried at once, not after that backoff."""
    pacs = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
    retry = {"initial_delay": "60s", "max_delay": "60s", "jitter": 0}
    box = appliance_factory({"destinations": {"pacs": destination(pacs.ae_title, closed_port(), retry=retry)},
                             "routes": [{"send_to": ["pacs"]}]})
    files = write_series(tmp_path / "ct", "corrected-port", 1, 1, Series("CT", 2, 64, 64))
    send(box, files)
    wait_until(lambda: len(attempts(box, "pacs")) >= 1, 20, "no failed attempt was recorded")
    edit_config(box, destinations={"pacs": destination(pacs.ae_title, pacs.port, retry=retry)})
    reloaded = time.monotonic()
    box.reload()
    wait_until(lambda: set(pacs.stored_uids()) == uids(files), 20, lambda: f"queue: {queue(box)}")
    assert time.monotonic() - reloaded < 15


def test_a_destination_removed_and_added_again_while_its_association_closes_gets_its_worker_again(
        appliance_factory, stack, tmp_path, monkeypatch) -> None:
    """A reload removes a destination while its association is open, and the next one puts it
    back while that association is still closing (a PACS slow to answer A-RELEASE, across a
    slow VPN): what arrives afterwards goes out, with the PACS up, without waiting for yet
    another reload."""
    from pynetdicom.acse import ACSE

    send_release = ACSE.send_release
    slow = threading.Event()

    def late_release_answer(self, is_response=False):  # the SCP runs in this process, the box in its own
        if is_response and slow.is_set():
            time.sleep(8)  # longer than the box's ACSE timeout (5 s): it gives up waiting and aborts
        return send_release(self, is_response)

    monkeypatch.setattr(ACSE, "send_release", late_release_answer)
    pacs = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
    configured = {"destinations": {"pacs": destination(pacs.ae_title, pacs.port)}, "routes": [{"send_to": ["pacs"]}]}
    box = appliance_factory(configured)
    before = write_series(tmp_path / "before", "readded", 1, 1, Series("CT", 2, 64, 64))
    after = write_series(tmp_path / "after", "readded", 2, 1, Series("CT", 2, 64, 64), patient="PAT002")
    send(box, before)
    wait_until(lambda: set(pacs.stored_uids()) == uids(before), 20, lambda: f"queue: {queue(box)}")
    slow.set()
    edit_config(box, destinations={}, routes=[])
    box.reload()
    wait_until(lambda: "destination pacs worker 0 stops: no longer configured" in box.log(), 10,
               lambda: box.log()[-2000:])
    edit_config(box, **configured)
    box.reload()
    wait_until(lambda: box.log().count("forwarder: configuration reloaded") >= 2, 10, lambda: box.log()[-2000:])
    assert "association to PACS closed" not in box.log(), "the association closed before the destination was back"
    wait_until(lambda: "association to PACS closed" in box.log(), 15, lambda: box.log()[-2000:])
    slow.clear()
    send(box, after)
    wait_until(lambda: set(pacs.stored_uids()) == uids(before) | uids(after), 20,
               lambda: f"not sent after the destination came back: {queue(box)}")
    assert pacs.stored_uids() == Counter(uids(before) | uids(after))


def test_what_a_renamed_destination_was_sending_when_it_was_moved_follows_to_its_new_name(
        appliance_factory, stack, tmp_path) -> None:
    """A destination renamed in the file (reload) and its queue moved to the new name
    (``appliance move``) while its worker still sends the batch it had claimed, which the PACS
    then interrupts (0xA700 once): the rest of that batch goes to the new name, not back to the
    old one that nothing sends to any more — and nothing is sent twice."""
    port = free_port()
    box = appliance_factory({"destinations": {"pacs": destination("PACS", port)}, "routes": [{"send_to": ["pacs"]}]})
    files = write_series(tmp_path / "ct", "moved-in-flight", 1, 1, Series("CT", 60, 32, 32))
    send(box, files)  # the PACS is down: they wait
    wait_until(lambda: attempts(box, "pacs"), 20, "no failed try was recorded")
    pacs = stack.enter_context(RecordingSCP("PACS", delay=0.15, keep_datasets=False, port=port))
    refuse_next = threading.Event()

    def respond(uid: str, nth: int) -> int:
        if refuse_next.is_set():
            refuse_next.clear()
            return 0xA700
        return 0x0000

    pacs.respond = respond
    wait_until(lambda: len(pacs.stored()) >= 5, 20, lambda: f"forwarding did not start: {queue(box)}")
    edit_config(box, destinations={"pacs2": destination("PACS", port)}, routes=[{"send_to": ["pacs2"]}])
    box.reload()
    wait_until(lambda: "forwarder: configuration reloaded" in box.log(), 10, lambda: box.log()[-2000:])
    box.cli("move", "pacs", "pacs2")
    sending = len(pacs.stored())
    assert sending < len(files), "the batch was sent before the move: nothing in flight to follow"
    refuse_next.set()
    wait_until(lambda: set(pacs.stored_uids()) == uids(files), 40,
               lambda: f"{len(pacs.stored_uids())} of {len(files)} stored: {box.cli('queue').stdout}")
    assert pacs.stored_uids() == Counter(uids(files)), "sent twice"
    assert any(r.status == 0xA700 for r in pacs.receptions()), "the PACS never refused: the batch was not interrupted"
    waiting = {entry["name"]: entry for entry in queue(box)["destinations"]}
    assert waiting.get("pacs", {}).get("pending", 0) == 0, waiting
    rows = deliveries(box)
    assert {row["state"] for row in rows.values()} == {"delivered"}, box.cli("queue").stdout


def test_an_instance_the_pacs_aborts_on_does_not_hold_back_the_others(appliance_factory, stack,
                                                                      tmp_path) -> None:
    """A PACS that aborts the association on two instances of a study (ones it cannot parse),
    every time: they are retried with their backoff, and the rest of their study and the next
    study are delivered meanwhile — not held behind them for as long as the retry policy lasts
    (7 days by default), nor behind the two taking turns at leading each association. Without
    jitter, so that no luck lets the others through."""
    pacs = stack.enter_context(RecordingSCP("PACS", keep_datasets=False))
    retry = {"initial_delay": "1s", "factor": 2, "max_delay": "4s", "jitter": 0}
    box = appliance_factory({"destinations": {"pacs": destination(pacs.ae_title, pacs.port, retry=retry)},
                             "routes": [{"send_to": ["pacs"]}]})
    first = write_series(tmp_path / "s1", "poison", 1, 1, Series("CT", 5, 64, 64))
    second = write_series(tmp_path / "s2", "poison", 2, 1, Series("CT", 5, 64, 64), patient="PAT002")
    poisons = {sop_uid(first[0]), sop_uid(first[1])}
    pacs.respond = lambda uid, nth: ABORT if uid in poisons else 0x0000
    send(box, first + second)
    others = uids(first[2:] + second)
    wait_until(lambda: set(pacs.stored_uids()) == others, 30,
               lambda: f"delivered {len(pacs.stored_uids())} of {len(others)}; queue: {queue_of(box, 'pacs')}")
    wait_until(lambda: all(len(attempts(box, "pacs").get(p, [])) >= 2 for p in poisons), 30,
               "the aborted instances are not retried")
    for poison in poisons:
        row = deliveries(box, "pacs")[poison]
        assert row["state"] in ("pending", "in_flight") and row["last_status"] is None, dict(row)
        assert f"pacs: {poison} not delivered (no response); trying pacs again in" in box.log()
    # The rest of the first study went in the order it arrived.
    order = [r.sop_instance_uid for r in pacs.stored() if r.sop_instance_uid in uids(first)]
    assert order == [sop_uid(p) for p in first[2:]], order


def test_parallel_associations_carry_a_study_one_at_a_time_in_order(appliance_factory, stack, tmp_path) -> None:
    """With ``max_associations: 3`` and studies arriving while they are forwarded, a study is
    never on two associations at the same moment, and reaches the PACS in the order it arrived;
    the associations carry different studies in parallel."""
    pacs = stack.enter_context(RecordingSCP("PACS", delay=0.05, keep_datasets=False))
    box = appliance_factory({"destinations": {"pacs": destination(pacs.ae_title, pacs.port, max_associations=3)},
                             "routes": [{"send_to": ["pacs"]}]})
    studies = [write_series(tmp_path / f"s{n}", "parallel", n, 1, Series("CT", 10, 64, 64), patient=f"PAT{n}")
               for n in range(1, 5)]
    send(box, [f for study in studies for f in study])
    total = sum(len(study) for study in studies)
    wait_until(lambda: len(pacs.stored()) >= total, 60, lambda: f"queue: {queue(box)}")
    receptions = pacs.stored()
    assert len(receptions) == total and pacs.max_concurrent >= 2
    for study in studies:
        order = [sop_uid(f) for f in study]
        got = [r for r in receptions if r.sop_instance_uid in set(order)]
        assert [r.sop_instance_uid for r in got] == order, "a study reached the PACS out of order"
        # Each C-STORE takes the PACS 0.05 s: one that follows on another association sooner
        # was sent while the first was still in flight.
        by_time = sorted(got, key=lambda r: r.at)
        for a, b in zip(by_time, by_time[1:], strict=False):
            assert a.association == b.association or b.at - a.at >= 0.045, "a study on two associations at once"


@pytest.mark.parametrize("change", ["rerouted", "discarded"])
def test_a_correction_the_rules_send_elsewhere_does_not_go_where_the_first_version_was_going(
        appliance_factory, stack, tmp_path, change: str) -> None:
    """The first version of an image is held for a research destination, which gets it
    anonymised; its correction (same SOP Instance UID) is an MR, which the rules send to the
    central PACS only — or is marked a scout, which a rule discards. The correction must not
    reach the research destination at all: not unedited, not in place of the first version."""
    research = stack.enter_context(RecordingSCP("RESEARCH", keep_datasets=False))
    central = stack.enter_context(RecordingSCP("CENTRAL", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"research": destination(research.ae_title, research.port),
                         "central": destination(central.ae_title, central.port)},
        "routes": [{"when": {"SeriesDescription": "SCOUT"}, "discard": True},
                   {"when": {"Modality": "CT"}, "send_to": ["research"], "set": {"PatientName": "ANONYMOUS"},
                    "stable_after": "3s"},
                   {"when": {"Modality": "MR"}, "send_to": ["central"]}],
    })
    first = write_series(tmp_path / "ct", "rerouted", 1, 1, Series("CT", 1, 64, 64))[0]
    corrected = tmp_path / "corrected.dcm"
    dataset = pydicom.dcmread(first)
    if change == "rerouted":
        dataset.Modality = "MR"
    else:
        dataset.SeriesDescription = "SCOUT"
    dataset.save_as(corrected)
    send(box, [first])
    send(box, [corrected])
    if change == "rerouted":
        wait_until(lambda: len(central.stored()) == 1, 20, lambda: f"queue: {queue(box)}")
    time.sleep(5)  # past the research rule's stable_after
    assert research.receptions() == [], "the correction went where only the first version was going"
    assert set(deliveries(box)) <= {sop_uid(first)} and "research" not in {
        r["destination"] for r in deliveries(box).values()}
    assert "no longer send to research" in box.log()


def test_send_to_one_destination_keeps_what_the_rules_queued_for_another(appliance_factory, stack,
                                                                         tmp_path) -> None:
    """An image waits for a destination that is busy (0xA700), to which the rules send it with
    an edit; an admin sends the same file to a second destination by hand (``appliance send
    --to``). The second gets it as it is; the first still gets it with its rule's edit."""
    busy = stack.enter_context(RecordingSCP("BUSY", status=0xA700))
    other = stack.enter_context(RecordingSCP("OTHER"))
    box = appliance_factory({
        "destinations": {"busy": destination(busy.ae_title, busy.port),
                         "other": destination(other.ae_title, other.port)},
        "routes": [{"send_to": ["busy"], "set": {"InstitutionName": "EDITED FOR BUSY"}}],
    })
    image = write_series(tmp_path / "ct", "send-to", 1, 1, Series("CT", 1, 64, 64))[0]
    send(box, [image])
    wait_until(lambda: len(busy.receptions()) >= 1, 20, "the busy destination was never tried")
    result = box.cli("send", str(image), "--to", "other")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(other.stored()) == 1, 20, lambda: f"queue: {queue(box)}")
    busy.status = 0x0000
    wait_until(lambda: len(busy.stored()) == 1, 30, lambda: f"queue: {queue(box)}")
    original = pydicom.dcmread(image).InstitutionName
    assert other.stored()[0].dataset.InstitutionName == original
    assert busy.stored()[0].dataset.InstitutionName == "EDITED FOR BUSY"


def test_a_study_of_more_sop_classes_than_one_association_can_propose_is_delivered_whole(
        appliance_factory, stack, tmp_path, monkeypatch) -> None:
    """A held study of 65 instances of 65 SOP classes (private ones, as some vendors' objects
    are) is released as one batch: 130 (class, syntax) pairs, more than the 128 presentation
    contexts one association may carry. Every instance reaches the PACS, which accepts all of
    them; none is a dead letter for a class that was never proposed to it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid
    from pynetdicom import _config

    classes = [f"1.2.826.0.1.3680043.9.9999.2.{n}" for n in range(1, 66)]
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", True)  # the test PACS stores private classes
    pacs = stack.enter_context(RecordingSCP("MANY", sop_classes=classes, keep_datasets=False))
    box = appliance_factory({"destinations": {"many": destination(pacs.ae_title, pacs.port)},
                             "routes": [{"send_to": ["many"], "stable_after": "2s"}]})
    study = generate_uid()
    datasets = []
    for number, sop_class in enumerate(classes, start=1):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientID, ds.Modality, ds.InstanceNumber = "MANY", "OT", number
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    ae = AE(ae_title="VENDOR")
    for sop_class in classes:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title=box.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    assert statuses == [0] * len(datasets)
    wait_until(lambda: len(pacs.stored_uids()) == len(datasets), 30, lambda: f"queue: {queue_of(box, 'many')}")
    state = queue_of(box, "many")
    assert state["dead"] == 0 and state["delivered"] == len(datasets), state
    assert set(pacs.stored_uids()) == {str(ds.SOPInstanceUID) for ds in datasets}


def test_a_replacement_that_arrives_while_the_old_version_is_sent_is_sent_too(appliance_factory, stack,
                                                                              tmp_path) -> None:
    """A modality sends an image, then a corrected one with the same SOP Instance UID (another
    patient name) while the first is still on its way to the PACS (the PACS has not answered
    yet). The correction replaces the cached copy (``node.on_duplicate: replace``, the default)
    and must reach the PACS too: the PACS's answer for the old version does not count as the
    delivery of the new one."""
    arrived, release = threading.Event(), threading.Event()

    def respond(uid: str, nth: int) -> int:
        if nth == 1:  # hold the answer to the first version until the correction is cached
            arrived.set()
            release.wait(30)
        return 0x0000

    scp = stack.enter_context(RecordingSCP("PACS"))
    scp.respond = respond
    box = appliance_factory({"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                             "routes": [{"send_to": ["pacs"]}]})
    first = write_series(tmp_path / "first", "corrected", 1, 1, Series("CT", 1, 64, 64))[0]
    corrected = tmp_path / "corrected.dcm"
    dataset = pydicom.dcmread(first)
    dataset.PatientName = "CORRECTED^NAME"
    dataset.save_as(corrected)
    uid = sop_uid(first)

    assert not storescu(box.port, [first]).failed
    assert arrived.wait(20), "the first version never reached the PACS"
    assert not storescu(box.port, [corrected]).failed
    release.set()

    wait_until(lambda: scp.stored_uids()[uid] == 2, 20,
               lambda: f"the correction was not sent: {dict(deliveries(box, 'pacs')[uid])}")
    names = [str(r.dataset.PatientName) for r in scp.stored() if r.dataset is not None]
    assert names[-1] == "CORRECTED^NAME", names
    wait_until(lambda: deliveries(box, "pacs")[uid]["state"] == "delivered", 10,
               lambda: str(dict(deliveries(box, "pacs")[uid])))


def test_send_to_another_destination_while_the_rules_destination_sends_the_image_does_not_strand_it(
        appliance_factory, stack, tmp_path) -> None:
    """While the central PACS is being sent an image (its answer not yet given), an admin sends
    the same image, exported from the modality, to the archive by hand (``appliance send
    --to``). The export replaces the cached copy; the central PACS must still get the image
    (the new copy), and the rest of the study must still reach it: nothing stays in flight."""
    arrived, release = threading.Event(), threading.Event()
    files = write_series(tmp_path / "s", "send-to-in-flight", 1, 1, Series("CT", 3, 64, 64))
    held = sop_uid(files[1])

    def respond(uid: str, nth: int) -> int:
        if uid == held and nth == 1:  # hold the answer until the export has replaced the cached copy
            arrived.set()
            release.wait(30)
        return 0x0000

    central = stack.enter_context(RecordingSCP("CENTRAL", keep_datasets=False))
    central.respond = respond
    archive = stack.enter_context(RecordingSCP("ARCHIVE", keep_datasets=False))
    box = appliance_factory({
        "destinations": {"central": destination(central.ae_title, central.port),
                         "archive": destination(archive.ae_title, archive.port)},
        "routes": [{"send_to": ["central"]}],
    })
    send(box, files[:2])
    assert arrived.wait(20), "the image never reached the central PACS"
    export = tmp_path / "export.dcm"
    dataset = pydicom.dcmread(files[1])
    dataset.file_meta.ImplementationVersionName = "EXPORTER"  # other bytes, same image
    dataset.save_as(export, enforce_file_format=True)
    result = box.cli("send", str(export), "--to", "archive")
    assert "imported 1, skipped 0" in result.stdout, result.stdout + result.stderr
    release.set()
    wait_until(lambda: archive.stored_uids() == {held: 1}, 20, lambda: f"queue: {queue(box)}")
    send(box, files[2:])  # a late image of the same study

    wait_until(lambda: queue_of(box, "central")["delivered"] == 3, 30,
               lambda: f"queue: {queue_of(box, 'central')}; {box.cli('queue').stdout}")
    assert central.stored_uids()[held] == 2  # the first copy, then the export that replaced it
    assert set(central.stored_uids()) == uids(files)
    state = queue_of(box, "central")
    assert (state["pending"], state["in_flight"]) == (0, 0), state
