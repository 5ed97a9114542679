"""``appliance run``: start the services a configuration enables, tell systemd, reload on SIGHUP,
stop cleanly on SIGTERM or Ctrl-C.

The Storage SCP (receiver) runs in this process. The forwarder and, when ``print.enabled``,
the Print SCP each run in a child process of their own:

* a fault in one (a hung printer library, a decoder crash) stops neither intake nor the others,
  and this process restarts a child that died;
* Python runs one thread at a time per process: sharing one would make the forwarder's sends
  and a film's rendering take the receiver's CPU (measured: intake slowed by 60 % while
  forwarding on 2 cores).

The SQLite database (WAL) is their shared record; intake nudges the forwarder when it queues
work (``wakeup.py``), and children also look at it every so often. systemd hears READY=1 once
every child has started its service (or after ``_CHILD_READY_SECONDS``): the receiver takes
images from the first moment, and they wait in the queue until the forwarder is up. Each
child dies with this process (PR_SET_PDEATHSIG), so a power cut of the parent is one of the
whole box, as systemd's KillMode=mixed would also make it.

On SIGHUP this process reads the file; an invalid one changes nothing anywhere. A valid one is
handed to the children as text: they never read the file themselves, so a child started again
later runs what the box runs, even when the file has been broken since. Settings bound to a
socket or the data directory (``_NEEDS_RESTART``) keep, in every process, the values the box
started with until it is restarted: a forwarder started again must use the receiver's database.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import logging
import multiprocessing
import os
import queue
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from . import lastgood, system
from .config import Config, ConfigError, load, loads
from .db import open_database
from .receiver import Receiver
from .store import Store

log = logging.getLogger(__name__)

# Settings that are bound to a listening socket or the data directory, and the Print SCP's
# (its service is built once): a reload cannot change them. None: every key of the section.
_NEEDS_RESTART: list[tuple[str, str | None]] = [
    ("node", "ae_title"), ("node", "bind_address"), ("node", "port"), ("node", "max_pdu"),
    ("node", "max_associations"), ("storage", "path"), ("print", None),
]
_CHILD_STOP_SECONDS = 40.0
_RESTART_DELAY = 2.0
# A child that keeps dying soon after its start (a full disk it cannot record on, a corrupt
# file it reads at start) is restarted after a pause that doubles each time, up to this: a
# crash loop must not fill the journal, on the very disk that may be full.
_RESTART_DELAY_MAX = 300.0
_STABLE_SECONDS = 600.0  # a child that ran this long died for a new reason: restart it soon
# How long start-up waits for the children to start their services before it tells systemd it
# is ready anyway (intake works without them; the journal says which one is late).
_CHILD_READY_SECONDS = 30.0


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def load_or_log(path: Path) -> Config | None:
    """The new configuration, or None (with every problem logged) when it is invalid."""
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, keeping the running configuration: %s", problem)
        return None
    except Exception:  # noqa: BLE001 - a reader's bug must not take the running box down
        log.exception("reload refused, keeping the running configuration: %s could not be read", path)
        return None


def _restart_only(config: Config) -> dict[str, dict[str, Any]]:
    """The settings of ``config`` that apply only after a restart, by section and key."""
    settings: dict[str, dict[str, Any]] = {}
    for section, key in _NEEDS_RESTART:
        values = getattr(config, section)
        keys = [f.name for f in dataclasses.fields(values)] if key is None else [key]
        settings.setdefault(section, {}).update((k, getattr(values, k)) for k in keys)
    return settings


def warn_restart_needed(old: Config, new: Config) -> None:
    before = _restart_only(old)
    for section, values in _restart_only(new).items():
        for key, value in values.items():
            if value != before[section][key]:
                log.warning("%s.%s changed: it applies after a restart", section, key)


def keeping_restart_only(running: Config, new: Config) -> Config:
    """``new``, with the settings that apply only after a restart as ``running`` has them."""
    sections = {section: dataclasses.replace(getattr(new, section), **values)
                for section, values in _restart_only(running).items()}
    return dataclasses.replace(new, **sections)


def _config_of(text: str, config_path: str, base_dir: str, startup: Config | None = None) -> Config:
    """A configuration text the main process validated, read as it read it (a relative
    ``storage.path`` from ``base_dir``, the file's directory when the box started); with
    ``startup``, keeping the box's restart-only settings."""
    config = loads(text, config_path, base_dir=Path(base_dir))
    return config if startup is None else keeping_restart_only(startup, config)


# ---- child processes ----------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)


def _make_service(name: str, config: Config) -> Service:
    db = open_database(config.storage.root)
    if name == "forwarder":
        from .forwarder import Forwarder

        return Forwarder(config, db, Store(config.storage.root))
    from .printing.service import PrintService

    # storage.disk.min_free is the print spool's floor too: a film must not take the room kept
    # for receiving images and for the database.
    # node.timeouts are the print associations' too: a silent peer gives its slot back after them.
    return PrintService(config.print, config.storage.root, db=db, min_free=config.storage.disk.min_free,
                        timeouts=config.node.timeouts)


def service_main(name: str, config_path: str, base_dir: str, startup_text: str, text: str, updates: Any,
                 parent: int, ready: Any = None) -> None:
    """Entry point of a child process: run one service until SIGTERM. ``startup_text`` is the
    configuration the box started with, ``text`` the one it runs now; ``updates`` (a
    multiprocessing Queue) brings the texts of later reloads. ``ready`` (a multiprocessing
    Event) is set once the service has started."""
    _die_with_parent(parent)
    startup = _config_of(startup_text, config_path, base_dir)
    config = _config_of(text, config_path, base_dir, startup)
    system.setup_logging(config.logging.level)
    signals = system.Signals()
    signals.install()  # SIGHUP is for the main process; the reload it accepts comes in `updates`
    service = _make_service(name, config)
    service.start()
    if ready is not None:
        ready.set()

    def take_updates() -> None:
        nonlocal config
        newest = None
        while True:
            try:
                newest = updates.get_nowait()
            except queue.Empty:
                break
        if newest is None:
            return
        previous, config = config, _config_of(newest, config_path, base_dir, startup)
        if config.logging.level != previous.logging.level:
            system.setup_logging(config.logging.level)
        apply = getattr(service, "apply", None)
        if apply is not None:
            apply(config)
        log.info("%s: configuration reloaded from %s", name, config_path)

    try:
        while not signals.wait(1.0, lambda: None):
            take_updates()
            failure = getattr(service, "failure", None)
            if failure:  # a thread of the service failed: exit, and the main process starts it again
                log.critical("%s: %s; exiting, to be started again", name, failure)
                raise SystemExit(70)
    finally:
        service.stop()


class Child:
    """One service in its own process, restarted when it dies."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config_path = config.source
        # Read again in a child started later, the file's directory might be another by then
        # (a symlink repointed): a relative storage.path must stay the box's.
        self.base_dir = str(Path(config.source).resolve().parent)
        self.startup_text = config.text  # its restart-only settings stay until the box restarts
        self.text = config.text  # the configuration the box runs now
        self.updates: Any = None  # a multiprocessing Queue: reloads, to the running child
        self.process: BaseProcess | None = None
        self.died_at: float | None = None
        self.started_at = 0.0  # monotonic
        self.restart_delay = _RESTART_DELAY
        self.ready: Any = None  # a multiprocessing Event, set by the child when its service runs

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.ready = context.Event()
        if self.updates is not None:
            self.updates.cancel_join_thread()  # nobody reads what a dead child was not given
        self.updates = context.Queue()
        self.process = context.Process(target=service_main, name=f"appliance-{self.name}",
                                       args=(self.name, self.config_path, self.base_dir, self.startup_text,
                                             self.text, self.updates, os.getpid(), self.ready))
        self.process.start()
        self.died_at = None
        self.started_at = time.monotonic()
        log.info("%s started (pid %s)", self.name, self.process.pid)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready is not None and bool(self.ready.wait(timeout))

    def supervise(self) -> None:
        """Restart the child if it died (after a short pause, so a crash loop stays slow)."""
        if self.process is None or self.process.is_alive():
            return
        now = time.monotonic()
        if self.died_at is None:
            self.died_at = now
            if now - self.started_at >= _STABLE_SECONDS:
                self.restart_delay = _RESTART_DELAY
            log.error("%s (pid %s) died with exit code %s; restarting it in %.0f s", self.name, self.process.pid,
                      self.process.exitcode, self.restart_delay)
        elif now - self.died_at >= self.restart_delay:
            self.restart_delay = min(self.restart_delay * 2, _RESTART_DELAY_MAX)
            self.start()

    def update(self, config: Config) -> None:
        """Hand a reloaded configuration to the child (and to the child started after it)."""
        self.text = config.text
        self.updates.put(config.text)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.is_alive() and self.process.pid:
            os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        self.process.join(_CHILD_STOP_SECONDS)
        if self.process.is_alive():
            log.warning("%s did not stop in %.0f s; killing it", self.name, _CHILD_STOP_SECONDS)
            self.process.kill()
            self.process.join()


# ---- the box ------------------------------------------------------------------------------------

class StartupError(Exception):
    """The box cannot start; the message says why, in one line of the journal."""


def hold_data_directory(root: Path) -> int:
    """Take the data directory for this process (an exclusive lock on ``run.lock`` in it, held
    until it exits; the file says its pid), before anything there is touched. Start-up clears
    what an interrupted run left (partial receives, unindexed cache files): a second `appliance
    run` on a directory a running box uses — a technician typing it while the service runs —
    would take that box's receptions in progress, and files it has just admitted and is about
    to acknowledge, for leftovers and delete them. Returns the lock's file descriptor."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.lock"
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
    except PermissionError:  # another user's (a run as root once): flock needs only to read it
        fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StartupError(f"another appliance{f' (pid {holder})' if holder.isdigit() else ''} is running on the"
                           f" data directory {root}: not starting") from None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Appliance:
    """The running box: its configuration, cache, receiver and child services."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.store = Store(config.storage.root)
        self.receiver: Receiver | None = None
        self.children: list[Child] = []
        self._lock: int | None = None

    def start(self) -> None:
        """Raises StartupError (before it touches the data directory, if another box uses it)."""
        self._lock = hold_data_directory(self.config.storage.root)
        with self.store.clearing():
            self.store.prepare()
            db = open_database(self.config.storage.root)
            moved = db.relocate(self.store.cache)
            if moved:
                log.warning("%d cached instance(s) were recorded under another path of the data directory; they are"
                            " now read from %s", moved, self.store.cache)
            removed = self.store.recover(db.cached_paths())
        if removed:
            log.warning("removed %d unindexed cache file(s): interrupted receives, never acknowledged", removed)
        # Children first: they are spawned before this process has the receiver's threads.
        self.children = [Child("forwarder", self.config)]
        if self.config.print.enabled:
            self.children.append(Child("print", self.config))
        for child in self.children:
            child.start()
        self.receiver = Receiver(self.config, db, self.store)
        try:
            self.receiver.start()
        except OSError as exc:
            node = self.config.node
            raise StartupError(f"cannot listen on {node.bind_address} port {node.port}: "
                               f"{exc.strerror or exc}") from exc
        deadline = time.monotonic() + _CHILD_READY_SECONDS
        late = [c.name for c in self.children if not c.wait_ready(max(0.0, deadline - time.monotonic()))]
        if late:
            log.error("%s not started after %.0f s; receiving anyway", ", ".join(late), _CHILD_READY_SECONDS)
        else:
            log.info("ready: %s", ", ".join(["receiver", *(c.name for c in self.children)]))

    def supervise(self) -> None:
        for child in self.children:
            child.supervise()

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()  # no new work first; then the services that drain it
            self.receiver.intake.db.close()
        for child in self.children:
            child.stop()
        if self._lock is not None:
            os.close(self._lock)  # the data directory is free for the next run
            self._lock = None

    def reload(self) -> bool:
        """Apply a new configuration file to new work; an invalid one changes nothing."""
        new = load_or_log(self.config_path)
        if new is None:
            return False
        warn_restart_needed(self.config, new)
        for advice in new.advice:
            log.warning("%s", advice.as_warning())
        if new.logging.level != self.config.logging.level:
            system.setup_logging(new.logging.level)
        self.config = keeping_restart_only(self.config, new)
        if self.receiver is not None:
            self.receiver.config = self.config
        for child in self.children:
            child.update(new)
        log.info("configuration reloaded from %s", self.config_path)
        lastgood.keep(new)
        system.notify(f"STATUS=receiving as {self.config.node.ae_title} on port {self.config.node.port}")
        return True


def run(config_path: Path) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    broken = ""
    try:
        config = load(config_path)
    except ConfigError as exc:
        system.setup_logging()
        for problem in exc.problems:
            log.error("%s", problem)
        last_good = lastgood.load_last_good(config_path)
        if last_good is None:
            return 1
        config, kept_at = last_good
        log.error("%s cannot be used (above): running with the last configuration that was valid, kept %s;"
                  " mend the file, then reload (systemctl reload appliance)", config_path,
                  lastgood.describe_age(kept_at))
        broken = f"; {config_path.name} HAS ERRORS: running with the last valid configuration"
    else:
        lastgood.keep(config)
    system.setup_logging(config.logging.level)
    for advice in config.advice:
        log.warning("%s", advice.as_warning())
    signals = system.Signals()
    signals.install()
    appliance = Appliance(config, config_path)
    try:
        appliance.start()
    except StartupError as exc:
        log.error("%s", exc)
        appliance.stop()
        return 1
    system.notify(f"READY=1\nSTATUS=receiving as {config.node.ae_title} on port {config.node.port}{broken}")
    watchdog = system.watchdog_interval()
    try:
        while not signals.wait(min(watchdog or 1.0, 1.0), appliance.reload):
            appliance.supervise()
            if watchdog:
                system.notify("WATCHDOG=1")
    finally:
        system.notify("STOPPING=1")
        log.info("stopping")
        appliance.stop()
    return 0
