"""`appliance run` is a small process tree: the receiver, and a forwarder child it supervises.
A child that dies is restarted and its work goes on; a kill -9 of the parent (a power cut of
the software) leaves no orphan behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from appliance.store import Store

from .corpus import Series, write_series
from .pacs import RecordingSCP, destination, queue_of, wait_until
from .peers import REPO, ApplianceProcess, free_port, storescu


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def forwarder_pid(pid: int) -> int | None:
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # it exited (and was reaped) since pgrep listed it
            continue
        if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
            return child
    return None


def kill_the_forwarder(box: ApplianceProcess) -> None:
    """SIGKILL the forwarder child; return once the main process has started another."""
    assert box.process is not None
    first = forwarder_pid(box.process.pid)
    assert first is not None, "the forwarder runs in a child process"
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: forwarder_pid(box.process.pid) not in (None, first), 20,  # type: ignore[union-attr]
               lambda: "the forwarder was not restarted")


def three_are_delivered(box: ApplianceProcess, scp: RecordingSCP, directory: Path) -> None:
    files = write_series(directory, directory.name, 1, 1, Series("CT", 3, 64, 64))
    assert not storescu(box.port, files).failed
    wait_until(lambda: len(scp.stored_uids()) == 3, 30, lambda: f"delivered {scp.stored_uids()}")


def test_dead_forwarder_is_restarted_and_forwards(appliance_factory, tmp_path: Path) -> None:
    with ExitStack() as stack:
        scp = stack.enter_context(RecordingSCP("PACS"))
        box = appliance_factory({"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                                 "routes": [{"send_to": ["pacs"]}]})
        kill_the_forwarder(box)
        assert "forwarder (pid" in box.log() and "died" in box.log()
        three_are_delivered(box, scp, tmp_path / "restart")


def test_a_child_that_keeps_dying_soon_is_restarted_after_doubling_pauses(appliance_factory) -> None:
    """A forwarder that dies right after each start (a full disk it cannot record on) is not
    restarted every 2 s for ever, filling the journal: the pause doubles each time."""
    box = appliance_factory()
    for _ in range(3):
        kill_the_forwarder(box)
    assert box.process is not None
    os.kill(forwarder_pid(box.process.pid), signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: "restarting it in 16 s" in box.log(), 20, lambda: box.log()[-2000:])
    delays = re.findall(r"died with exit code -9; restarting it in (\d+) s", box.log())
    assert delays == ["2", "4", "8", "16"], delays


def test_a_forwarder_thread_that_fails_restarts_the_forwarder_and_its_work_goes_on(appliance_factory,
                                                                                 tmp_path: Path) -> None:
    """The database refuses a worker's write: another process holds SQLite's write lock past
    the 30 s busy timeout. The worker's failure takes the forwarder process down instead of
    leaving its destination silently unserved; the main process starts it again, and the
    instance it had queued is delivered."""
    port = free_port()  # nobody listens yet: the instance waits for its next attempt
    box = appliance_factory({"destinations": {"pacs": destination("PACS", port)},
                             "routes": [{"send_to": ["pacs"]}]})
    assert box.process is not None
    first = forwarder_pid(box.process.pid)
    files = write_series(tmp_path / "ct", "thread-fails", 1, 1, Series("CT", 1, 64, 64))
    assert not storescu(box.port, files).failed
    wait_until(lambda: queue_of(box, "pacs")["last_error"], 20, lambda: f"no attempt: {queue_of(box, 'pacs')}")

    lock = sqlite3.connect(box.data / "appliance.db", isolation_level=None, timeout=1)
    lock.execute("BEGIN IMMEDIATE")
    try:
        wait_until(lambda: "exiting, to be started again" in box.log(), 90,
                   lambda: "the forwarder did not give up on its failed worker")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "database is locked" in box.log()

    with RecordingSCP("PACS", port=port) as scp:
        wait_until(lambda: forwarder_pid(box.process.pid) not in (None, first), 60,  # type: ignore[union-attr]
                   lambda: "the forwarder was not started again")
        wait_until(lambda: len(scp.stored_uids()) == 1, 30, lambda: f"queue: {queue_of(box, 'pacs')}")


def test_a_forwarder_restarted_after_its_file_went_bad_runs_the_box_s_configuration(appliance_factory,
                                                                                   tmp_path: Path) -> None:
    """The admin saved a broken file (no reload, or a refused one); then the forwarder died. It
    is started again with the configuration the box runs, not the broken file, so forwarding
    does not stop until someone mends the file."""
    with RecordingSCP("PACS") as scp:
        box = appliance_factory({"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                                 "routes": [{"send_to": ["pacs"]}]})
        box.config_path.write_text("destinations:\n  pacs: {ae_title: PACS, port: [\n")
        box.reload()
        wait_until(lambda: "reload refused" in box.log(), 20, lambda: "the broken file was not refused")
        kill_the_forwarder(box)
        three_are_delivered(box, scp, tmp_path / "bad-file")
        assert "died with exit code 1" not in box.log(), "the restarted forwarder failed on the file"


def test_a_forwarder_restarted_after_a_reload_keeps_the_storage_path_the_box_runs_with(appliance_factory,
                                                                                    tmp_path: Path) -> None:
    """``storage.path`` applies after a restart of the box. A forwarder started again in the
    meantime must use the receiver's database, not the new path's (where nothing is queued)."""
    with RecordingSCP("PACS") as scp:
        config = {"destinations": {"pacs": destination(scp.ae_title, scp.port)},
                  "routes": [{"send_to": ["pacs"]}]}
        box = appliance_factory(config)
        moved = yaml.safe_load(box.config_path.read_text())
        moved["storage"]["path"] = str(tmp_path / "elsewhere")
        box.config_path.write_text(yaml.safe_dump(moved, sort_keys=False))
        box.reload()
        wait_until(lambda: "storage.path changed: it applies after a restart" in box.log(), 20,
                   lambda: "the reload was not logged")
        kill_the_forwarder(box)
        three_are_delivered(box, scp, tmp_path / "moved")
        assert not (tmp_path / "elsewhere").exists(), "a process of the box used the new storage.path"


def test_kill_9_of_the_parent_leaves_no_orphan(appliance_factory, tmp_path: Path) -> None:
    box = appliance_factory({"print": {"enabled": True, "bind_address": "127.0.0.1", "port": free_port(),
                                       "printers": {"archive": {"ae_title": "ARCHIVE", "backend": "directory",
                                                                "directory": str(tmp_path / "films")}}}})
    assert box.process is not None
    wait_until(lambda: len(children(box.process.pid)) >= 2, 20,  # type: ignore[union-attr]
               lambda: f"expected the forwarder and print children: {children(box.process.pid)}")  # type: ignore[union-attr]
    tree = children(box.process.pid)
    box.kill()

    def alive() -> list[int]:
        # a zombie is dead, only not yet reaped by init
        return [c for c in tree if Path(f"/proc/{c}").exists()
                and Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == [], f"children outlived the parent: {alive()}"


def test_systemd_hears_ready_once_every_service_runs_and_stopping_at_the_end(appliance_factory,
                                                                             tmp_path: Path) -> None:
    """READY=1 (Type=notify) comes after the forwarder and the Print SCP started their services,
    with a STATUS line; STOPPING=1 on SIGTERM."""
    print_port = free_port()
    box = appliance_factory({"print": {"enabled": True, "bind_address": "127.0.0.1", "port": print_port,
                                       "printers": {"archive": {"ae_title": "ARCHIVE", "backend": "directory",
                                                                "directory": str(tmp_path / "films")}}}})
    assert box.notify is not None and box.process is not None
    ready = next(m for m in box.notify.messages if "READY=1" in m.splitlines())
    assert f"STATUS=receiving as {box.ae_title} on port {box.port}" in ready.splitlines()
    assert "ready: receiver, forwarder, print" in box.log()
    assert forwarder_pid(box.process.pid) is not None
    with socket.create_connection(("127.0.0.1", print_port), timeout=5):
        pass  # the Print SCP listens already
    box.stop()
    box.notify.wait_for("STOPPING=1", 10)


def test_a_reload_applies_the_receiver_s_timeouts_and_the_log_level(appliance_factory) -> None:
    """``node.timeouts`` apply to the associations that come after a reload, and
    ``logging.level`` at once: neither needs a restart (nor is said to)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    box = appliance_factory()
    config = yaml.safe_load(box.config_path.read_text())
    config["node"]["timeouts"] = {"network": "2s"}
    config["logging"] = {"level": "warning"}
    box.write_config(config)
    logged = box.log()
    box.reload()
    time.sleep(2)  # the main loop takes a reload within a second

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", box.port, ae_title=box.ae_title)
    assert assoc.is_established
    wait_until(lambda: not assoc.is_established, 10,
               "an idle association outlived the reloaded network timeout of 2 s")
    time.sleep(0.5)
    since = box.log()[len(logged):]
    assert "applies after a restart" not in since
    assert " INFO " not in since, f"logged at INFO after a reload to warning: {since}"


def _run_again(box: ApplianceProcess, config: Path) -> subprocess.CompletedProcess[str]:
    """``appliance run`` with ``config``, in the foreground, as a technician would type it."""
    return subprocess.run([sys.executable, "-m", "appliance", "run", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})


def test_a_second_run_on_the_data_directory_of_a_running_box_refuses_and_touches_nothing(appliance_factory,
                                                                                       tmp_path: Path) -> None:
    """While a box runs, `appliance run` on its data directory (here on another port) would
    clear what it takes for an interrupted run's leftovers: the running box's receptions in
    progress (in incoming/) and files it has just cached and not yet indexed. It refuses, says
    why, and removes nothing; the running box goes on."""
    box = appliance_factory({})
    in_progress = box.data / "incoming" / "rx-receiving.dcm"
    admitted = box.data / "cache" / "1.2.3" / "1.2.3.4.abcdef012345.0123456789ab.dcm"
    admitted.parent.mkdir(parents=True, exist_ok=True)
    for path in (in_progress, admitted):
        path.write_bytes(b"\0" * 132)
    other = yaml.safe_load(box.config_path.read_text())
    other["node"]["port"] = free_port()
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(other))
    result = _run_again(box, second)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"another appliance (pid {box.process.pid}) is running on the data directory" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert in_progress.exists() and admitted.exists()
    assert box.process.poll() is None
    box.stop()
    box.start()  # the lock went with the first box
    assert not in_progress.exists() and not admitted.exists()  # leftovers of a stopped run: cleared


def test_a_port_in_use_is_one_line_in_the_journal_and_exit_status_1(tmp_path: Path) -> None:
    """A port another program listens on: one clear line, no traceback, nothing left running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        box = ApplianceProcess(tmp_path / "box", {})
        config = yaml.safe_load(box.config_path.read_text())
        config["node"]["port"] = taken.getsockname()[1]
        box.write_config(config)
        result = _run_again(box, box.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1 port {config['node']['port']}: Address already in use" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_start_up_clears_leftovers_only_once_an_import_in_progress_has_finished(appliance_factory,
                                                                                 tmp_path: Path) -> None:
    """`appliance send` is importing (here: this test holds the lock an import holds, with the
    import's copy in incoming/) when the box starts: start-up waits for that import before it
    clears what an interrupted run left, so that the copy is not removed under it."""
    box = appliance_factory({}, start=False)
    store = Store(box.data)
    copy = box.data / "incoming" / "tmp-import.dcm"
    with store.importing():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(b"\0" * 132)
        box.start(wait=False)
        time.sleep(1.5)
        assert copy.exists(), "start-up cleared incoming/ while an import was in progress"
        assert box.process is not None and box.process.poll() is None
    assert box.notify is not None
    box.notify.wait_for("READY=1", 60, box.process)
    assert not copy.exists()


def test_the_data_directory_lock_made_by_another_user_is_still_taken(tmp_path: Path) -> None:
    """run.lock left by a run as root (read-only to the service's user): the service's own
    start takes the lock all the same, and a second run is still refused. (A child of this
    process becomes another user: the Python it runs may be where that user cannot read.)"""
    from appliance.app import StartupError, hold_data_directory

    if os.geteuid() != 0:
        raise AssertionError("this test runs as root (as CI does): it needs a second user")
    # Where the other user can reach it (pytest's own directories are root's alone).
    data = Path(tempfile.mkdtemp(prefix="run-lock-", dir="/tmp"))
    cleanup = ExitStack()
    cleanup.callback(shutil.rmtree, data, True)
    (data / "run.lock").write_text("1\n")
    os.chmod(data, 0o777)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        outcome = "?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            hold_data_directory(data)
            try:
                hold_data_directory(data)
                outcome = "held twice"
            except StartupError:
                outcome = "held, and refused a second"
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the parent reports it
            outcome = f"failed: {exc!r}"
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with cleanup, os.fdopen(read) as reported:
        assert reported.read() == "held, and refused a second"


def test_a_box_started_with_a_broken_file_runs_on_the_last_good_one_until_it_is_mended(tmp_path: Path) -> None:
    """The file saved with a slip (here: cut short, as a FAT boot partition pulled out of a
    laptop too soon leaves it), then a power cut. The box starts with the last configuration
    that was valid — same port, AE title, destinations — says so in the journal and in
    systemd's status line, receives and forwards; a reload of the mended file takes it."""
    state = tmp_path / "state"
    with RecordingSCP("CENTRAL") as scp:
        box = ApplianceProcess(tmp_path / "box", {"destinations": {"central": destination("CENTRAL", scp.port)},
                                                  "routes": [{"send_to": ["central"]}]},
                               env={"APPLIANCE_STATE_DIR": str(state)}).start()
        try:
            good = box.config_path.read_text()
            assert (state / "last-good.yaml").read_text() == good
            box.kill()  # the power cut, after a broken save
            box.config_path.write_text(good[: good.index("destinations:") + len("destinations:\n  cen")])
            box.start()
            assert box.notify is not None
            ready = next(m for m in box.notify.messages if "READY=1" in m.splitlines())
            assert "HAS ERRORS: running with the last valid configuration" in ready, ready
            log = box.log()
            assert re.search(r"ERROR .*appliance\.yaml:\d+:\d+: ", log), log[-3000:]
            assert "running with the last configuration that was valid" in log, log[-3000:]
            assert (state / "last-good.yaml").read_text() == good  # a broken file is never kept
            three_are_delivered(box, scp, tmp_path / "during")

            mended = yaml.safe_load(good)
            mended["node"]["ae_title"] = "MENDED"
            box.write_config(mended)
            box.reload()
            wait_until(lambda: "configuration reloaded" in box.log(), 20, lambda: box.log()[-2000:])
            assert "ae_title: MENDED" in (state / "last-good.yaml").read_text()
        finally:
            box.stop()


def test_without_a_last_good_copy_a_broken_file_stops_the_start(tmp_path: Path) -> None:
    box = ApplianceProcess(tmp_path / "box", env={"APPLIANCE_STATE_DIR": str(tmp_path / "state")})
    box.config_path.write_text("node:\n  port: [\n")
    box.start(wait=False)
    assert box.process is not None and box.process.wait(timeout=30) == 1
    assert "appliance.yaml:" in box.log() and "last configuration" not in box.log()
