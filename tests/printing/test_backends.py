"""Films reach real spoolers and printers: a private CUPS scheduler on 127.0.0.1 with a
PostScript queue writing to a file, and a fake AppSocket (port 9100 style) printer that can be
switched off and on. The queue survives an offline printer and a restart of the service."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.db import insert_print_job, open_database, print_jobs_in_state
from appliance.printing.jobs import format_jobs, list_jobs
from appliance.printing.settings import PrintRetry

from .conftest import RunningPrinter, free_port, ghostscript, printer, wait_for
from .scu import PrintSCU, gray_item


def print_one(box: RunningPrinter, called_ae: str, value: int = 60, copies: int = 1, **film: object) -> None:
    with PrintSCU(box.port, called_ae) as scu:
        assert scu.create_session(NumberOfCopies=copies).status == 0
        reply = scu.create_film_box(r"STANDARD\1,1", **film)
        assert reply.status == 0
        assert scu.set_image(reply.dataset, 1, gray_item(np.full((64, 64), value, np.uint8))).status == 0
        assert scu.print_film_box(reply.uid) == 0


# ---- a fake AppSocket printer ---------------------------------------------------------------------

class FakeAppSocketPrinter:
    """Accepts connections on 127.0.0.1:port and keeps each one's bytes as one job."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.jobs: list[bytes] = []
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeAppSocketPrinter:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(4)
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
        self._thread.start()
        return self

    def _serve(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                chunks = []
                while data := conn.recv(1 << 16):
                    chunks.append(data)
                if chunks:  # a status probe connects and sends nothing
                    self.jobs.append(b"".join(chunks))

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._thread is not None:
            self._thread.join(5)


@pytest.fixture
def appsocket() -> Iterator[FakeAppSocketPrinter]:
    fake = FakeAppSocketPrinter(free_port())
    yield fake
    fake.stop()


def socket_printer(port: int) -> dict[str, object]:
    return {"backend": "socket", "host": "127.0.0.1", "socket_port": port, "status_timeout": 0.5}


def test_appsocket_printer_receives_byte_identical_postscript(
    print_server: Callable[..., RunningPrinter], appsocket: FakeAppSocketPrinter
) -> None:
    appsocket.start()
    box = print_server({"laser": printer("LASER", **socket_printer(appsocket.port))})
    print_one(box, "LASER", copies=2)
    job = box.wait_jobs(1)[0]
    wait_for(lambda: len(appsocket.jobs) == 2, what="two copies at the printer")
    for received in appsocket.jobs:
        assert len(received) == job.ps_size
        assert hashlib.sha256(received).hexdigest() == job.ps_sha256
    assert appsocket.jobs[0].startswith(b"%!PS-Adobe-3.0")


def test_offline_printer_keeps_the_job_queued_until_it_returns(
    print_server: Callable[..., RunningPrinter], appsocket: FakeAppSocketPrinter
) -> None:
    box = print_server({"laser": printer("LASER", **socket_printer(appsocket.port))})
    with PrintSCU(box.port, "LASER") as scu:
        state = scu.printer_status().dataset
        assert (state.PrinterStatus, state.PrinterStatusInfo) == ("FAILURE", "PRINTER OFFLINE")
    print_one(box, "LASER")  # the modality still hears success: the film is spooled
    wait_for(lambda: (jobs := box.jobs()) and jobs[0].attempts >= 2, what="retries")
    job = box.jobs()[0]
    assert job.state in ("queued", "sending") and "Connection refused" in job.last_error
    assert "last error:" in format_jobs(box.jobs())
    appsocket.start()
    printed = box.wait_jobs(1)[0]
    assert len(appsocket.jobs) == 1 and hashlib.sha256(appsocket.jobs[0]).hexdigest() == printed.ps_sha256


class SteppedTime:
    """The ``time`` module as the spool sees it, with the wall clock stepped by ``step`` seconds
    (a box without a battery-backed clock meeting NTP, an admin's ``date -s``)."""

    def __init__(self, step: float) -> None:
        self.step = step

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.step


def test_a_step_back_of_the_wall_clock_does_not_stall_a_waiting_job(
    print_server: Callable[..., RunningPrinter], appsocket: FakeAppSocketPrinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job waits out its retry delay for an offline printer when the clock steps back a day:
    once the printer is back, the job prints within seconds, not a day later. Retry times are on
    the schedule clock (appliance/clock.py), which a step of the wall clock does not move."""
    box = print_server({"laser": printer("LASER", retry=PrintRetry(initial_delay=2.0, factor=1.0, max_delay=2.0),
                                         **socket_printer(appsocket.port))})
    print_one(box, "LASER")
    wait_for(lambda: (jobs := box.jobs()) and jobs[0].attempts >= 1, what="a failed attempt")
    monkeypatch.setattr("appliance.printing.spool.time", SteppedTime(-86400))
    appsocket.start()
    started = time.monotonic()
    box.wait_jobs(1)
    assert time.monotonic() - started < 10


def test_a_step_forward_of_the_wall_clock_does_not_give_a_waiting_job_up(
    print_server: Callable[..., RunningPrinter], appsocket: FakeAppSocketPrinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``give_up_after: 1d``; the clock steps four days forward while the printer is offline. The
    failed attempts that follow leave the job queued: it has waited seconds, not days."""
    box = print_server({"laser": printer("LASER", retry=PrintRetry(initial_delay=0.2, factor=1.0, max_delay=0.2,
                                                                   give_up_after=86400.0),
                                         **socket_printer(appsocket.port))})
    print_one(box, "LASER")
    wait_for(lambda: (jobs := box.jobs()) and jobs[0].attempts >= 1, what="a failed attempt")
    monkeypatch.setattr("appliance.printing.spool.time", SteppedTime(4 * 86400))
    tried = box.jobs()[0].attempts
    wait_for(lambda: box.jobs()[0].attempts >= tried + 2 or box.jobs()[0].state == "failed", what="two more attempts")
    assert box.jobs()[0].state in ("queued", "sending"), box.jobs()[0]
    appsocket.start()
    box.wait_jobs(1)


def test_queued_job_survives_a_restart(
    print_server: Callable[..., RunningPrinter], appsocket: FakeAppSocketPrinter, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    settings = printer("LASER", **socket_printer(appsocket.port))
    box = print_server({"laser": settings}, root=root)
    print_one(box, "LASER")
    wait_for(lambda: box.jobs()[0].attempts >= 1, what="a failed attempt")
    box.service.stop()
    appsocket.start()
    again = print_server({"laser": settings}, root=root)
    printed = again.wait_jobs(1)[0]
    assert printed.attempts >= 2
    wait_for(lambda: len(appsocket.jobs) == 1, what="the job at the printer")
    assert hashlib.sha256(appsocket.jobs[0]).hexdigest() == printed.ps_sha256


def test_job_interrupted_while_rendering_is_failed_on_restart(
    print_server: Callable[..., RunningPrinter], tmp_path: Path
) -> None:
    root = tmp_path / "data"
    db = open_database(root)
    from appliance.db import ensure_print_schema

    ensure_print_schema(db)
    insert_print_job(db, "film", "TESTPRINT", "CT1", "film box", ["1.2.3"], 1, "MED", "t")
    db.close()
    print_server(root=root)
    failed = [j for j in list_jobs(root) if j.state == "failed"]
    assert len(failed) == 1 and "rendering" in failed[0].last_error
    db = open_database(root)
    assert print_jobs_in_state(db, "rendering") == []
    db.close()


def test_directory_backend_archives_pdf(print_server: Callable[..., RunningPrinter], tmp_path: Path) -> None:
    if not shutil.which("ps2pdf"):
        pytest.skip("needs ps2pdf (Ghostscript)")
    box = print_server({"archive": printer("ARCHIVE", pdf=True)})
    print_one(box, "ARCHIVE")
    box.wait_jobs(1)
    pdfs = box.printed_files(".pdf")
    assert len(pdfs) == 1 and pdfs[0].read_bytes().startswith(b"%PDF")


def test_directory_backend_files_are_readable_by_the_admins_other_tools(
        print_server: Callable[..., RunningPrinter]) -> None:
    """A file share or a script collecting the PDFs reads the archive as another user: its files
    are 0644 whatever the service's umask (the systemd unit's is 0027), and each appears complete
    under its name, with nothing else left beside it."""
    if not shutil.which("ps2pdf"):
        pytest.skip("needs ps2pdf (Ghostscript)")
    previous = os.umask(0o027)
    try:
        box = print_server({"archive": printer("ARCHIVE", pdf=True)})
        print_one(box, "ARCHIVE")
        job = box.wait_jobs(1)[0]
    finally:
        os.umask(previous)
    ps, pdf = box.printed_files(), box.printed_files(".pdf")
    assert len(ps) == 1 and len(pdf) == 1
    assert sorted(box.out.iterdir()) == sorted([ps[0], pdf[0]])
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in (ps[0], pdf[0])} == \
        {ps[0].name: "0o644", pdf[0].name: "0o644"}
    assert hashlib.sha256(ps[0].read_bytes()).hexdigest() == job.ps_sha256
    assert pdf[0].read_bytes().startswith(b"%PDF")


# ---- a private CUPS scheduler ---------------------------------------------------------------------

class Cups:
    """cupsd on 127.0.0.1:<port> with its own configuration, spool and logs under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        for sub in ("etc/ppd", "spool/tmp", "cache", "state", "log", "out"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "etc/cupsd.conf").write_text(
            f"LogLevel info\nMaxLogSize 0\nListen 127.0.0.1:{self.port}\nListen {root}/cups.sock\n"
            "Browsing No\nBrowseLocalProtocols none\nWebInterface No\nDefaultAuthType Basic\n"
            "<Location />\n  Order allow,deny\n  Allow 127.0.0.1\n</Location>\n"
            "<Location /admin>\n  Order allow,deny\n  Allow 127.0.0.1\n</Location>\n"
            "<Policy default>\n  <Limit All>\n    Order deny,allow\n  </Limit>\n</Policy>\n"
        )
        (root / "etc/cups-files.conf").write_text(
            f"ServerRoot {root}/etc\nRequestRoot {root}/spool\nTempDir {root}/spool/tmp\nCacheDir {root}/cache\n"
            f"StateDir {root}/state\nAccessLog {root}/log/access_log\nErrorLog {root}/log/error_log\n"
            f"PageLog {root}/log/page_log\nSystemGroup root\nFileDevice Yes\nSandboxing Relaxed\n"
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # A client's connection is now and then refused while a freshly started cupsd settles
        # ("Unable to connect to server: Bad file descriptor", seen once in CI): try again.
        for attempt in range(5):
            done = subprocess.run([args[0], "-h", self.server, *args[1:]], capture_output=True, text=True,
                                  timeout=30, check=False)
            if "Unable to connect to server" not in done.stderr:
                break
            time.sleep(0.2 * (attempt + 1))
        return done

    def start(self) -> Cups:
        self.process = subprocess.Popen(
            ["cupsd", "-f", "-c", f"{self.root}/etc/cupsd.conf", "-s", f"{self.root}/etc/cups-files.conf"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.run("lpstat", "-r").returncode == 0, timeout=15, what="cupsd")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)
        self.process = None


@pytest.fixture
def cups() -> Iterator[Cups]:
    if not (shutil.which("cupsd") and shutil.which("lp") and os.geteuid() == 0):
        pytest.skip("needs cups, cups-client, cups-bsd (and root for cupsd's file device)")
    # cupsd runs filters and backends as user lp: its directory must be reachable by lp, which
    # pytest's private tmp_path is not.
    root = Path(tempfile.mkdtemp(prefix="print-cups-"))
    root.chmod(0o755)
    scheduler = Cups(root)
    (root / "out").chmod(0o777)
    scheduler.start()
    yield scheduler
    scheduler.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_cups_postscript_queue_prints_the_film(print_server: Callable[..., RunningPrinter], cups: Cups) -> None:
    out = cups.root / "out" / "psfile.ps"
    added = cups.run("lpadmin", "-p", "psfile", "-E", "-v", f"file://{out}", "-m", "drv:///sample.drv/generic.ppd",
                     "-o", "PageSize=A4")
    assert added.returncode == 0, added.stderr
    box = print_server({"ward": printer("WARD", backend="cups", cups_queue="psfile", cups_server=cups.server,
                                        default_paper="A4", margin_mm=4.0)})
    with PrintSCU(box.port, "WARD") as scu:
        state = scu.printer_status().dataset
        assert (state.PrinterStatus, state.PrinterStatusInfo) == ("NORMAL", "NORMAL")
    print_one(box, "WARD", value=60, BorderDensity="WHITE")
    box.wait_jobs(1)
    wait_for(lambda: out.exists() and out.stat().st_size > 1000 and b"%%EOF" in out.read_bytes(), timeout=30,
             what="CUPS to write the job")
    page = ghostscript(out)[0]
    assert page.shape == (842, 595)  # A4, as the paper map says
    assert abs(int(page[421, 297]) - 60) <= 2  # the image, through the real pstops filter
    completed = cups.run("lpstat", "-W", "completed", "-o")
    assert "psfile" in completed.stdout


def test_cups_printer_state_and_scheduler_outage(print_server: Callable[..., RunningPrinter], cups: Cups) -> None:
    out = cups.root / "out" / "psfile.ps"
    assert cups.run("lpadmin", "-p", "psfile", "-E", "-v", f"file://{out}", "-m",
                    "drv:///sample.drv/generic.ppd").returncode == 0
    box = print_server({"ward": printer("WARD", backend="cups", cups_queue="psfile", cups_server=cups.server)})
    box.service.states["ward"].max_age = 0.0  # no caching of the probe in this test
    assert cups.run("cupsdisable", "psfile").returncode == 0
    with PrintSCU(box.port, "WARD") as scu:
        state = scu.printer_status().dataset
        assert (state.PrinterStatus, state.PrinterStatusInfo) == ("FAILURE", "PRINTER DOWN")
    assert cups.run("cupsenable", "psfile").returncode == 0
    cups.stop()
    with PrintSCU(box.port, "WARD") as scu:
        state = scu.printer_status().dataset
        assert (state.PrinterStatus, state.PrinterStatusInfo) == ("FAILURE", "PRINTER OFFLINE")
    print_one(box, "WARD")
    wait_for(lambda: box.jobs()[0].attempts >= 1, what="a failed lp")
    assert box.jobs()[0].state in ("queued", "sending")
    cups.start()
    box.wait_jobs(1, timeout=30)
    wait_for(lambda: out.exists() and b"%%EOF" in out.read_bytes(), timeout=30, what="CUPS to write the job")


def test_cups_raw_socket_queue_passes_postscript_unchanged(
    print_server: Callable[..., RunningPrinter], cups: Cups, appsocket: FakeAppSocketPrinter
) -> None:
    appsocket.start()
    assert cups.run("lpadmin", "-p", "sock9100", "-E", "-v",
                    f"socket://127.0.0.1:{appsocket.port}").returncode == 0
    box = print_server({"ward": printer("WARD", backend="cups", cups_queue="sock9100", cups_server=cups.server)})
    print_one(box, "WARD")
    job = box.wait_jobs(1)[0]
    wait_for(lambda: len(appsocket.jobs) == 1, timeout=30, what="CUPS to send to the AppSocket printer")
    assert hashlib.sha256(appsocket.jobs[0]).hexdigest() == job.ps_sha256
    time.sleep(0)  # keep the fixture order explicit: cups stops before the fake printer


def test_a_hung_printer_does_not_hold_up_another(print_server: Callable[..., RunningPrinter]) -> None:
    # A printer that accepts connections but never reads or answers.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        box = print_server({
            "hung": printer("HUNG", backend="socket", host="127.0.0.1", socket_port=hung.getsockname()[1]),
            "film": printer("FILM"),
        })
        print_one(box, "HUNG")
        wait_for(lambda: box.jobs()[0].state == "sending", what="the hung printer's job to be sending")
        print_one(box, "FILM")
        started = time.monotonic()
        printed = box.wait_jobs(1, timeout=3)[0]
        assert printed.printer == "film" and time.monotonic() - started < 3
        assert {j.printer: j.state for j in box.jobs()}["hung"] == "sending"
    finally:
        hung.close()


def test_prune_removes_old_files_but_keeps_history(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    print_one(box, "TESTPRINT")
    job = box.wait_jobs(1)[0]
    assert job.preview_path and Path(job.preview_path).is_file()
    spool = box.service.spool
    assert spool is not None
    spool.prune(keep_for=3600)  # young: kept
    assert Path(job.preview_path).is_file()
    spool.prune(keep_for=-1)
    assert not Path(job.preview_path).exists()
    assert [(j.id, j.state, j.preview_path) for j in box.jobs()] == [(job.id, "printed", None)]
