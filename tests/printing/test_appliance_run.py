"""The print SCP inside ``appliance run``: configured from YAML, printing through the real
process, and keeping a queued film across a kill -9 (a power cut)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.printing import statuses
from appliance.printing.jobs import list_jobs

from ..peers import wait_for_port
from .conftest import free_port, wait_for
from .scu import PrintSCU, gray_item
from .test_backends import FakeAppSocketPrinter


def print_config(port: int, printers: dict[str, Any]) -> dict[str, Any]:
    return {"print": {"enabled": True, "bind_address": "127.0.0.1", "port": port, "printers": printers}}


def send_film(port: int, called_ae: str) -> None:
    with PrintSCU(port, called_ae, calling_ae="MODALITY") as scu:
        assert scu.printer_status().status == 0
        assert scu.create_session(assign=True).status == 0
        film = scu.create_film_box(r"STANDARD\1,1", assign=True, FilmSizeID="8INX10IN")
        assert film.status == 0
        assert scu.set_image(film.dataset, 1, gray_item(np.full((32, 32), 77, np.uint8))).status == 0
        assert scu.print_film_box(str(film.uid)) == 0


def test_appliance_run_prints_films(appliance_factory: Callable[..., Any], tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "films"
    box = appliance_factory(print_config(port, {
        "film": {"ae_title": "FILMPRINTER", "backend": "directory", "directory": str(out), "default_paper": "FILM"},
    }))
    wait_for_port(port, process=box.process)
    send_film(port, "FILMPRINTER")
    wait_for(lambda: any(j.state == "printed" for j in list_jobs(box.data)), what="the film to print")
    assert len(list(out.glob("*.ps"))) == 1


def test_a_film_that_would_take_the_disk_below_min_free_is_refused(appliance_factory: Callable[..., Any],
                                                                    tmp_path: Path) -> None:
    """storage.disk.min_free, kept for receiving images and for the database, is the print
    spool's floor as well: a film that would take the disk below it is refused (the queue is
    full), rather than filling the disk."""
    port = free_port()
    out = tmp_path / "films"
    config = print_config(port, {
        "film": {"ae_title": "FILMPRINTER", "backend": "directory", "directory": str(out), "default_paper": "FILM"},
    })
    box = appliance_factory({**config, "storage": {"disk": {"min_free": "99%", "evict_above": "100%"}}})
    wait_for_port(port, process=box.process)
    with PrintSCU(port, "FILMPRINTER", calling_ae="MODALITY") as scu:
        assert scu.create_session(assign=True).status == 0
        film = scu.create_film_box(r"STANDARD\1,1", assign=True, FilmSizeID="8INX10IN")
        assert scu.set_image(film.dataset, 1, gray_item(np.full((32, 32), 77, np.uint8))).status == 0
        assert scu.print_film_box(str(film.uid)) == statuses.QUEUE_FULL_FILM_BOX
    assert list_jobs(box.data) == []


def test_queued_film_survives_kill_9(appliance_factory: Callable[..., Any], tmp_path: Path) -> None:
    port = free_port()
    laser = FakeAppSocketPrinter(free_port())
    config = print_config(port, {
        "laser": {"ae_title": "LASER", "backend": "socket", "host": "127.0.0.1", "socket_port": laser.port,
                  "status_timeout": "0.5s", "retry": {"initial_delay": "0.5s", "max_delay": "1s"}},
    })
    box = appliance_factory(config)
    wait_for_port(port, process=box.process)
    send_film(port, "LASER")  # acknowledged: the film is in the durable queue
    wait_for(lambda: list_jobs(box.data)[0].attempts >= 1, what="a failed attempt")
    box.kill()
    laser.start()
    try:
        box.start(wait=False)
        wait_for_port(port, process=box.process)
        wait_for(lambda: list_jobs(box.data)[0].state == "printed", timeout=20, what="the film to print")
        job = list_jobs(box.data)[0]
        wait_for(lambda: len(laser.jobs) == 1, what="the job at the printer")
        assert hashlib.sha256(laser.jobs[0]).hexdigest() == job.ps_sha256
    finally:
        laser.stop()
