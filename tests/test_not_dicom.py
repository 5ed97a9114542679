"""Peers that do not speak DICOM, on real sockets: a web browser or an HTTP health check on the
DICOM port, a modality set up for TLS on a port without it, a port scan's bytes — and a
"PACS" port that answers in HTTP. pynetdicom read such a stream six bytes at a time, logging
an error and sending an A-ABORT for each six, until the peer closed (one 20 kB HTTP request:
about 3 400 journal lines); a length it read from the garbage could make it wait for gigabytes.
The box now answers once, closes the connection and says in one line what the peer spoke."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.echo import echo
from appliance.reactor import describe_not_dicom

from .peers import ApplianceProcess, answer_each_connection

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: box\r\nUser-Agent: health-check\r\n\r\n" + b"x" * 20_000
# The start of a TLS 1.2 ClientHello record: content type 22 (handshake), version 3.1.
TLS_HELLO = bytes.fromhex("16030102000100 01fc0303") + bytes(500)
A_ABORT = bytes.fromhex("07000000000400000000")


def _talk(port: int, payload: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``payload``, read until the box closes the connection; what came back, and when."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the box closed while the rest was still being sent
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer, time.monotonic() - started


@pytest.fixture
def box(tmp_path: Path) -> Iterator[ApplianceProcess]:
    process = ApplianceProcess(tmp_path / "box").start()
    yield process
    process.stop()


def _echo_works(box: ApplianceProcess) -> bool:
    return subprocess.run(["echoscu", "-aec", box.ae_title, "127.0.0.1", str(box.port)],
                          capture_output=True, timeout=30).returncode == 0


def test_an_http_request_is_answered_once_closed_at_once_and_named_in_one_line(box: ApplianceProcess) -> None:
    answer, took = _talk(box.port, HTTP_REQUEST)
    assert answer == A_ABORT, answer[:40]  # one A-ABORT, not one for every six bytes read
    assert took < 5, took  # closed by the box, not left until the peer gives up
    answer, _ = _talk(box.port, HTTP_REQUEST)  # a health check, again
    assert answer == A_ABORT
    assert _echo_works(box)
    log = box.log()
    assert "Unknown PDU type" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "not DICOM" in line]
    # once per source address and hour: a health check every few seconds does not fill the journal
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "127.0.0.1" in lines[0] and "an HTTP request" in lines[0], lines[0]


def test_a_tls_client_on_a_plain_port_is_told_apart(box: ApplianceProcess) -> None:
    answer, took = _talk(box.port, TLS_HELLO)
    assert answer == A_ABORT and took < 5, (answer[:40], took)
    assert _echo_works(box)
    log = box.log()
    assert "Unknown PDU type" not in log, log[-3000:]
    assert "a TLS handshake: the sender is set up to use TLS" in log, log[-3000:]


def test_a_length_no_such_pdu_has_is_not_waited_for(box: ApplianceProcess) -> None:
    # An A-ABORT's type with a length of 268 MB: pynetdicom waited for that many bytes
    # (until the peer closed, or for ever while it kept the connection open).
    garbage = bytes.fromhex("07 00 10 00 00 00") + bytes(100)
    answer, took = _talk(box.port, garbage)
    assert took < 5, took
    assert _echo_works(box)
    assert "bytes that are no DICOM PDU: 07 00 10 00 00 00" in box.log(), box.log()[-3000:]


def test_a_destination_port_that_answers_in_http_is_named_as_such() -> None:
    """What `appliance echo`, the queue and the journal say of a destination whose port is a web
    server's (one that answers a binary request with 400 at once, as nginx does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    answer_each_connection(server, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                           linger=0.5)
    try:
        ok, text = echo("127.0.0.1", server.getsockname()[1], "PACS", timeout=5)
    finally:
        server.close()
    assert not ok and "answered with HTTP, not DICOM: that is a web port" in text, text


@pytest.mark.parametrize(("first", "from_client", "expected"), [
    (b"POST /x", True, "an HTTP request"),
    (b"HTTP/1.0 400", False, "a web port"),
    (bytes.fromhex("160301020001"), True, "set up to use TLS"),
    (bytes.fromhex("150301000202"), False, "expects TLS"),
    (b"SSH-2.0", True, "SSH"),
    (bytes.fromhex("ff00aa000000"), True, "no DICOM PDU: ff 00 aa 00 00 00"),
])
def test_what_the_first_bytes_are_taken_for(first: bytes, from_client: bool, expected: str) -> None:
    assert expected in describe_not_dicom(first, from_client)
