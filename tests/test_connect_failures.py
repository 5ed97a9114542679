"""Why an association could not be made, as `appliance echo`, the queue and the journal say it:
the four ways a TCP connection to a peer fails before any DICOM is spoken, each on a real socket
on 127.0.0.1. pynetdicom reports all of them alike (an aborted association) and logs the reason."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from appliance.echo import echo

from .peers import answer_each_connection


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_nothing_listening_reads_refused() -> None:
    ok, text = echo("127.0.0.1", _free_port(), "PACS", timeout=5)
    assert not ok and text.startswith("connection to PACS@127.0.0.1:") and "refused" in text, text


def test_unanswered_connection_reads_no_answer_within_the_timeout(listener: socket.socket) -> None:
    # A listening socket whose accept queue is full drops each new SYN, as a host behind a
    # VPN that is down, or a firewall that drops, never answers it.
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(listener.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        ok, text = echo("127.0.0.1", listener.getsockname()[1], "PACS", timeout=1.5)
    finally:
        for filler in fillers:
            filler.close()
    assert not ok and "no answer from PACS@127.0.0.1:" in text and "within 1.5 s" in text, text


def test_connection_closed_at_once_reads_connected_but_no_association(listener: socket.socket) -> None:
    listener.listen(5)

    def close_each() -> None:
        try:
            while True:
                conn, _ = listener.accept()
                conn.close()
        except OSError:  # the fixture closed the listener
            pass

    threading.Thread(target=close_each, daemon=True).start()
    ok, text = echo("127.0.0.1", listener.getsockname()[1], "PACS", timeout=5)
    assert not ok and text.startswith("connected to PACS@127.0.0.1:") and "but no association" in text, text


def test_request_left_unanswered_reads_connected_but_no_association(listener: socket.socket) -> None:
    listener.listen(5)  # the kernel completes the connection; nobody reads the A-ASSOCIATE-RQ
    ok, text = echo("127.0.0.1", listener.getsockname()[1], "PACS", timeout=1.5)
    assert not ok and "but no association" in text, text


def test_a_rejection_followed_at_once_by_the_close_is_read_as_the_rejection(tmp_path) -> None:
    """storescp --refuse (as DCMTK-based PACS refuse) sends A-ASSOCIATE-RJ and closes at once.
    pynetdicom's requesting thread sometimes wakes after both and reports a failed connection,
    the rejection left unread (5-9 % of tries here): it must be read as the rejection."""
    from .pacs import StoreSCP
    from .peers import require_tool

    require_tool("storescp")
    refusing = StoreSCP(tmp_path / "refusing", ae_title="REFUSES", flags=["--refuse"]).start()
    try:
        answers = [echo("127.0.0.1", refusing.port, "REFUSES", timeout=5)[1] for _ in range(60)]
    finally:
        refusing.stop()
    misread = [a for a in answers if "rejected permanently" not in a]
    assert not misread, f"{len(misread)} of {len(answers)}: {misread[0]}"


def test_a_rejection_with_values_ps38_does_not_define_is_read_as_a_rejection_for_now(listener: socket.socket) -> None:
    """An A-ASSOCIATE-RJ whose result (3) PS3.8 does not define: pynetdicom's state machine
    raised in the DUL thread, which died with a traceback, and the refusal read as "connected,
    but no association". It is a rejection, and one for now: the destination is tried again."""
    answer_each_connection(listener, bytes.fromhex("03 00 00000004 00 03 01 01"))  # result 3, source 1, reason 1
    ok, text = echo("127.0.0.1", listener.getsockname()[1], "PACS", timeout=5)
    assert not ok and "rejected for now by the service user" in text, text
