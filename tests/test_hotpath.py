"""The hand-written encoders of appliance/hotpath.py write exactly what pynetdicom would."""

from __future__ import annotations

import io
import logging
import queue
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, split_dataset
from pynetdicom.pdu import P_DATA_TF

from appliance import hotpath
from appliance.dicomnet import application_entity, tune_socket
from appliance.pdata import StoreReceiver

from .corpus import Series, write_series
from .pacs import ReadingSCP, RecordingSCP, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
_ROOT = "1.2.826.0.1.3680043.8.498."
UIDS = ["1.2.3", "1.2.34", _ROOT + "1" * 37, _ROOT + "1" * 38]  # odd and even lengths, 63 and 64


def test_installed_for_the_pinned_pynetdicom() -> None:
    from pynetdicom import dimse, dimse_messages

    assert hotpath.install()
    assert dimse_messages.NamedTemporaryFile is hotpath.ReceivedFile
    assert dimse.DIMSEServiceProvider.send_msg is hotpath._send_msg


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"])
def test_file_meta_is_what_pydicom_writes(sop_uid: str, syntax: str) -> None:
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CT, sop_instance_uid=sop_uid,
                                                    transfer_syntax=syntax))
    assert hotpath.encode_file_meta(hotpath.FileMeta(CT, sop_uid, syntax)) == expected.getvalue()


def _pynetdicom_command(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def test_received_file_that_cannot_be_created_takes_the_data_set_and_reports_why(tmp_path, monkeypatch) -> None:
    """The receive directory is gone (or full): the file records why, takes the data without
    failing (the sender still gets an answer), and leaves nothing behind."""
    monkeypatch.setattr(hotpath.tempfile, "tempdir", str(tmp_path / "gone"))
    received = hotpath.ReceivedFile(suffix=".dcm")
    assert isinstance(received.failure, FileNotFoundError)
    assert received.write(b"x" * 1000) == 1000 and received.size == 1000
    received.close()
    received.discard()
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB007, 0x0111, 0xC000])
@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_c_store_rsp_is_what_pynetdicom_encodes(sop_uid: str, status: int, message_id: int) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    assert hotpath.encode_c_store_rsp(primitive) == _pynetdicom_command(primitive)


def test_c_store_rsp_without_uids() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.Status = 0xA700
    assert hotpath.encode_c_store_rsp(primitive) == _pynetdicom_command(primitive)


def test_what_it_does_not_cover_is_left_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0xC000
    primitive.ErrorComment = "cannot read it"
    assert hotpath.encode_c_store_rsp(primitive) is None


def _rq(sop_uid: str, message_id: int = 3, priority: int = 0) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.Priority = priority
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    return primitive


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_c_store_rq_is_what_pynetdicom_encodes(sop_uid: str, priority: int) -> None:
    primitive = _rq(sop_uid, priority=priority)
    primitive._dataset_path = ("unused", 0)  # chunked send: a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    assert hotpath.encode_c_store_rq(primitive) == bytes(encode(message.command_set, True, True))


def test_c_store_rq_with_a_move_originator_is_left_to_pynetdicom() -> None:
    primitive = _rq("1.2.3")
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    assert hotpath.encode_c_store_rq(primitive) is None


class _Recorder:
    """The DIMSE provider's view of an association: PDVs sent, no handlers bound."""

    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.sent: list[tuple[int, bytes]] = []
        self.assoc = self
        self.dul = self

    def get_handlers(self, event: object) -> list[object]:
        # someone watches each PDU sent (as pynetdicom's narration does): the per-PDV path
        return [print] if event is evt.EVT_PDU_SENT else []

    def send_pdu(self, pdata: object) -> None:
        self.sent.extend(pdata.presentation_data_value_list)  # type: ignore[attr-defined]


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 1 << 20])
@pytest.mark.parametrize("size", [(16, 16), (512, 512)])
def test_c_store_rq_from_a_file_is_sent_as_pynetdicom_sends_it(tmp_path, max_pdu: int, size: tuple[int, int]) -> None:
    path = write_series(tmp_path, "hotpath", 1, 1, Series("CT", 1, *size))[0]
    _, offset = split_dataset(path)
    primitive = _rq("1.2.3.4")
    primitive._dataset_path = (path, offset)
    expected = C_STORE_RQ()
    expected.primitive_to_message(primitive)
    theirs = [pdv for pdata in expected.encode_msg(5, max_pdu) for pdv in pdata.presentation_data_value_list]
    ours = _Recorder(max_pdu)
    hotpath._send_msg(ours, primitive, 5)
    assert ours.sent == theirs
    assert len(theirs) > 2 or max_pdu in (0, 1 << 20) or size == (16, 16)


class _DUL:
    """What FileMessage.send uses of a DUL: the socket, the state, the idle timer, the events."""

    def __init__(self, raw: socket.socket, state: str = "Sta6") -> None:
        self.socket = types.SimpleNamespace(socket=raw)
        self.state_machine = types.SimpleNamespace(current_state=state)
        self._idle_timer = types.SimpleNamespace(restart=lambda: None)
        self.event_queue: queue.Queue[str] = queue.Queue()


def _file_message(path, offset: int, max_pdu: int) -> tuple[hotpath.FileMessage, C_STORE]:
    primitive = _rq("1.2.3.4")
    primitive._dataset_path = (path, offset)
    command = hotpath.encode_c_store_rq(primitive)
    assert command is not None
    source = open(path, "rb")
    length = source.seek(0, 2) - source.seek(offset)
    return hotpath.FileMessage(5, command, source, length, max_pdu), primitive


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 1 << 20])
@pytest.mark.parametrize("buffer", [1 << 20, 5000])
def test_c_store_rq_as_one_file_message_is_the_bytes_pynetdicom_sends(tmp_path, monkeypatch, max_pdu: int,
                                                                     buffer: int) -> None:
    """The same PDUs on the wire, whatever the peer's PDU limit and however the buffer cuts them
    (5000 bytes: smaller than one PDU, so a fragment is sent over several calls)."""
    monkeypatch.setattr(hotpath, "_SEND_BUFFER", buffer)
    path = write_series(tmp_path, "filemessage", 1, 1, Series("CT", 1, 512, 512))[0]
    _, offset = split_dataset(path)
    message, primitive = _file_message(path, offset, max_pdu)
    expected = C_STORE_RQ()
    expected.primitive_to_message(primitive)
    theirs = b"".join(P_DATA_TF(pdata).encode() for pdata in expected.encode_msg(5, max_pdu))
    ours, peer = socket.socketpair()
    dul = _DUL(ours)
    sender = threading.Thread(target=message.send, args=(dul,))
    sender.start()  # the message is larger than the socket buffer: read while it is written
    received = bytearray()
    while len(received) < len(theirs):
        chunk = peer.recv(1 << 20)
        assert chunk
        received += chunk
    sender.join()
    ours.close(), peer.close()
    assert bytes(received) == theirs
    assert message.source.closed and dul.event_queue.empty()


def test_a_file_message_is_dropped_outside_the_established_state_and_fails_as_a_lost_connection(tmp_path) -> None:
    path = write_series(tmp_path, "filemessage", 1, 1, Series("CT", 1, 16, 16))[0]
    _, offset = split_dataset(path)
    ours, peer = socket.socketpair()
    message, _ = _file_message(path, offset, 16384)
    message.send(_DUL(ours, state="Sta13"))
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(10)  # nothing was sent
    assert message.source.closed
    peer.close()
    message, _ = _file_message(path, offset, 16384)
    dul = _DUL(ours)
    message.send(dul)  # the peer is gone
    assert dul.event_queue.get_nowait() == "Evt17" and message.source.closed
    ours.close()


# ---- store_file: the forwarder's C-STORE of a cached file --------------------------------------


def test_data_set_offset_is_where_pydicom_finds_the_data_set(tmp_path) -> None:
    path = write_series(tmp_path, "offset", 1, 1, Series("CT", 1, 16, 16))[0]
    with open(path, "rb") as source:
        assert hotpath.data_set_offset(source) == split_dataset(path)[1]
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(path.read_bytes()[128:])  # no preamble
    with open(bare, "rb") as source:
        assert hotpath.data_set_offset(source) is None


@pytest.fixture
def quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom's narration (bound when its logger shows INFO, as under pytest) watches every
    message and so keeps pynetdicom's path: quiet it, as the appliance runs."""
    log = logging.getLogger("pynetdicom")
    level = log.level
    log.setLevel(logging.WARNING)
    yield
    log.setLevel(level)


def _scu(port: int, dimse_timeout: float = 10):  # type: ignore[no-untyped-def]
    ae = application_entity("HOTPATH")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.dimse_timeout = dimse_timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="RECORDER", evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)])
    assert assoc.is_established
    assert StoreReceiver.attach(assoc)
    return assoc, assoc.accepted_contexts[0].context_id


def test_store_file_sends_what_send_c_store_sends(tmp_path, quiet_pynetdicom, monkeypatch) -> None:
    """The peer receives the same data set, the response comes back as a primitive, and the
    message went out as one FileMessage (not pynetdicom's per-PDU way)."""
    paths = write_series(tmp_path / "in", "storefile", 1, 1, Series("CT", 3, 64, 64))
    sent: list[int] = []
    original = hotpath.FileMessage.send
    monkeypatch.setattr(hotpath.FileMessage, "send", lambda self, dul: (sent.append(self.context_id),
                                                                        original(self, dul)))
    with RecordingSCP(status=0x0000) as scp:
        assoc, context_id = _scu(scp.port)
        try:
            for number, path in enumerate(paths, 1):
                ds = dcmread(path, stop_before_pixels=True)
                response = hotpath.store_file(assoc, context_id, str(path), ds.SOPClassUID, ds.SOPInstanceUID, number)
                assert response is not None
                assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, number)
            assert assoc.send_c_store(paths[0]).Status == 0x0000  # pynetdicom's own, for comparison
        finally:
            assoc.release()
        received = scp.receptions()
    assert len(sent) == 3  # send_c_store, without chunked send, encodes in memory: pynetdicom's way
    assert [r.sop_instance_uid for r in received[:3]] == [dcmread(p).SOPInstanceUID for p in paths]
    for reception, path in zip(received[:3], paths, strict=True):
        assert reception.dataset == dcmread(path)
    assert received[3].dataset == received[0].dataset


def test_store_file_returns_failures_and_their_comment(tmp_path, quiet_pynetdicom) -> None:
    path = write_series(tmp_path / "in", "storefile", 1, 1, Series("CT", 1, 16, 16))[0]
    ds = dcmread(path, stop_before_pixels=True)
    with RecordingSCP(status=0xA900) as scp:
        assoc, context_id = _scu(scp.port)
        try:
            response = hotpath.store_file(assoc, context_id, str(path), ds.SOPClassUID, ds.SOPInstanceUID, 7)
            assert response is not None and response.Status == 0xA900
            assert assoc.is_established
        finally:
            assoc.release()


def test_store_file_without_a_response_aborts_and_returns_none(tmp_path, quiet_pynetdicom) -> None:
    """A peer that does not answer within the DIMSE timeout: delivery unknown (None), and the
    association is aborted, as send_c_store does."""
    path = write_series(tmp_path / "in", "storefile", 1, 1, Series("CT", 1, 16, 16))[0]
    ds = dcmread(path, stop_before_pixels=True)
    with RecordingSCP(delay=3.0) as scp:
        assoc, context_id = _scu(scp.port, dimse_timeout=0.5)
        started = time.monotonic()
        assert hotpath.store_file(assoc, context_id, str(path), ds.SOPClassUID, ds.SOPInstanceUID, 1) is None
        assert time.monotonic() - started < 2.5
        assert not assoc.is_established


def test_store_file_leaves_watched_associations_and_odd_files_to_pynetdicom(tmp_path, quiet_pynetdicom) -> None:
    path = write_series(tmp_path / "in", "storefile", 1, 1, Series("CT", 1, 16, 16))[0]
    ds = dcmread(path, stop_before_pixels=True)
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(path.read_bytes()[128:])
    with RecordingSCP() as scp:
        assoc, context_id = _scu(scp.port)
        try:
            with pytest.raises(hotpath.StoreUnsupported):
                hotpath.store_file(assoc, context_id, str(bare), ds.SOPClassUID, ds.SOPInstanceUID, 1)
            with pytest.raises(FileNotFoundError):
                hotpath.store_file(assoc, context_id, str(tmp_path / "gone.dcm"), ds.SOPClassUID,
                                   ds.SOPInstanceUID, 1)
            assoc.bind(evt.EVT_DIMSE_SENT, lambda event: None)
            with pytest.raises(hotpath.StoreUnsupported):
                hotpath.store_file(assoc, context_id, str(path), ds.SOPClassUID, ds.SOPInstanceUID, 1)
            assert assoc.is_established  # nothing was sent: the association is still usable
            assert assoc.send_c_store(path).Status == 0x0000
        finally:
            assoc.release()


# ---- StoreChain: C-STOREs sent back to back by the DUL thread ----------------------------------


def _chain_items(paths: list[Path], context_id: int) -> list[hotpath.ChainItem]:
    items = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        items.append(hotpath.ChainItem(context_id, str(path), ds.SOPClassUID, ds.SOPInstanceUID))
    return items


def _run_chain(scp: RecordingSCP, paths: list[Path], accept_status: int = 0x0000, halt_after: int | None = None,
               dimse_timeout: float = 10):  # type: ignore[no-untyped-def]
    """Run a chain; returns (its result, what record saw: index, status, receptions at that
    moment — a while after it was called, so that a next request sent whole would be stored by
    then)."""
    assoc, context_id = _scu(scp.port, dimse_timeout)
    seen: list[tuple[int, int, int]] = []
    answered: list[int] = []

    def delivered(response: C_STORE) -> bool:
        answered.append(int(response.Status))
        return int(response.Status) == accept_status

    def record(index: int, response: C_STORE) -> None:
        time.sleep(0.1)
        seen.append((index, int(response.Status), len(scp.receptions())))

    chain = hotpath.StoreChain(assoc, _chain_items(paths, context_id), 1, delivered, record,
                               lambda: halt_after is not None and len(answered) >= halt_after)
    try:
        result = chain.run()
    finally:
        if assoc.is_established:
            assoc.release()
    return result, seen, assoc


def test_a_chain_completes_each_request_after_the_previous_outcome_was_recorded(tmp_path, quiet_pynetdicom) -> None:
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 5, 32, 32))
    with RecordingSCP() as scp:
        result, seen, _ = _run_chain(scp, paths)
        received = scp.receptions()
    assert result == (5, None, False)
    # record(i) ran while the peer had stored i + 1 instances: the next one, sent meanwhile
    # but for its last byte, could not be stored yet
    assert seen == [(i, 0x0000, i + 1) for i in range(5)]
    assert [r.dataset for r in received] == [dcmread(p) for p in paths]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "over-the-limit"])
def test_a_chain_sends_the_next_request_while_the_outcome_is_recorded(tmp_path, quiet_pynetdicom, monkeypatch,
                                                                       overlap) -> None:
    """While record(i) runs, the peer has already received the next request but for its last
    PDU — the point of the chain: the transfer overlaps the commit. A data set over the
    overlap limit goes out only after the record, as a whole."""
    if not overlap:
        monkeypatch.setattr(hotpath, "_OVERLAP_MAX", 1024)
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 3, 256, 256))
    during_record: list[int] = []  # bytes the peer read beyond the instance just stored
    with ReadingSCP() as scp:

        def record(index: int, response: C_STORE) -> None:
            time.sleep(0.2)
            during_record.append(scp.received - scp.stored[index][1])

        assoc, context_id = _scu(scp.port)
        chain = hotpath.StoreChain(assoc, _chain_items(paths, context_id), 1, lambda response: True, record,
                                   lambda: False)
        try:
            assert chain.run() == (3, None, False)
        finally:
            assoc.release()
        assert len(scp.stored) == 3 and len(during_record) == 3
    data_set = paths[1].stat().st_size - 200  # the next instance's data set, near enough
    if overlap:
        # all of the next one's PDUs but its last were in; none after the last instance
        assert all(count > data_set - 16384 for count in during_record[:2]), during_record
    else:
        assert during_record[:2] == [0, 0]
    assert during_record[2] == 0


def test_a_chain_whose_record_fails_abandons_the_request_it_held_back(tmp_path, quiet_pynetdicom) -> None:
    """The outcome of the first instance cannot be recorded (a database error): the second
    request, sent but for its last byte, must never complete — the peer stores only the first,
    the association is gone, and the first response goes back to the sender to record."""
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 3, 64, 64))
    with RecordingSCP() as scp:
        assoc, context_id = _scu(scp.port)

        def record(index: int, response: C_STORE) -> None:
            raise OSError("disk I/O error")

        chain = hotpath.StoreChain(assoc, _chain_items(paths, context_id), 1, lambda response: True, record,
                                   lambda: False)
        try:
            delivered, response, sent = chain.run()
            wait_until(lambda: not assoc.is_established, 5, "the association ends")
        finally:
            if assoc.is_established:
                assoc.release()
        time.sleep(0.3)
        stored = [r.dataset.SOPInstanceUID for r in scp.receptions()]
    assert (delivered, sent) == (0, True)
    assert response is not None and response.Status == 0x0000
    assert stored == [dcmread(paths[0]).SOPInstanceUID]


def test_a_chain_hands_a_refused_response_back(tmp_path, quiet_pynetdicom) -> None:
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 4, 16, 16))
    third = dcmread(paths[2]).SOPInstanceUID
    with RecordingSCP() as scp:
        scp.respond = lambda uid, nth: 0xA900 if uid == third else 0x0000
        (delivered, response, sent), seen, assoc = _run_chain(scp, paths)
        assert len(scp.receptions()) == 3
    assert (delivered, sent) == (2, True)
    assert response is not None and response.Status == 0xA900
    assert [index for index, _, _ in seen] == [0, 1]  # the refusal is left to the sender to record


def test_a_chain_stops_before_a_file_it_cannot_open_or_when_halted(tmp_path, quiet_pynetdicom) -> None:
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 4, 16, 16))
    with RecordingSCP() as scp:
        missing = tmp_path / "in" / "missing.dcm"
        assoc, context_id = _scu(scp.port)
        items = _chain_items(paths, context_id)
        items[2] = items[2]._replace(path=str(missing))
        chain = hotpath.StoreChain(assoc, items, 1, lambda response: True, lambda index, response: None,
                                   lambda: False)
        try:
            assert chain.run() == (2, None, False)
            assert assoc.is_established  # the association is still good for the rest
        finally:
            assoc.release()
        scp.clear()
        result, seen, _ = _run_chain(scp, paths, halt_after=2)
        assert result == (2, None, False) and len(scp.receptions()) == 2


def test_a_chain_without_a_response_aborts(tmp_path, quiet_pynetdicom) -> None:
    paths = write_series(tmp_path / "in", "chain", 1, 1, Series("CT", 3, 16, 16))
    second = dcmread(paths[1]).SOPInstanceUID
    with RecordingSCP() as scp:
        original = scp._on_store

        def slow_second(event):  # type: ignore[no-untyped-def]
            if event.request.AffectedSOPInstanceUID == second:
                time.sleep(3)
            return original(event)

        scp._on_store = slow_second  # type: ignore[method-assign]
        scp.stop()
        scp.start()
        (delivered, response, sent), seen, assoc = _run_chain(scp, paths, dimse_timeout=1)
    assert (delivered, response, sent) == (1, None, True)
    assert not assoc.is_established


@pytest.mark.parametrize("way", ["store_file", "chain", "send_c_store"])
def test_the_dimse_timeout_runs_from_the_last_byte_of_the_request(tmp_path, quiet_pynetdicom, monkeypatch,
                                                                   way: str) -> None:
    """A large instance on a slow link takes longer to send than the DIMSE timeout: the wait
    for the response starts when the request is sent, not when it is queued — else such an
    instance would never be delivered, only sent again and again. ~17 MB read at ~2.7 MB/s,
    with a DIMSE timeout of 2.5 s (the kernel's buffers take ~1.2 s to drain after the last
    byte is written)."""
    from pynetdicom import _config

    big = write_series(tmp_path / "big", "slowlink", 1, 1, Series("CT", 1, 2896, 2896))[0]
    small = write_series(tmp_path / "small", "slowlink", 1, 1, Series("CT", 1, 16, 16))[0]
    with ReadingSCP(on_data=lambda received: time.sleep(0.006)) as scp:  # per 16 KB PDU
        assoc, context_id = _scu(scp.port, dimse_timeout=2.5)
        try:
            started = time.monotonic()
            if way == "store_file":
                ds = dcmread(big, stop_before_pixels=True)
                response = hotpath.store_file(assoc, context_id, str(big), ds.SOPClassUID, ds.SOPInstanceUID, 1)
                statuses = [response.Status if response is not None else None]
            elif way == "chain":  # the large one goes out from the DUL thread, after the first's record
                recorded: list[int] = []
                chain = hotpath.StoreChain(assoc, _chain_items([small, big], context_id), 1, lambda response: True,
                                           lambda index, response: recorded.append(response.Status),
                                           lambda: False)
                assert chain.run() == (2, None, False)
                statuses = recorded
            else:  # pynetdicom's chunked send, as the forwarder uses it for transcoded copies
                monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
                statuses = [assoc.send_c_store(big).Status]
            took = time.monotonic() - started
        finally:
            if assoc.is_established:
                assoc.release()
    assert took > 5.5, f"the link was not slow enough to show anything ({took:.1f} s)"
    assert statuses[-1] == 0x0000, f"no response after {took:.1f} s"
    assert len(scp.stored) == len(statuses)


def test_a_peer_that_stops_in_the_middle_of_a_pdu_is_given_up_after_the_network_timeout(quiet_pynetdicom) -> None:
    """The peer sends 8 bytes of a 306-byte A-ASSOCIATE-AC and then nothing (the rest lost as a
    VPN drops, a PACS hung mid-write), its connection still open. Reading that PDU must fail
    after the network timeout: blocked in it, the association's thread would hold the abort
    that the ACSE timeout asks for — and the destination's worker — for ever."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(bytes([0x02, 0x00, 0, 0, 0x01, 0x2C, 0x00, 0x01]))  # A-ASSOCIATE-AC, 300 bytes: 2 of them
        held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    ae = application_entity("HOTPATH")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.acse_timeout, ae.network_timeout = 1, 2
    outcome: list[bool] = []
    worker = threading.Thread(target=lambda: outcome.append(ae.associate(
        "127.0.0.1", server.getsockname()[1], ae_title="HALF",
        evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)]).is_established), daemon=True)
    worker.start()
    worker.join(15)
    try:
        assert not worker.is_alive(), "the association attempt still hangs 15 s into the stall"
        assert outcome == [False]
    finally:
        for conn in held:
            conn.close()
        server.close()
