"""``appliance run``: start the services a configuration enables, tell systemd, reload on SIGHUP,
stop cleanly on SIGTERM or Ctrl-C.

Services: the forwarder and the Storage SCP (receiver) always; the Print SCP when
``print.enabled``. Each is an
object with ``start()`` and ``stop()``; this module only wires them to the configuration and to
the host (``system``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from . import system
from .config import Config, ConfigError, load
from .db import Database, open_database
from .forwarder import Forwarder
from .receiver import Receiver
from .store import Store

log = logging.getLogger(__name__)

# Settings that are bound to a listening socket or an open file: a reload cannot change them.
_NEEDS_RESTART = [
    ("node", "ae_title"), ("node", "bind_address"), ("node", "port"), ("node", "max_pdu"),
    ("node", "max_associations"), ("storage", "path"),
]


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Appliance:
    """The running box: its configuration, database, cache and services."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.storage.root)
        self.db: Database | None = None
        self.receiver: Receiver | None = None
        self.forwarder: Forwarder | None = None
        self.services: list[Service] = []

    def start(self) -> None:
        self.store.prepare()
        self.db = open_database(self.config.storage.root)
        removed = self.store.recover(self.db.cached_paths())
        if removed:
            log.warning("removed %d unindexed cache file(s): interrupted receives, never acknowledged", removed)
        self.forwarder = Forwarder(self.config, self.db, self.store)
        self.db.on_queued.append(self.forwarder.wake)
        self.forwarder.start()
        self.receiver = Receiver(self.config, self.db, self.store)
        self.receiver.start()
        self.services = [self.forwarder, self.receiver]
        if getattr(self.config.print, "enabled", False):
            from .printing.service import PrintService

            printer = PrintService(self.config.print, self.config.storage.root, db=self.db)
            printer.start()
            self.services.append(printer)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services = []
        if self.db is not None:
            self.db.close()

    def reload(self, path: Path) -> bool:
        """Apply a new configuration file to new work; an invalid one changes nothing."""
        try:
            new = load(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running configuration: %s", problem)
            return False
        for section, key in _NEEDS_RESTART:
            old_value = getattr(getattr(self.config, section), key)
            new_value = getattr(getattr(new, section), key)
            if old_value != new_value:
                log.warning("%s.%s changed (%r -> %r): it applies after a restart", section, key, old_value, new_value)
        self.config = new
        if self.receiver is not None:
            self.receiver.config = new
        if self.forwarder is not None:
            self.forwarder.apply(new)
        log.info("configuration reloaded from %s", path)
        return True


def run(config_path: Path) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    try:
        config = load(config_path)
    except ConfigError as exc:
        system.setup_logging()
        for problem in exc.problems:
            log.error("%s", problem)
        return 1
    system.setup_logging(config.logging.level)
    signals = system.Signals()
    signals.install()
    appliance = Appliance(config)
    appliance.start()
    system.notify(f"READY=1\nSTATUS=receiving as {config.node.ae_title} on port {config.node.port}")
    watchdog = system.watchdog_interval()
    try:
        while not signals.wait(watchdog or 1.0, lambda: appliance.reload(config_path)):
            if watchdog:
                system.notify("WATCHDOG=1")
    finally:
        system.notify("STOPPING=1")
        log.info("stopping")
        appliance.stop()
    return 0
