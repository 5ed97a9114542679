"""A clinic's DNS for the appliance under test, that a test can take down and bring back, as a
VPN that leads to it goes down and comes back: an LD_PRELOAD library (``dns.c``), built here with
the C compiler that the setup installs. No query leaves the machine: listed names resolve to
127.0.0.1 addresses, and others go to the real resolver (the tests use none)."""

from __future__ import annotations

import os
from pathlib import Path

from ..peers import build_preload_library

SOURCE = Path(__file__).with_name("dns.c")


class Resolver:
    """The hosts file and the environment that makes a process (and its children) use it."""

    def __init__(self, workdir: Path, hosts: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.library = build_preload_library(SOURCE, workdir / "resolver.so", "-ldl")
        self.file = workdir / "resolver-hosts"
        self.hosts = dict(hosts)
        self.up = True
        self._write()

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "RESOLVER_HOSTS_FILE": str(self.file)}

    def set_up(self, up: bool) -> None:
        self.up = up
        self._write()

    def _write(self) -> None:
        lines = ["up" if self.up else "down", *(f"{name} {address}" for name, address in self.hosts.items())]
        temp = self.file.with_suffix(".new")
        temp.write_text("\n".join(lines) + "\n")
        os.replace(temp, self.file)
