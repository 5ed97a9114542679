"""The durable receiver, seen from a modality (DCMTK's storescu/echoscu, a pynetdicom SCU) and
from the admin (the cache directory, the database, ``appliance ls``)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from .corpus import Series, make_instance, write_series
from .peers import DCMTK_ENV, ApplianceProcess, parse_storescu, read_until_acknowledged, require_tool, storescu


def rows(box: ApplianceProcess) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(box.data / "appliance.db") as conn:
        conn.row_factory = sqlite3.Row
        return {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances WHERE state = 'cached'")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_dataset(original: Path, cached: Path) -> None:
    a, b = pydicom.dcmread(original), pydicom.dcmread(cached)
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert a == b  # every element of the data set, pixel data included, as sent
    assert a.PixelData == b.PixelData


def incoming_files(box: ApplianceProcess) -> list[Path]:
    return list((box.data / "incoming").iterdir())


def cache_files(box: ApplianceProcess) -> list[Path]:
    return [p for p in (box.data / "cache").rglob("*") if p.is_file()]


def send(port: int, datasets: list[pydicom.Dataset], aet: str = "PYSCU", aec: str = "EDGE",
         between: Callable[[int], None] | None = None) -> tuple[list[int], bool]:
    """C-STORE datasets on one association; returns their statuses and whether the association
    was still up at the end. ``between(i)`` runs before the i-th store."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established
    result = []
    for i, ds in enumerate(datasets):
        if between:
            between(i)
        status = assoc.send_c_store(ds)
        result.append(int(status.Status) if "Status" in status else -1)
    still_up = assoc.is_established
    assoc.release()
    return result, still_up


# ---- what arrives is what was sent ------------------------------------------------------------

def test_storescu_corpus_is_cached_intact_and_indexed(appliance_factory, corpus) -> None:
    box = appliance_factory()
    plain = [p for name in ("ct", "mr", "us", "cr", "dx", "mg") for p in corpus[name]]
    results = [storescu(box.port, plain)]
    # storescu proposes one compressed family per run.
    for name, flag in (("rle", "-xr"), ("jpegls", "-xt"), ("j2k", "-xv")):
        results.append(storescu(box.port, corpus[name], extra=[flag]))
    sent = [p for r in results for p in r.succeeded]
    for r in results:
        assert r.returncode == 0 and not r.failed, r.output
    assert len(sent) == sum(len(v) for v in corpus.values())

    index = rows(box)
    assert len(index) == len(sent)
    for original in sent:
        ds = pydicom.dcmread(original, stop_before_pixels=True)
        row = index[ds.SOPInstanceUID]
        cached = Path(row["path"])
        assert_same_dataset(original, cached)
        assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["patient_id"] == ds.PatientID
        assert row["modality"] == ds.Modality
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["calling_ae"] == "MODALITY" and row["called_ae"] == "EDGE"
        assert row["source_ip"] == "127.0.0.1"
        assert row["size"] == cached.stat().st_size
        assert row["sha256"] == sha256(cached)
        assert row["received_at"] > 0
    assert incoming_files(box) == []

    listing = box.cli("ls").stdout
    assert "TEST^PAT004 (PAT004)" in listing and "CR" in listing
    studies = {r["study_instance_uid"] for r in index.values()}
    assert f"{len(studies)} studies, {len(sent)} instances" in listing


def ct_association(box: ApplianceProcess) -> Any:
    """An association with the appliance for CT in Explicit VR Little Endian."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
    assert assoc.is_established
    return assoc


def store_request(ds: pydicom.Dataset, message_id: int) -> C_STORE:
    """A C-STORE-RQ primitive for ``ds``, without its data set."""
    request = C_STORE()
    request.MessageID, request.Priority = message_id, 0
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return request


@pytest.mark.parametrize("how", ["shutdown", "reset"])
def test_an_instance_cut_off_mid_transfer_leaves_nothing_behind(appliance_factory, how: str) -> None:
    """The connection drops with half of a data set received (closed, or reset: a modality
    switched off): nothing is cached, indexed or left in incoming/ (no restart needed to clean
    up), and the journal says so in a line, not an ERROR with a traceback."""
    box = appliance_factory()
    ds = make_instance("cut-off", 1, 1, 1, Series("CT", 1, 512, 512))
    assoc = ct_association(box)
    request = store_request(ds, 1)
    request.DataSet = io.BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    assert len(pdus) > 10
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 10
    while not incoming_files(box) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert incoming_files(box), "the appliance never started writing the data set"
    raw = assoc.dul.socket.socket
    if how == "shutdown":
        raw.shutdown(socket.SHUT_RDWR)  # the cable is pulled
    else:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # RST
    deadline = time.monotonic() + 10
    while "aborted after" not in box.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "aborted after" in box.log(), box.log()
    assert "removed the partly received instance" in box.log()
    assert incoming_files(box) == [] and cache_files(box) == [] and rows(box) == {}
    assert "Traceback" not in box.log() and " ERROR " not in box.log(), box.log()
    assoc.abort()


def test_a_c_store_request_without_a_data_set_is_answered_cannot_understand(appliance_factory) -> None:
    """A C-STORE-RQ whose command says it carries no data set (Data Set Type 0101H): 0xC000 and
    a line in the journal, not an exception in the handler (and 0xC211); the association goes on."""
    box = appliance_factory()
    ds = make_instance("no-data-set", 1, 1, 1, Series("CT", 1, 16, 16))
    assoc = ct_association(box)
    # Hold the association's own loop off the DIMSE queue (as its send_*() do), or it takes
    # the response as an unexpected message before this test can.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        request = store_request(ds, 7)
        assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)  # no DataSet: type 0101H
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None and int(response.Status) == 0xC000, response
        assert assoc.is_established
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    assert "its C-STORE request carries no data set" in box.log()
    assert "Traceback" not in box.log()
    assert rows(box) == {}


def test_echo_and_cli_echo(appliance_factory) -> None:
    box = appliance_factory()
    require_tool("echoscu")
    proc = subprocess.run(["echoscu", "-aec", "EDGE", "127.0.0.1", str(box.port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    ok = box.cli("echo", "127.0.0.1", str(box.port), "EDGE", check=False)
    assert ok.returncode == 0 and "C-ECHO OK" in ok.stdout
    bad = box.cli("echo", "127.0.0.1", str(box.port), "NOTEDGE", check=False)
    assert bad.returncode == 1 and bad.stdout.strip().endswith(
        "association rejected permanently by the service user (the peer's application): called AE title not"
        " recognised (result 1, source 1, reason 7)"), bad.stdout


def test_connections_closed_before_any_association_request_hold_no_association_slot(appliance_factory) -> None:
    """TCP health checks and port scans connect and close (or send something that is not
    DICOM) without an A-ASSOCIATE-RQ. Each must give its slot of node.max_associations back at
    once, not after the ACSE timeout (30 s): a check every second would keep modalities out."""
    box = appliance_factory({"node": {"max_associations": 4}})
    for index in range(12):
        with socket.create_connection(("127.0.0.1", box.port)) as probe:
            if index % 3 == 0:
                probe.sendall(b"GET / HTTP/1.0\r\n\r\n")
    time.sleep(0.5)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 10
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
    try:
        assert assoc.is_established, "rejected: the probes still hold the association slots"
        assert time.monotonic() - started < 5
        assert assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_modality_that_associates_again_at_once_is_not_refused_at_the_limit(appliance_factory) -> None:
    """A modality that sends each image on an association of its own opens the next one the
    moment the last is released. With node.max_associations 1, the one just released must not
    still count against the limit while its thread winds down."""
    box = appliance_factory({"node": {"max_associations": 1}})
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    refused = 0
    for _ in range(20):
        assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
        if not assoc.is_established:
            refused += 1
            continue
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    assert refused == 0, f"{refused} of 20 associations refused"


def test_presentation_contexts_accept_storage_in_a_known_syntax_and_nothing_else(appliance_factory) -> None:
    """What a modality probing the box learns, and what it may then send: a storage class
    (standard, private, or newer than pydicom's dictionary) is accepted in the first transfer
    syntax it proposes that is one (a vendor's private syntax before it is passed over); one
    proposed only in a syntax nobody knows is refused (result 4: its instances could never be
    passed on); Modality Worklist and Storage Commitment are refused (result 3: not served
    here); SCP/SCU role selection is answered "SCU only", and a context proposing the
    requestor only as SCP is refused."""
    from pynetdicom import build_context, build_role

    box = appliance_factory()
    private_syntax, worklist, commitment = "1.2.840.113619.5.2", "1.2.840.10008.5.1.4.31", "1.2.840.10008.1.20.1"
    ct, mr = CTImageStorage, "1.2.840.10008.5.1.4.1.1.4"
    vendor, newer = "1.3.12.2.1107.5.9.1", "1.2.840.10008.5.1.4.1.1.999"  # Siemens CSA non-image; a future class
    ae = AE(ae_title="PROBE")
    ae.requested_contexts = [
        build_context(ct, [private_syntax, ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        build_context(mr, [private_syntax]),
        build_context(vendor, [ExplicitVRLittleEndian]),
        build_context(newer, [ExplicitVRLittleEndian]),
        build_context(worklist, [ExplicitVRLittleEndian]),
        build_context(commitment, [ExplicitVRLittleEndian]),
        build_context("1.2.840.10008.5.1.4.1.1.7", [ExplicitVRLittleEndian]),  # Secondary Capture
        build_context("1.2.840.10008.5.1.4.1.1.1", [ExplicitVRLittleEndian]),  # CR
    ]
    roles = [build_role("1.2.840.10008.5.1.4.1.1.7", scu_role=True, scp_role=True),
             build_role("1.2.840.10008.5.1.4.1.1.1", scu_role=False, scp_role=True)]
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE", ext_neg=roles)
    assert assoc.is_established
    try:
        results = {str(cx.abstract_syntax): (cx.result, str(cx.transfer_syntax[0]))
                   for cx in assoc.accepted_contexts + assoc.rejected_contexts}
        secondary_capture = next(cx for cx in assoc.accepted_contexts
                                 if cx.abstract_syntax == "1.2.840.10008.5.1.4.1.1.7")
    finally:
        assoc.release()
    assert results[str(ct)] == (0x00, ImplicitVRLittleEndian)
    assert results[mr][0] == 0x04
    assert results[vendor][0] == 0x00 and results[newer][0] == 0x00
    assert results[worklist][0] == 0x03 and results[commitment][0] == 0x03
    assert (secondary_capture.as_scu, secondary_capture.as_scp) == (True, False)  # the prober sends; the box receives
    assert results["1.2.840.10008.5.1.4.1.1.1"][0] != 0x00


# ---- power cuts ---------------------------------------------------------------------------------

def test_sigkill_while_receiving_loses_no_acknowledged_instance(appliance_factory, tmp_path) -> None:
    """Kill -9 the appliance at random moments while storescu streams; after each restart
    every instance storescu saw acknowledged is present, readable, indexed and intact."""
    require_tool("storescu")
    box = appliance_factory()
    rng = random.Random(os.environ.get("CRASH_SEED", "durable"))
    acknowledged: list[Path] = []
    partial_rounds = 0
    for round_no in range(5):
        files = write_series(tmp_path / f"round{round_no}", "crash", 1, round_no + 1, Series("CT", 300, 256, 256))
        sender = subprocess.Popen(
            ["storescu", "-v", "-nh", "-aet", "MODALITY", "-aec", "EDGE", "127.0.0.1", str(box.port), *map(str, files)],
            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # A random moment mid-stream: after a random share of this round has been acknowledged
        # (a fixed delay would drift past the round's end as the appliance gets faster).
        before = read_until_acknowledged(sender, rng.randint(5, 280))
        box.kill()
        out, _ = sender.communicate(timeout=60)
        result = parse_storescu(sender.returncode, before + out)
        acknowledged += result.succeeded
        if 0 < len(result.succeeded) < len(files):
            partial_rounds += 1
        box.start()  # recovery runs at start-up

        index = rows(box)
        for original in acknowledged:
            ds = pydicom.dcmread(original, stop_before_pixels=True)
            assert ds.SOPInstanceUID in index, f"round {round_no}: acknowledged {original.name} is lost"
            cached = Path(index[ds.SOPInstanceUID]["path"])
            assert index[ds.SOPInstanceUID]["sha256"] == sha256(cached)
            assert_same_dataset(original, cached)
        assert incoming_files(box) == [], "temporary files survived the restart"
        assert {str(p) for p in cache_files(box)} == {r["path"] for r in index.values()}
        with sqlite3.connect(box.data / "appliance.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The kills must have landed mid-stream for this test to mean anything.
    assert partial_rounds >= 3, f"only {partial_rounds} kills landed mid-stream"
    assert acknowledged


# ---- who may send -------------------------------------------------------------------------------

def echoscu(port: int, aet: str, aec: str) -> subprocess.CompletedProcess[str]:
    require_tool("echoscu")
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=30)


def test_wrong_called_ae_is_rejected(appliance_factory) -> None:
    box = appliance_factory()
    proc = echoscu(box.port, "MODALITY", "SOMEONE")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr
    assert 'called AE title "SOMEONE" is not ours' in box.log()
    assert echoscu(box.port, "MODALITY", "EDGE").returncode == 0


def test_calling_ae_allow_list(appliance_factory) -> None:
    box = appliance_factory({"node": {"allowed_calling_aes": ["CT_SCANNER1", "US_ROOM2"]}})
    assert echoscu(box.port, "CT_SCANNER1", "EDGE").returncode == 0
    proc = echoscu(box.port, "INTRUDER", "EDGE")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    assert 'calling AE title "INTRUDER" is not in node.allowed_calling_aes' in box.log()


def test_source_network_allow_list(appliance_factory) -> None:
    box = appliance_factory({"node": {"bind_address": "0.0.0.0", "allowed_networks": ["192.0.2.0/24", "127.0.0.2"]}})

    def associate_from(address: str) -> bool:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE", bind_address=(address, 0))
        established = assoc.is_established
        if established:
            assoc.release()
        return bool(established) and not assoc.is_rejected

    assert associate_from("127.0.0.2")
    assert not associate_from("127.0.0.1")
    assert "source address 127.0.0.1 is not in node.allowed_networks" in box.log()


# ---- a full disk ----------------------------------------------------------------------------------

def assert_second_of_three_refused(box: ApplianceProcess, disk: Path, ballast_bytes: Callable[[], int],
                                   why: str) -> None:
    """Three CT slices on one association; before the second, ``ballast_bytes()`` bytes are
    written to ``disk``, and removed before the third. The second must be refused with 0xA700,
    the association stay up, and only the other two be cached, for the reason ``why`` (logged)."""
    datasets = [make_instance("disk", 1, 1, n, Series("CT", 3, 512, 512)) for n in (1, 2, 3)]
    ballast = disk / "ballast"

    def between(i: int) -> None:
        if i == 1:
            with ballast.open("wb") as out:
                out.write(b"\0" * ballast_bytes())
        if i == 2:  # space is back before the third
            ballast.unlink()

    statuses, still_up = send(box.port, datasets, between=between)
    assert statuses == [0x0000, 0xA700, 0x0000]
    assert still_up, "a full disk must refuse the instance, not abort the association"
    index = rows(box)
    assert datasets[0].SOPInstanceUID in index and datasets[2].SOPInstanceUID in index
    assert datasets[1].SOPInstanceUID not in index
    assert len(cache_files(box)) == 2 and incoming_files(box) == []
    assert why in box.log()


def test_below_low_watermark_refuses_with_a700_then_resumes(appliance_factory, small_disk) -> None:
    box = appliance_factory({"storage": {"path": str(small_disk / "data"), "disk": {"min_free": "40MB"}}})
    # 30 MB of the 64 MB tmpfs: below the watermark before the second C-STORE
    assert_second_of_three_refused(box, small_disk, lambda: 30_000_000, "below storage.disk.min_free")


def test_a_full_box_says_so_once_per_association_not_once_per_instance(appliance_factory) -> None:
    """A modality sends a study to a box below its low watermark: each instance is refused
    (0xA700), the journal says why once, and the association's closing line counts them."""
    box = appliance_factory({"storage": {"disk": {"min_free": "99.9%"}}})
    datasets = [make_instance("full", 1, 1, n, Series("CT", 5, 64, 64)) for n in range(1, 6)]
    statuses, still_up = send(box.port, datasets)
    assert statuses == [0xA700] * 5 and still_up
    wait_until_logged = time.monotonic() + 10
    while "5 refused" not in box.log() and time.monotonic() < wait_until_logged:
        time.sleep(0.1)
    assert box.log().count("below storage.disk.min_free") == 1, box.log()
    assert "stored (0.0 MB), 5 refused" in box.log()


@pytest.mark.parametrize("level", ["info", "debug"])  # debug: pynetdicom's own receive path
def test_a_disk_that_fills_mid_transfer_refuses_that_instance_and_keeps_the_association(
        appliance_factory, small_disk, level: str) -> None:
    """No watermark configured, and the disk fills while a data set is being written (ENOSPC):
    that C-STORE is refused with 0xA700, its partial file is removed, and once space is back the
    next instance on the same association is stored."""
    box = appliance_factory({"storage": {"path": str(small_disk / "data"), "disk": {"min_free": "0%"}},
                             "logging": {"level": level}})

    def all_but_100_kb() -> int:  # less room than one 0.5 MB CT slice needs
        st = os.statvfs(small_disk)
        return st.f_bavail * st.f_frsize - 100_000

    assert_second_of_three_refused(box, small_disk, all_but_100_kb, "No space left on device")


# ---- the same SOP Instance UID twice ---------------------------------------------------------------

@pytest.mark.parametrize(
    "policy, second_status, kept",
    [("replace", 0x0000, "second"), ("keep-first", 0x0000, "first"), ("reject", 0x0111, "first")],
)
def test_duplicate_policy(appliance_factory, policy: str, second_status: int, kept: str) -> None:
    box = appliance_factory({"node": {"on_duplicate": policy}})
    first = make_instance("dup", 1, 1, 1, Series("CT", 1, 128, 128))
    second = make_instance("dup", 1, 1, 1, Series("CT", 1, 128, 128))
    second.PatientComments = "second copy"
    statuses, _ = send(box.port, [first, second])
    assert statuses == [0x0000, second_status]

    index = rows(box)
    row = index[first.SOPInstanceUID]
    cached = pydicom.dcmread(row["path"])
    assert ("PatientComments" in cached) == (kept == "second")
    assert row["receive_count"] == 2
    assert len(cache_files(box)) == 1
    with sqlite3.connect(box.data / "appliance.db") as conn:
        outcomes = [r[0] for r in conn.execute("SELECT outcome FROM receptions WHERE sop_instance_uid = ?",
                                               (first.SOPInstanceUID,))]
    assert outcomes == [{"replace": "replaced", "keep-first": "kept-first", "reject": "rejected"}[policy]]


def test_a_data_set_cut_short_by_its_sender_is_refused_not_cached(appliance_factory, tmp_path) -> None:
    """A sender that streams a file's bytes as they are (pynetdicom's chunked send here; routers
    and bulk senders do the same) passes on a file cut short on its disk as a complete message
    whose data set ends inside its pixel data. That is refused as unreadable (0xC000, as DCMTK
    answers) and nothing is cached; the next, whole instance on the same association is stored."""
    from pynetdicom import _config

    box = appliance_factory()
    whole, cut = (make_instance("cut-by-sender", 1, 1, n, Series("CT", 2, 256, 256)) for n in (1, 2))
    whole_path, cut_path = tmp_path / "whole.dcm", tmp_path / "cut.dcm"
    whole.save_as(whole_path, enforce_file_format=True)
    cut.save_as(cut_path, enforce_file_format=True)
    with open(cut_path, "r+b") as f:
        f.truncate(cut_path.stat().st_size - 40_000)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
        assert assoc.is_established
        refused = assoc.send_c_store(cut_path)
        stored = assoc.send_c_store(whole_path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert int(refused.Status) == 0xC000, refused
    assert "truncated" in str(refused.get("ErrorComment", "")) or "truncated" in box.log()
    assert int(stored.Status) == 0x0000
    assert set(rows(box)) == {str(whole.SOPInstanceUID)} and incoming_files(box) == []
    assert len(cache_files(box)) == 1


# ---- what fails after the instance is durable ------------------------------------------------------

@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``path`` made immutable (``chattr +i``): even root can neither remove it nor write to it,
    through a descriptor already open too — a failing disk, without one."""
    subprocess.run([require_tool("chattr"), "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_replaced_copy_that_cannot_be_removed_does_not_fail_the_acknowledged_replacement(
        appliance_factory) -> None:
    """The replacement is durable and indexed when the old copy is removed; if that fails (an
    I/O error), the C-STORE is still a success — the file left behind is removed at the next
    start, as any cache file without a row — not 0xC211 for an instance the box has."""
    box = appliance_factory({"node": {"on_duplicate": "replace"}})
    first = make_instance("undeletable", 1, 1, 1, Series("CT", 1, 64, 64))
    second = make_instance("undeletable", 1, 1, 1, Series("CT", 1, 64, 64))
    second.PatientComments = "second copy"
    assert send(box.port, [first])[0] == [0x0000]
    old = Path(rows(box)[first.SOPInstanceUID]["path"])
    with immutable(old):
        statuses, still_up = send(box.port, [second])
    assert statuses == [0x0000] and still_up
    assert "PatientComments" in pydicom.dcmread(rows(box)[first.SOPInstanceUID]["path"])
    assert "cannot remove the replaced copy" in box.log()
    box.stop()
    box.start()  # start-up removes the file no row points at
    assert cache_files(box) == [Path(rows(box)[first.SOPInstanceUID]["path"])]


@pytest.mark.parametrize("policy, status", [("keep-first", 0x0000), ("reject", 0x0111)])
def test_a_duplicate_whose_record_fails_is_answered_by_its_policy(appliance_factory, policy: str,
                                                                   status: int) -> None:
    """A repeated C-STORE under keep-first (or reject) finds the first copy durable; if the
    database cannot record the repetition (its disk fails), the answer is still the policy's:
    success for keep-first — the instance is stored — not 0xC211, which would have the modality
    send it again and again."""
    box = appliance_factory({"node": {"on_duplicate": policy}})
    first = make_instance("unrecorded", 1, 1, 1, Series("CT", 2, 64, 64))
    later = make_instance("unrecorded", 1, 1, 2, Series("CT", 2, 64, 64))
    assert send(box.port, [first])[0] == [0x0000]
    with immutable(box.data / "appliance.db-wal"):
        statuses, still_up = send(box.port, [first])
    assert statuses == [status] and still_up
    assert "cannot record" in box.log()
    assert send(box.port, [later])[0] == [0x0000]  # the database works again
    assert set(rows(box)) == {first.SOPInstanceUID, later.SOPInstanceUID}
