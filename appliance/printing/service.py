"""The print service: the Print SCP, the spool worker and the printer-state probes, started
and stopped together (``PrintService(config.print, config.storage.root).start()``)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Timeouts
from ..db import Database, open_database
from ..valuetypes import Space
from .backends import CachedState, PrinterState, make_backend
from .model import PrintRequest
from .scp import PrintSCP
from .settings import PrintConfig
from .spool import Spool, SpoolWorker

LOG = logging.getLogger(__name__)


class PrintService:
    """``root`` is the appliance's data directory (``storage.path``); the spool is ``root/print``.
    Pass the process's ``db`` to share its single writer; otherwise one is opened on ``root``.
    ``port`` overrides ``config.port`` (0 = any free port, for tests). ``min_free``
    (storage.disk.min_free) is the free space a print job may not take. ``timeouts`` are the
    associations' (``node.timeouts``, as the Storage SCP's; their defaults when not given)."""

    def __init__(self, config: PrintConfig, root: Path, db: Database | None = None, port: int | None = None,
                 min_free: Space | None = None, timeouts: Timeouts | None = None) -> None:
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.root = Path(root)
        self.min_free = min_free
        self._own_db = db is None
        self.db = db
        self._port = port
        self.backends = {name: make_backend(printer) for name, printer in config.printers.items()}
        self.states = {name: CachedState(backend) for name, backend in self.backends.items()}
        self.spool: Spool | None = None
        self.workers: list[SpoolWorker] = []
        self.scp: PrintSCP | None = None

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else (self._port or self.config.port)

    def printer_state(self, name: str) -> PrinterState:
        return self.states[name].get()

    def _submit(self, request: PrintRequest, printer_name: str, calling_ae: str) -> int:
        assert self.spool is not None
        return self.spool.submit(request, printer_name, calling_ae)

    def start(self) -> None:
        if self.db is None:
            self.db = open_database(self.root)
        self.spool = Spool(self.db, self.root / "print", self.config.printers, self.backends, self.min_free)
        self.spool.recover()
        self.workers = [SpoolWorker(self.spool, name, self.config.keep_printed_for) for name in self.backends]
        for worker in self.workers:
            worker.start()
        self.scp = PrintSCP(self.config, self._submit, self.printer_state, port=self._port, timeouts=self.timeouts)
        self.scp.start()

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        for worker in self.workers:
            worker.stop()
        self.workers = []
        if self._own_db and self.db is not None:
            self.db.close()
            self.db = None
