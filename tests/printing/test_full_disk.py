"""The print spool on a full disk (a tmpfs of its own, filled for real): a job whose outcome
cannot be written is neither lost nor left half-done."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.printing import statuses
from appliance.valuetypes import Space
from tests.conftest import tmpfs_dir

from .conftest import RunningPrinter, free_port, printer, wait_for
from .scu import PrintSCU, gray_item


@pytest.fixture
def data_disk(tmp_path: Path) -> Iterator[Path]:
    """The appliance's data directory on a 16 MB filesystem of its own."""
    with tmpfs_dir(tmp_path, "data", "16m") as mount:
        yield mount


def fill(disk: Path) -> Path:
    """Take every free block of ``disk``; returns the file that holds them."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def print_film(port: int, called_ae: str, value: int = 60, size: int = 64) -> int:
    with PrintSCU(port, called_ae) as scu:
        assert scu.create_session().status == 0
        film = scu.create_film_box(r"STANDARD\1,1")
        assert film.status == 0
        assert scu.set_image(film.dataset, 1, gray_item(np.full((size, size), value, np.uint8))).status == 0
        return scu.print_film_box(film.uid)


def receive_job(server: socket.socket) -> socket.socket:
    """Accept the printer connection and read the job up to the sender's end of it."""
    conn, _ = server.accept()
    conn.settimeout(10)
    while conn.recv(1 << 16):
        pass
    return conn


def test_a_job_whose_failed_attempt_cannot_be_recorded_is_queued_again_once_it_can(
        print_server: Callable[..., RunningPrinter], data_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(20)
    settings = printer("LASER", backend="socket", host="127.0.0.1", socket_port=port, status_timeout=0.5)
    box: RunningPrinter = print_server({"laser": settings}, root=data_disk)
    assert print_film(box.port, "LASER") == 0
    conn = receive_job(server)
    assert [job.state for job in box.jobs()] == ["sending"]
    filler = fill(data_disk)
    # The printer resets the connection: the attempt fails while the database cannot be written.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    wait_for(lambda: any("disk is full" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING),
             what="the spool to find the disk full")
    assert [job.state for job in box.jobs()] == ["sending"]
    filler.unlink()
    # Once the disk has room, the failed attempt is recorded and the job is tried again.
    wait_for(lambda: box.jobs()[0].state != "sending", timeout=15, what="the job given back to the queue")
    receive_job(server).close()
    job = box.wait_jobs(1)[0]
    assert job.attempts == 2
    server.close()


def test_a_job_whose_preview_cannot_be_written_leaves_nothing_behind(
        print_server: Callable[..., RunningPrinter], data_disk: Path) -> None:
    box = print_server(root=data_disk)
    # Room for the PostScript, none for the preview after it (a noisy image: a large file).
    noisy = np.random.default_rng(1).integers(0, 256, (1024, 1024), dtype=np.uint8)
    with PrintSCU(box.port, "TESTPRINT") as scu:
        assert scu.create_session().status == 0
        film = scu.create_film_box(r"STANDARD\1,1")
        assert scu.set_image(film.dataset, 1, gray_item(noisy)).status == 0
        filler = fill(data_disk)
        # 1.4 MB of PostScript; the free space left is that plus a little, not a preview's worth.
        with filler.open("r+b") as out:
            out.truncate(filler.stat().st_size - 1_400_000 - 64 * 1024)
        assert scu.print_film_box(film.uid) == statuses.QUEUE_FULL_FILM_BOX
    jobs = box.jobs()
    assert [(job.state, job.ps_path) for job in jobs] == [("failed", None)]
    assert sorted(p.name for p in (data_disk / "print").rglob("*") if p.is_file()) == []


def test_a_job_that_would_take_the_disk_below_min_free_is_refused(
        print_server: Callable[..., RunningPrinter], data_disk: Path) -> None:
    box = print_server(root=data_disk, min_free=Space(bytes=8 << 20))
    filler = fill(data_disk)
    with filler.open("r+b") as out:
        out.truncate(filler.stat().st_size - (9 << 20))  # 9 MB free, 1 MB above min_free
    noisy = np.random.default_rng(1).integers(0, 256, (1024, 1024), dtype=np.uint8)
    with PrintSCU(box.port, "TESTPRINT") as scu:
        assert scu.create_session().status == 0
        film = scu.create_film_box(r"STANDARD\1,1")
        assert scu.set_image(film.dataset, 1, gray_item(noisy)).status == 0
        # About 1.3 MB of PostScript: it would leave less than min_free.
        assert scu.print_film_box(film.uid) == statuses.QUEUE_FULL_FILM_BOX
        assert scu.set_image(film.dataset, 1, gray_item(noisy[:64, :64])).status == 0
        assert scu.print_film_box(film.uid) == 0
    assert len(box.wait_jobs(1)) == 1 and len(box.jobs()) == 1
    assert len(box.printed_files()) == 1
