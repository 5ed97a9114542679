"""Every source of work for pynetdicom's two association loops reaches the loop that takes it.

The loops (appliance/reactor.py) wait for events and the timers they own: the DUL thread for its
socket, its eventfd or its ARTIM timer, the association thread for its Event or its network
idle timer; no clock ticks. Each test here goes through one source of work that is *not* the
usual path — a state-machine action of the DUL after a PDU, a primitive queued with send_pdu —
and checks that the loop acts at once, where the timers involved are 30 s and the loops'
backstop 5 s, and that no loop found work by its backstop. Without the wakeup each tests, the
loop sleeps until the network timeout (the backstop: 5 s, and a warning), or kill() for ever.

The associations run in this process (both ends on the appliance's loops), so that each one's
threads can be watched.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from appliance import pdata, reactor
from appliance.dicomnet import application_entity

from .corpus import Series, write_series
from .peers import free_port, require_tool
from .test_reactor import _wait_for as wait_for

# "At once", against the 30 s network, ACSE and DIMSE timeouts and the loops' 5 s backstop.
PROMPT = 2.0
TIMEOUT = 30


def _wait_for(predicate: Callable[[], bool], timeout: float = PROMPT) -> bool:
    return wait_for(predicate, timeout, poll=0.01)


@pytest.fixture(autouse=True)
def quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom's narration (bound when its logger shows INFO, as under pytest) watches every
    message and so keeps pynetdicom's own receive path: quiet it, as the appliance runs."""
    log = logging.getLogger("pynetdicom")
    level = log.level
    log.setLevel(logging.WARNING)
    yield
    log.setLevel(level)


@pytest.fixture(autouse=True)
def no_missed_wakeups() -> Iterator[None]:
    """No loop in this process may find work by its backstop that nobody signalled."""
    reactor.install()
    before = reactor.missed_wakeups
    yield
    assert reactor.missed_wakeups == before, "a loop found work by its backstop (see the warning logged)"


@contextmanager
def scp(handlers: list[Any], ssl_context: ssl.SSLContext | None = None) -> Iterator[int]:
    """An SCP for Verification and CT on the appliance's loops; yields its port."""
    ae = application_entity("SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = TIMEOUT
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
    assert server is not None
    try:
        yield port
    finally:
        ae.shutdown()


def _associate(port: int, tls_args: tuple[ssl.SSLContext, str] | None = None) -> Association:
    ae = application_entity("SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # the test files' syntax
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = TIMEOUT
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP", tls_args=tls_args)
    assert assoc.is_established
    return assoc


def _accepted(handlers: list[Any]) -> list[Association]:
    """Adds a handler that collects the SCP's associations as they are accepted."""
    seen: list[Association] = []
    handlers.append((evt.EVT_ACCEPTED, lambda event: seen.append(event.assoc)))
    return seen


def test_a_dul_that_stops_on_its_own_ends_the_association_loop_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An abort that does not wait (``abort(block=False)``, as pynetdicom makes every abort from
    an event handler) leaves nothing on the queues for the association loop: the DUL sends the
    A-ABORT, closes the connection and stops, and the loop learns it only from the DUL's end.
    The DUL's last wakeup comes while it is still alive (is_alive() is True until its thread
    has returned), so the loop must not take that for a DUL that goes on. Here the DUL threads
    are slow to finish after it, as a thread descheduled there on a busy box is."""
    closing = reactor._Wakeup.close

    def slowly(wakeup: Any) -> None:
        time.sleep(0.3)
        closing(wakeup)

    monkeypatch.setattr(reactor._Wakeup, "close", slowly)
    with scp([]) as port:
        associations = [_associate(port) for _ in range(5)]
        for assoc in associations:
            assoc.abort(block=False)
        assert _wait_for(lambda: not any(assoc.is_alive() for assoc in associations)), \
            "an association thread outlived its DUL"


def _silent_requestor(port: int) -> socket.socket:
    """A peer that associates (Verification), then neither sends, reads nor closes anything: only
    our own side can end the association."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = "SILENT", "SCP"
    context = build_context(Verification)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16382
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7156.1"
    request.user_information = [length, implementation]
    raw = socket.create_connection(("127.0.0.1", port), timeout=PROMPT)
    raw.sendall(A_ASSOCIATE_RQ(request).encode())
    assert raw.recv(1) == b"\x02", "not accepted"  # A-ASSOCIATE-AC
    return raw


def test_kill_from_another_thread_ends_an_established_association_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Association.kill()`` from another thread sets the association loop's stop flag; the loop
    must see it and end, and pynetdicom's acceptor then closes the connection on its way out. The
    DUL waits in select() on that very socket, and a close by another thread is an event there
    only once the connection changes state — never, if the FIN is not acknowledged (a link gone
    down), or too late, if the number was given to a new connection meanwhile. The DUL must come
    to look at its socket again, or kill(), which waits for it, waits for ever. Here the close is
    made without its shutdown, which the socket does not report while select() holds it."""
    monkeypatch.setattr(ThreadedAssociationServer, "shutdown_request", lambda server, request: request.close())
    handlers: list[Any] = []
    accepted = _accepted(handlers)
    with scp(handlers) as port, _silent_requestor(port):
        assert _wait_for(lambda: len(accepted) == 1)
        time.sleep(0.2)  # both loops waiting
        killer = threading.Thread(target=accepted[0].kill, daemon=True)
        killer.start()
        killer.join(PROMPT)
        assert not killer.is_alive(), "kill() is still waiting for the DUL"
        assert _wait_for(lambda: not accepted[0].is_alive() and not accepted[0].dul.is_alive())


def _context_id(assoc: Association, abstract_syntax: str) -> int:
    return next(int(cx.context_id) for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract_syntax)


def test_a_response_nobody_waits_for_is_taken_by_the_association_loop(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Our SCU's DUL decodes a plain C-STORE-RSP itself (pdata) and queues it for the DIMSE user
    without a state-machine action. A response that no sender waits for (the peer sent one to
    no request) is then the association loop's, as pynetdicom's own queued messages are: it
    must be taken now, not left for the next send to find as its answer."""
    decoded = threading.Event()
    decode = pdata.c_store_response

    def noting(elements: dict[int, bytes]) -> C_STORE | None:
        response = decode(elements)
        if response is not None:
            decoded.set()
        return response

    monkeypatch.setattr(pdata, "c_store_response", noting)

    def answer_and_send_a_stray_response(event: evt.Event) -> int:
        def stray() -> None:
            time.sleep(0.2)  # after the echo's response
            response = C_STORE()
            response.MessageIDBeingRespondedTo = 4242
            response.Status = 0x0000
            response.AffectedSOPClassUID = CTImageStorage
            response.AffectedSOPInstanceUID = "1.2.3.4"
            event.assoc.dimse.send_msg(response, _context_id(event.assoc, CTImageStorage))
        threading.Thread(target=stray, daemon=True).start()
        return 0x0000

    with scp([(evt.EVT_C_ECHO, answer_and_send_a_stray_response)]) as port:
        assoc = _associate(port)
        try:
            assert pdata.StoreReceiver.attach(assoc)
            assert assoc.send_c_echo().Status == 0x0000
            assert decoded.wait(PROMPT), "the stray response never came"
            assert _wait_for(lambda: assoc.dimse.msg_queue.empty()), "the stray response is still queued"
            # pynetdicom's loop took it (and says so just after taking it off the queue)
            assert _wait_for(lambda: "Received unexpected C-STORE service message" in caplog.text)
            assert assoc.send_c_echo().Status == 0x0000  # the next request gets its own response,
            time.sleep(0.2)
            assert "unexpected C-ECHO" not in caplog.text  # not the stray one (leaving its own over)
        finally:
            assoc.release()


def test_a_release_from_the_peer_wakes_the_association_loop() -> None:
    """The A-RELEASE-RQ reaches the loop through the DUL's state-machine action."""
    handlers: list[Any] = []
    accepted = _accepted(handlers)
    with scp(handlers) as port:
        assoc = _associate(port)
        assert _wait_for(lambda: len(accepted) == 1)
        time.sleep(0.2)  # both loops waiting
        started = time.monotonic()
        assoc.release()
        assert assoc.is_released and time.monotonic() - started < PROMPT
        assert _wait_for(lambda: not accepted[0].is_alive())


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate (and its key, in the same file) for 127.0.0.1."""
    require_tool("openssl")
    pem = tmp_path / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(pem), "-out", str(pem)],
                   check=True, capture_output=True, timeout=60)
    return pem


def test_tls_bytes_already_decrypted_are_read_without_waiting(certificate: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE sent from a file goes out a megabyte per write (hotpath.FileMessage): many PDUs
    per TLS record. Once the DUL has read one PDU, the next may already be decrypted inside the
    SSL object, where select() on the socket cannot see it: the DUL must read it before it waits,
    or the last PDUs of the data set wait for the network timeout."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # as the forwarder sends
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certificate)
    client_context = ssl.create_default_context(cafile=str(certificate))
    stored: list[int] = []

    def on_store(event: evt.Event) -> int:
        stored.append(1)
        return 0x0000

    files = write_series(tmp_path / "ct", "tls", 1, 1, Series("CT", 3, 512, 512))
    with scp([(evt.EVT_C_STORE, on_store)], ssl_context=server_context) as port:
        assoc = _associate(port, tls_args=(client_context, "127.0.0.1"))
        try:
            for path in files:
                started = time.monotonic()
                assert assoc.send_c_store(path).Status == 0x0000
                assert time.monotonic() - started < PROMPT
            for _ in range(50):
                assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    assert len(stored) == len(files)
