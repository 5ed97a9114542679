"""``appliance print-jobs`` shows what the print queue holds, as an operator reads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.printing.settings import PrintRetry

from .conftest import RunningPrinter, free_port, printer, wait_for
from .scu import PrintSCU, gray_item


def test_print_jobs_lists_printed_and_waiting_jobs(
    print_server: Callable[..., RunningPrinter], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    box = print_server({
        "film": printer("FILM"),
        "offline": printer("OFFLINE", backend="socket", host="127.0.0.1", socket_port=free_port(),
                           status_timeout=0.3, retry=PrintRetry(initial_delay=60.0)),
    }, root=root)
    for called in ("FILM", "OFFLINE"):
        with PrintSCU(box.port, called, calling_ae="CT_SCANNER") as scu:
            scu.create_session()
            film = scu.create_film_box(r"STANDARD\1,1")
            scu.set_image(film.dataset, 1, gray_item(np.full((8, 8), 9, np.uint8)))
            assert scu.print_film_box(film.uid) == 0
    box.wait_jobs(1)
    wait_for(lambda: any(j.state == "queued" and j.attempts == 1 for j in box.jobs()), what="a failed attempt")
    config = tmp_path / "appliance.yaml"
    config.write_text(f"storage:\n  path: {root}\n")
    assert main(["print-jobs", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["JOB", "STATE", "PRINTER"]
    printed = next(line for line in lines if " printed " in line)
    assert "film" in printed and "CT_SCANNER" in printed and ".png" in printed
    assert any(" queued " in line and "offline" in line for line in lines)
    assert "last error:" in out and "1 printed, 1 queued" in out
    # Cut to the newest job: the count is still of all of them, and says the list is cut.
    assert main(["print-jobs", "--config", str(config), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert sum(line.split()[1:2] in (["printed"], ["queued"]) for line in out.splitlines()) == 1, out
    assert out.splitlines()[-1] == "1 printed, 1 queued (the newest 1 of 2 listed: --limit N lists more)", out


def test_print_jobs_retry_sends_a_failed_job_again(
    print_server: Callable[..., RunningPrinter], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_backends import FakeAppSocketPrinter

    root = tmp_path / "data"
    laser = FakeAppSocketPrinter(free_port())
    box = print_server({"laser": printer("LASER", backend="socket", host="127.0.0.1", socket_port=laser.port,
                                         status_timeout=0.3, retry=PrintRetry(max_attempts=1))}, root=root)
    with PrintSCU(box.port, "LASER") as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\1,1")
        scu.set_image(film.dataset, 1, gray_item(np.full((8, 8), 9, np.uint8)))
        assert scu.print_film_box(film.uid) == 0
    failed = box.wait_jobs(1, state="failed")[0]
    config = tmp_path / "appliance.yaml"
    config.write_text(f"storage:\n  path: {root}\n")
    laser.start()
    try:
        assert main(["print-jobs", "--config", str(config), "--retry", str(failed.id)]) == 0
        assert "queued again" in capsys.readouterr().out
        box.wait_jobs(1, state="printed")
        wait_for(lambda: len(laser.jobs) == 1, what="the job at the printer")
        assert main(["print-jobs", "--config", str(config), "--retry", str(failed.id)]) == 1
    finally:
        laser.stop()
