"""Data sets the receiver must refuse rather than acknowledge, sent by a modality as it would
send them (a pynetdicom SCU streaming each file's bytes as they are, as routers and bulk
senders do): cut short, empty, without an identity, not the instance their C-STORE request
names. Each is answered with a failure status, nothing of it is cached or forwarded, and the
association goes on: the next whole instance is stored."""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from .corpus import Series, compress, make_instance
from .peers import ApplianceProcess

CANNOT_UNDERSTAND = 0xC000


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """pynetdicom sends a file's data set as the bytes on disk, and takes the C-STORE
    request's UIDs from its file meta."""
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def send_files(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file on one association; their statuses."""
    ae = AE(ae_title="PYSCU")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless):
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established
    try:
        statuses = []
        for path in files:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else -1)
        assert assoc.is_established, "the association must survive a refused instance"
    finally:
        assoc.release()
    return statuses


def cached_uids(box: ApplianceProcess) -> set[str]:
    with sqlite3.connect(box.data / "appliance.db") as conn:
        return {r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")}


def cache_and_incoming(box: ApplianceProcess) -> list[Path]:
    return [p for d in ("cache", "incoming") for p in (box.data / d).rglob("*") if p.is_file()]


def write(ds: pydicom.Dataset, path: Path, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set_offset(path: Path) -> int:
    from pynetdicom.dsutils import split_dataset

    return int(split_dataset(path)[1])


def cut_data_set(source: Path, target: Path, keep: int) -> Path:
    """``source`` with only the first ``keep`` bytes of its data set (< 0: all but the last)."""
    data = source.read_bytes()
    offset = data_set_offset(source)
    target.write_bytes(data[:offset + keep] if keep >= 0 else data[:keep])
    return target


def test_data_sets_cut_short_or_empty_are_refused_as_not_understood(appliance_factory, chunked_send,
                                                                  tmp_path) -> None:
    """A data set of no bytes at all, one cut off in its header (300 bytes), an Implicit VR one
    cut off in its header, an RLE one cut off inside its compressed fragments, and a whole one
    followed by the first byte of another element's header: each is 0xC000 (cannot
    understand), nothing of them is cached. A whole CT on the same association is stored."""
    box = appliance_factory()
    made = [make_instance("refused", 1, 1, n, Series("CT", 6, 64, 64)) for n in range(1, 7)]
    whole = write(made[0], tmp_path / "whole.dcm")
    empty = cut_data_set(write(made[1], tmp_path / "empty-src.dcm"), tmp_path / "empty.dcm", 0)
    header_cut = cut_data_set(write(made[2], tmp_path / "head-src.dcm"), tmp_path / "head.dcm", 300)
    implicit_cut = cut_data_set(write(made[3], tmp_path / "imp-src.dcm", implicit=True), tmp_path / "imp.dcm", 301)
    rle = compress(write(made[4], tmp_path / "rle-src.dcm"), tmp_path / "rle-whole.dcm", RLELossless)
    rle_cut = cut_data_set(rle, tmp_path / "rle.dcm", -40)
    stray = write(made[5], tmp_path / "stray.dcm")
    with open(stray, "ab") as out:
        out.write(b"\xe0")

    statuses = send_files(box.port, [empty, header_cut, implicit_cut, rle_cut, stray, whole])
    assert statuses == [CANNOT_UNDERSTAND] * 5 + [0x0000], [hex(s) for s in statuses]
    assert cached_uids(box) == {made[0].SOPInstanceUID}
    assert len(cache_and_incoming(box)) == 1
    assert "truncated" in box.log()


def test_a_data_set_of_odd_length_is_refused_and_padding_after_it_is_not_cached(appliance_factory, chunked_send,
                                                                                 tmp_path) -> None:
    """Every DICOM value is of even length, so every data set is (PS3.5 7.1.1). One with an
    odd-length value could never be forwarded (DCMTK and the PACS built on it abort on its odd
    fragment, and it would wait in the queue for ever): 0xC000, nothing cached, and the
    association goes on. A whole data set followed by a NUL (a writer's padding, no part of it)
    is stored without it: passed on, the NUL would make it of odd length."""
    box = appliance_factory()
    made = [make_instance("odd", 1, 1, n, Series("CT", 3, 64, 64)) for n in range(1, 4)]
    odd_value = write(made[0], tmp_path / "odd-value.dcm")
    with open(odd_value, "ab") as out:  # (7FE1,0010) LO "ABC": 3 bytes, not padded
        out.write(struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 3) + b"ABC")
    padded = write(made[1], tmp_path / "padded.dcm")
    as_written = padded.read_bytes()
    with open(padded, "ab") as out:
        out.write(b"\x00")
    whole = write(made[2], tmp_path / "whole.dcm")

    statuses = send_files(box.port, [odd_value, padded, whole])
    assert statuses == [CANNOT_UNDERSTAND, 0x0000, 0x0000], [hex(s) for s in statuses]
    assert cached_uids(box) == {made[1].SOPInstanceUID, made[2].SOPInstanceUID}
    assert "an odd length" in box.log()
    with sqlite3.connect(box.data / "appliance.db") as conn:
        path, size, sha = conn.execute("SELECT path, size, sha256 FROM instances WHERE sop_instance_uid = ?",
                                       (made[1].SOPInstanceUID,)).fetchone()
    cached = Path(path).read_bytes()
    offset = data_set_offset(padded)
    assert cached[data_set_offset(Path(path)):] == as_written[offset:]
    assert (size, sha) == (len(cached), hashlib.sha256(cached).hexdigest())


def test_a_data_set_without_its_sop_instance_or_class_uid_is_refused(appliance_factory, chunked_send,
                                                                    tmp_path) -> None:
    """The C-STORE request names a class and an instance, the data set carries neither one or
    the other: it is not an instance (SOP Common, type 1). 0xC000; nothing cached."""
    box = appliance_factory()
    no_instance = make_instance("anonymous", 1, 1, 1, Series("CT", 2, 64, 64))
    del no_instance.SOPInstanceUID
    no_class = make_instance("anonymous", 1, 1, 2, Series("CT", 2, 64, 64))
    del no_class.SOPClassUID
    files = [write(no_instance, tmp_path / "no-instance.dcm"), write(no_class, tmp_path / "no-class.dcm")]
    assert send_files(box.port, files) == [CANNOT_UNDERSTAND] * 2
    assert cached_uids(box) == set() and cache_and_incoming(box) == []


# ---- a deflated data set that inflates to far more than it weighs ------------------------------

def deflated_zeros(path: Path, seed: str, mebibytes: int, cut: int = 0) -> tuple[Path, pydicom.Dataset]:
    """A Deflated Explicit VR Little Endian CT whose pixel data is ``mebibytes`` MiB of zeros:
    a few hundred KB on disk (a zip bomb's proportions), written a chunk at a time so that the
    test itself stays small. ``cut``: bytes left off the end of the deflate stream."""
    import io
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_instance(seed, 1, 1, 1, Series("CT", 1, 64, 64))
    del ds.PixelData
    frames = mebibytes * (1 << 20) // (64 * 64 * 2)
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    length = frames * 64 * 64 * 2
    head.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = io.BytesIO()
    stream.write(deflater.compress(head.getvalue()))
    zeros = bytes(1 << 20)
    for _ in range(length // len(zeros)):
        stream.write(deflater.compress(zeros))
    stream.write(deflater.compress(bytes(length % len(zeros))))
    stream.write(deflater.flush())
    data = stream.getvalue()
    data += b"\x00" * (len(data) % 2)  # a deflated data set is padded to an even length (PS3.5 A.5)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)  # type: ignore[arg-type]
        out.write(data[:len(data) - cut])
    return path, ds


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_small_deflated_data_set_does_not_blow_up_the_receivers_memory(appliance_factory, chunked_send,
                                                                          tmp_path) -> None:
    """300 KB on the wire inflating to 200 MiB of pixels: the receiver reads its header and
    checks it is whole without holding it inflated (its peak RSS grows by less than 40 MB;
    inflated whole it grew by 400). It is stored; the same stream cut short is refused."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    box = appliance_factory()
    bomb, ds = deflated_zeros(tmp_path / "bomb.dcm", "bomb", 200)
    cut, cut_ds = deflated_zeros(tmp_path / "cut.dcm", "bomb-cut", 200, cut=20)
    assert bomb.stat().st_size < 400_000
    assert box.process is not None
    before = peak_rss_mb(box.process.pid)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in (bomb, cut)]
    finally:
        assoc.release()
    grown = peak_rss_mb(box.process.pid) - before
    assert statuses == [0x0000, CANNOT_UNDERSTAND], [hex(s) for s in statuses]
    assert cached_uids(box) == {ds.SOPInstanceUID}
    assert grown < 40, f"the receiver's peak RSS grew by {grown:.0f} MB"
    assert "ends inside its deflated" in box.log()


# ---- a data set that is not the instance its request names -------------------------------------

def write_as_is(ds: pydicom.Dataset, path: Path) -> Path:
    """``ds`` with its file meta as it is (pydicom's ``save_as`` would make the meta's UIDs
    the data set's)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)  # type: ignore[arg-type]
        out.write(body.getvalue())
    return path


def test_a_data_set_that_is_not_the_instance_its_request_names_is_refused_with_a900(
        appliance_factory, chunked_send, tmp_path) -> None:
    """The C-STORE request (here taken from each file's meta) names one SOP Class and Instance,
    the data set is another class, or another instance: 0xA900, as DCMTK's storescp and Orthanc
    answer. Nothing is cached under either UID (the index and the forwarder would have taken
    the request's UIDs, the PACS the data set's)."""
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    box = appliance_factory()
    other_instance = make_instance("mismatch", 1, 1, 1, Series("CT", 3, 64, 64))
    claimed_uid = "1.2.826.0.1.3680043.8.498.1234567890"
    other_instance.file_meta.MediaStorageSOPInstanceUID = claimed_uid
    other_class = make_instance("mismatch", 1, 1, 2, Series("CT", 3, 64, 64))
    other_class.file_meta.MediaStorageSOPClassUID = MRImageStorage
    whole = make_instance("mismatch", 1, 1, 3, Series("CT", 3, 64, 64))
    files = [write_as_is(ds, tmp_path / f"{n}.dcm") for n, ds in enumerate((other_instance, other_class, whole))]

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()
    assert statuses == [0xA900, 0xA900, 0x0000], [hex(s) for s in statuses]
    assert cached_uids(box) == {whole.SOPInstanceUID}
    assert len(cache_and_incoming(box)) == 1
    log = box.log()
    assert claimed_uid in log and other_instance.SOPInstanceUID in log


def test_what_pydicom_reads_whole_is_not_refused(appliance_factory, chunked_send, tmp_path) -> None:
    """Writers that bend the standard in ways pydicom reads, and a refusal would cost the
    images: a private sequence written as an undefined-length UN whose items kept their
    Explicit VR (after the elements the index needs, so only the completeness walk sees it);
    a NUL after the last element; a stray item delimiter at the top level. Each is stored."""
    box = appliance_factory()
    made = [make_instance("accepted", 1, 1, n, Series("CT", 3, 64, 64)) for n in range(1, 4)]
    private = made[0]
    private.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "SQ", [pydicom.Dataset()])
    private[0x00291001].value[0].PatientName = "INSIDE^ITEM"
    private[0x00291001].is_undefined_length = True
    private[0x00291001].value[0].is_undefined_length_sequence_item = True
    un = write(private, tmp_path / "un.dcm")
    data = bytearray(un.read_bytes())
    at = data.index(b"\x29\x00\x01\x10SQ")
    data[at + 4:at + 6] = b"UN"
    un.write_bytes(bytes(data))
    padded = write(made[1], tmp_path / "padded.dcm")
    with open(padded, "ab") as out:
        out.write(b"\x00")
    delimited = write(made[2], tmp_path / "delimited.dcm")
    with open(delimited, "ab") as out:
        out.write(b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
    for path in (un, padded, delimited):
        pydicom.dcmread(path)  # pydicom reads each whole

    statuses = send_files(box.port, [un, padded, delimited])
    assert statuses == [0x0000] * 3, [hex(s) for s in statuses]
    assert cached_uids(box) == {ds.SOPInstanceUID for ds in made}
