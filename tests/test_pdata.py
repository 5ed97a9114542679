"""C-STORE requests received by the DUL thread itself (appliance/pdata.py).

The direct path must store exactly what pynetdicom's path stores, answer the same way, and
leave to pynetdicom every PDU it does not fully understand. The PDUs here are made by hand, so
that framings a given SCU never produces (several PDVs in one PDU, a command split in two,
a fragment on the wrong context) are exercised too.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, acse, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from appliance import config as configuration
from appliance import pdata
from appliance.db import Database
from appliance.dicomnet import application_entity, tune_socket
from appliance.hotpath import encode_c_store_rq
from appliance.receiver import Receiver
from appliance.store import Store

from .bench.data import MULTIFRAME_WORD_SC, write_large_instance
from .corpus import Series, make_instance
from .peers import ApplianceProcess, free_port

CT_SLICE = Series("CT", 1, 64, 64)


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0x00, len(body)) + body


def _request(ds: pydicom.Dataset, message_id: int) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0x0002
    return request


def _encoded(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    """A data set (Explicit VR Little Endian), or a command set with ``implicit``."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


# ---- framing -----------------------------------------------------------------------------------


def test_pdv_items_are_split_without_copies_and_checked() -> None:
    body = memoryview(_pdv(1, 0x03, b"command") + _pdv(3, 0x00, b"data"))
    items = list(pdata.iter_pdvs(body))
    assert [(c, h, bytes(f)) for c, h, f in items] == [(1, 0x03, b"command"), (3, 0x00, b"data")]
    assert all(isinstance(f, memoryview) for _, _, f in items)
    with pytest.raises(pdata.ProtocolError):
        list(pdata.iter_pdvs(body[:-1]))  # the last item is cut off
    with pytest.raises(pdata.ProtocolError):
        list(pdata.iter_pdvs(memoryview(struct.pack(">IBB", 1, 1, 3))))  # length below 2


def test_command_set_decodes_to_the_request_pynetdicom_would_build() -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ

    ds = make_instance("pdata", 1, 1, 1, CT_SLICE)
    sent = _request(ds, 77)
    sent.DataSet = BytesIO(_encoded(ds))  # so that the command says a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(sent)
    elements = pdata.decode_command(_encoded(message.command_set, implicit=True))
    request = pdata.c_store_request(elements)
    assert request is not None
    for keyword in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority"):
        assert getattr(request, keyword) == getattr(sent, keyword), keyword
    # a C-MOVE sub-operation names its originator
    elements[0x1030], elements[0x1031] = b"MOVER ", struct.pack("<H", 5)
    request = pdata.c_store_request(elements)
    assert request is not None
    assert (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID) == ("MOVER", 5)
    # without a data set, or without its instance UID, it is not one to take
    assert pdata.c_store_request({**elements, 0x0800: struct.pack("<H", 0x0101)}) is None
    assert pdata.c_store_request({k: v for k, v in elements.items() if k != 0x1000}) is None


def test_other_commands_are_not_taken() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    assert pdata.c_store_request(pdata.decode_command(_encoded(message.command_set, implicit=True))) is None


# ---- against a running receiver ------------------------------------------------------------------


class _Box:
    def __init__(self, root: Path, receiver: Receiver, db: Database) -> None:
        self.root, self.receiver, self.db = root, receiver, db
        self.port = receiver.address[1]
        self.served = 0

    def rows(self) -> dict[str, sqlite3.Row]:
        return {r["sop_instance_uid"]: r for r in self.db.query("SELECT * FROM instances WHERE state = 'cached'")}

    def incoming(self) -> list[Path]:
        return list((self.root / "incoming").iterdir())


@pytest.fixture
def box(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Box]:
    """A Storage SCP in this process, so the test can see which path served each request.
    Parametrized indirectly: more ``node`` settings, as YAML flow text (``", max_pdu: 0"``)."""
    more_node = getattr(request, "param", "")
    # Receiver.start sets these process-wide: put them back for the other tests of the session.
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(acse, "negotiate_unrestricted", acse.negotiate_unrestricted)
    # pynetdicom's narration (bound when its logger shows INFO) keeps pynetdicom's path: quiet it
    pynetdicom_log = logging.getLogger("pynetdicom")
    level = pynetdicom_log.level
    pynetdicom_log.setLevel(logging.WARNING)
    cfg = configuration.loads(
        f"node: {{ae_title: EDGE, bind_address: 127.0.0.1, port: {free_port()}{more_node}}}\n"
        f"storage: {{path: {tmp_path / 'data'}, disk: {{min_free: 0%}}}}\n"
    )
    store = Store(tmp_path / "data")
    store.prepare()
    db = Database(tmp_path / "data" / "appliance.db")
    receiver = Receiver(cfg, db, store)
    receiver.start()
    served = _Box(tmp_path / "data", receiver, db)
    original = pdata.StoreReceiver._serve

    def counting(self: pdata.StoreReceiver, incoming: object) -> None:
        served.served += 1
        original(self, incoming)  # type: ignore[arg-type]

    monkeypatch.setattr(pdata.StoreReceiver, "_serve", counting)
    yield served
    receiver.stop(drain_seconds=2)
    db.close()
    pynetdicom_log.setLevel(level)


def _associate(port: int):
    ae = application_entity("PDATASCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE", evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)])
    assert assoc.is_established
    return assoc


def _context_id(assoc, abstract_syntax: str) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract_syntax)


def _exchange(assoc, pdus: list[bytes]):
    """Send hand-made PDUs and return the message answered (None if none within the DIMSE
    timeout), holding the association's own loop off the DIMSE queue as its send_*() do."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        for pdu in pdus:
            assoc.dul.socket.send(pdu)
        return assoc.dimse.get_msg(block=True)[1]
    finally:
        assoc._reactor_checkpoint.set()


def _command(ds: pydicom.Dataset, message_id: int) -> bytes:
    command = encode_c_store_rq(_request(ds, message_id))
    assert command is not None
    return command


def _assert_cached(box: _Box, ds: pydicom.Dataset, data_set: bytes) -> None:
    row = box.rows()[ds.SOPInstanceUID]
    cached = Path(row["path"]).read_bytes()
    meta = pydicom.dcmread(row["path"], stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert cached.endswith(data_set) and len(cached) - len(data_set) == 132 + 12 + meta.FileMetaInformationGroupLength
    assert box.incoming() == []


def test_store_in_many_fragments_and_one_pdu_is_served_directly(box: _Box) -> None:
    assoc = _associate(box.port)
    try:
        cx = _context_id(assoc, CTImageStorage)
        first, second = (make_instance("pdata", 1, 1, n, CT_SLICE) for n in (1, 2))
        data1, data2 = _encoded(first), _encoded(second)
        # the command and the data set in one PDU, the data set in three fragments
        one_pdu = _pdu(_pdv(cx, 0x03, _command(first, 1)), _pdv(cx, 0x00, data1[:100]),
                       _pdv(cx, 0x00, data1[100:5000]), _pdv(cx, 0x02, data1[5000:]))
        rsp = _exchange(assoc, [one_pdu])
        assert rsp is not None and rsp.Status == 0x0000 and rsp.MessageIDBeingRespondedTo == 1
        assert rsp.AffectedSOPInstanceUID == first.SOPInstanceUID
        # the command alone, then one PDU per fragment
        pdus = [_pdu(_pdv(cx, 0x03, _command(second, 2)))]
        pdus += [_pdu(_pdv(cx, 0x00, data2[i:i + 1000])) for i in range(0, len(data2) - 1000, 1000)]
        pdus.append(_pdu(_pdv(cx, 0x02, data2[len(pdus[1:]) * 1000:])))
        rsp = _exchange(assoc, pdus)
        assert rsp is not None and rsp.Status == 0x0000 and rsp.MessageIDBeingRespondedTo == 2
        # other services keep pynetdicom's path on the same association
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert box.served == 2
    _assert_cached(box, first, data1)
    _assert_cached(box, second, data2)


def test_a_command_split_over_two_pdvs_is_left_to_pynetdicom(box: _Box) -> None:
    assoc = _associate(box.port)
    try:
        cx = _context_id(assoc, CTImageStorage)
        ds = make_instance("pdata", 1, 1, 3, CT_SLICE)
        command, data = _command(ds, 9), _encoded(ds)
        rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x01, command[:40]), _pdv(cx, 0x03, command[40:])),
                                _pdu(_pdv(cx, 0x02, data))])
        assert rsp is not None and rsp.Status == 0x0000 and rsp.MessageIDBeingRespondedTo == 9
    finally:
        assoc.release()
    assert box.served == 0
    _assert_cached(box, ds, data)


def test_a_fragment_out_of_place_aborts_and_leaves_nothing(box: _Box) -> None:
    assoc = _associate(box.port)
    cx, echo_cx = _context_id(assoc, CTImageStorage), _context_id(assoc, Verification)
    ds = make_instance("pdata", 1, 1, 4, CT_SLICE)
    data = _encoded(ds)
    rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x03, _command(ds, 1)), _pdv(cx, 0x00, data[:1000])),
                            _pdu(_pdv(echo_cx, 0x02, data[1000:]))])  # the rest on another context
    assert rsp is None
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert box.incoming() == [] and box.rows() == {}


def test_a_store_request_without_its_message_id_aborts_and_leaves_nothing(box: _Box) -> None:
    """A C-STORE-RQ with a data set but no Message ID cannot be answered (pynetdicom would leave
    the sender waiting for a response for ever): the association is aborted, as DCMTK does. One
    without its Priority (required, but it changes nothing here) is stored."""
    assoc = _associate(box.port)
    cx = _context_id(assoc, CTImageStorage)
    unprioritised, unnumbered = (make_instance("pdata", 1, 1, n, CT_SLICE) for n in (5, 6))

    def without(ds: pydicom.Dataset, message_id: int, element: int) -> bytes:
        elements = pdata.decode_command(_command(ds, message_id))
        del elements[element], elements[0x0000]
        body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in sorted(elements.items()))
        return struct.pack("<HHII", 0, 0, 4, len(body)) + body

    data = _encoded(unprioritised)
    rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x03, without(unprioritised, 1, 0x0700)), _pdv(cx, 0x02, data))])
    assert rsp is not None and rsp.Status == 0x0000
    rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x03, without(unnumbered, 2, 0x0110)), _pdv(cx, 0x02, _encoded(unnumbered)))])
    assert rsp is None
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert set(box.rows()) == {unprioritised.SOPInstanceUID} and box.incoming() == []


def _wait_aborted(assoc, seconds: float = 10) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(assoc.is_aborted)


def test_a_request_pynetdicom_fails_on_is_aborted_and_its_association_closed(box: _Box) -> None:
    """A command split over two PDVs (pynetdicom's path) on a presentation context that was
    never accepted: pynetdicom's state machine raises on it. The DUL thread died of that, with
    no A-ABORT to the peer (which waited for a response) and the association's end never
    reported. It is aborted (PS3.8 AA-8), and its end is reported."""
    assoc = _associate(box.port)
    ds = make_instance("pdata", 1, 1, 7, CT_SLICE)
    command = _command(ds, 1)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    assoc.dul.socket.send(_pdu(_pdv(77, 0x01, command[:40]), _pdv(77, 0x03, command[40:])))
    assoc._reactor_checkpoint.set()
    assert _wait_aborted(assoc), "no A-ABORT for a request on a context never accepted"
    deadline = time.monotonic() + 10
    while box.receiver._stats and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box.receiver._stats == {}  # the association's end was reported
    assert box.rows() == {} and box.incoming() == []
    second = _associate(box.port)  # and the SCP takes the next one
    try:
        assert second.send_c_store(ds).Status == 0x0000
    finally:
        second.release()


@pytest.mark.parametrize("box", [", timeouts: {network: 1s}"], indirect=True)
def test_a_pdu_arriving_slowly_is_received_whole(box: _Box) -> None:
    """node.timeouts.network limits a pause, not a PDU: a sender on a slow link (a VPN) that
    fills the SCP's 4 MiB PDUs takes longer than the timeout over one, its data flowing all
    the while. It was aborted when the timeout ran out in the middle of the PDU, and every
    resend failed the same way. Here a 2 MB data set in one PDU takes about 2.5 s, with
    data every 50 ms, against a 1 s timeout; a sender that stops is still cut off."""
    assoc = _associate(box.port)
    try:
        cx = _context_id(assoc, CTImageStorage)
        ds = make_instance("pdata", 1, 1, 8, Series("CT", 1, 1024, 1024))
        data = _encoded(ds)
        pdu = _pdu(_pdv(cx, 0x03, _command(ds, 1))) + _pdu(_pdv(cx, 0x02, data))
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            raw = assoc.dul.socket.socket
            step = len(pdu) // 50 + 1
            for offset in range(0, len(pdu), step):
                raw.sendall(pdu[offset:offset + step])
                time.sleep(0.05)
            rsp = assoc.dimse.get_msg(block=True)[1]
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0000, "aborted while its data was still arriving"
    finally:
        if assoc.is_established:
            assoc.release()
    _assert_cached(box, ds, data)


@pytest.mark.parametrize("box", [", max_pdu: 16384"], indirect=True)
def test_a_large_pdu_above_the_announced_maximum_is_refused_unless_streamed(box: _Box) -> None:
    """A P-DATA-TF of over a megabyte, longer than the maximum this side announced (PS3.8
    D.1), is refused with an A-ABORT, as DCMTK refuses it, when it would be held whole in
    memory (pynetdicom's path: here a command split over two PDVs). A C-STORE's data set,
    written to its file as it arrives, is taken whatever its PDUs' length."""
    assoc = _associate(box.port)
    try:
        cx = _context_id(assoc, CTImageStorage)
        direct = make_instance("pdata", 1, 1, 9, Series("CT", 1, 1024, 768))
        data = _encoded(direct)
        assert len(data) > 2**20
        rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x03, _command(direct, 1)), _pdv(cx, 0x02, data))])
        assert rsp is not None and rsp.Status == 0x0000
        split = make_instance("pdata", 1, 1, 10, Series("CT", 1, 1024, 768))
        command = _command(split, 2)
        rsp = _exchange(assoc, [_pdu(_pdv(cx, 0x01, command[:40]), _pdv(cx, 0x03, command[40:]),
                                     _pdv(cx, 0x02, _encoded(split)))])
        assert rsp is None
        assert _wait_aborted(assoc)
    finally:
        if assoc.is_established:
            assoc.release()
    _assert_cached(box, direct, data)
    assert set(box.rows()) == {direct.SOPInstanceUID}


def test_a_store_served_before_its_association_is_marked_established_is_answered(box: _Box) -> None:
    """The DUL thread can take a whole C-STORE between the A-ASSOCIATE-AC going out and the
    association's thread marking the association established (after its EVT_ACCEPTED
    handlers). pynetdicom's Storage SCP then dropped the response, taking the association for
    one aborted or released: the instance was stored, and its sender waited for an answer
    until its timeout. Here the acceptor's EVT_ACCEPTED handler takes a second."""
    server = box.receiver._server
    assert server is not None
    server.bind(evt.EVT_ACCEPTED, lambda event: time.sleep(1.0))
    assoc = _associate(box.port)
    try:
        ds = make_instance("pdata", 1, 1, 11, CT_SLICE)
        rsp = assoc.send_c_store(ds)
        assert "Status" in rsp and rsp.Status == 0x0000, "no answer to the C-STORE"
    finally:
        assoc.release()
    assert ds.SOPInstanceUID in box.rows()


def test_associations_that_report_their_pdus_keep_pynetdicoms_path(box: _Box) -> None:
    """Handlers that want every received PDU keep the association on pynetdicom's path."""
    seen: list[int] = []
    server = box.receiver._server
    assert server is not None
    server.bind(evt.EVT_PDU_RECV, lambda event: seen.append(1))
    assoc = _associate(box.port)
    try:
        ds = make_instance("pdata", 1, 1, 5, CT_SLICE)
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert seen and box.served == 0
    assert ds.SOPInstanceUID in box.rows()


def _rsp_command(status: int, comment: str | None = None) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RSP

    response = C_STORE()
    response.MessageIDBeingRespondedTo = 12
    response.Status = status
    response.AffectedSOPClassUID = CTImageStorage
    response.AffectedSOPInstanceUID = "1.2.3.4"
    if comment is not None:
        response.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    return _encoded(message.command_set, implicit=True)


def test_a_plain_c_store_response_decodes_to_pynetdicoms_primitive() -> None:
    for status in (0x0000, 0xB000, 0xA700, 0xC000):
        response = pdata.c_store_response(pdata.decode_command(_rsp_command(status)))
        assert response is not None
        assert (response.MessageIDBeingRespondedTo, response.Status) == (12, status)
        assert (response.AffectedSOPClassUID, response.AffectedSOPInstanceUID) == (CTImageStorage, "1.2.3.4")
        assert response.is_valid_response
    # an error comment is pynetdicom's to decode, as is a request
    assert pdata.c_store_response(pdata.decode_command(_rsp_command(0xC000, "cannot"))) is None
    assert pdata.c_store_response(pdata.decode_command(_command(make_instance("pdata", 1, 1, 1, CT_SLICE), 1))) is None


def test_responses_to_our_scu_are_taken_directly(box: _Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarder's side: send_c_store gets the same response, decoded by the DUL thread."""
    taken: list[int] = []
    original = pdata.c_store_response

    def counting(elements: dict[int, bytes]):  # type: ignore[no-untyped-def]
        response = original(elements)
        if response is not None:
            taken.append(int(response.Status))
        return response

    monkeypatch.setattr(pdata, "c_store_response", counting)
    assoc = _associate(box.port)
    assert pdata.StoreReceiver.attach(assoc)
    try:
        first, second = (make_instance("pdata", 2, 1, n, CT_SLICE) for n in (1, 2))
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(first).Status == 0x0000  # a duplicate replaces: still success
        assert assoc.send_c_store(second).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000  # not a C-STORE-RSP: pynetdicom's path
    finally:
        assoc.release()
    assert taken == [0x0000, 0x0000, 0x0000]
    assert {first.SOPInstanceUID, second.SOPInstanceUID} <= box.rows().keys()


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_instance_sent_in_one_pdu_does_not_sit_in_memory(tmp_path: Path) -> None:
    """With node.max_pdu: 0 (no limit) the SCP tells its peers they may send PDUs of any
    length, and pynetdicom's SCU then sends a whole data set as one PDU. The receiver read
    each PDU whole before writing it to the file: an instance took about twice its size in
    memory (419 MB: 885 MB; an out-of-memory kill on a Pi for a large one). It is written as
    it arrives."""
    big = write_large_instance(tmp_path / "big.dcm", frames=20)  # 20 × 2048² × 2 bytes
    size = big.stat().st_size
    box = ApplianceProcess(tmp_path / "box", {"node": {"max_pdu": 0}}).start()
    try:
        assert box.process is not None
        before = _vm_hwm_kib(box.process.pid)
        ae = AE(ae_title="BIGSCU")
        ae.add_requested_context(MULTIFRAME_WORD_SC, ExplicitVRLittleEndian)
        ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", box.port, ae_title=box.ae_title)
        assert assoc.is_established and assoc.acceptor.maximum_length == 0
        try:
            assert assoc.send_c_store(big).Status == 0x0000
        finally:
            assoc.release()
        grown = (_vm_hwm_kib(box.process.pid) - before) * 1024
    finally:
        box.stop()
    assert grown < size / 4, f"its peak memory grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB instance"
    db = Database(box.data / "appliance.db")
    cached = db.query("SELECT size FROM instances")
    db.close()
    assert len(cached) == 1 and abs(cached[0]["size"] - size) < 256  # its file meta is the receiver's
