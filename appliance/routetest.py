"""``appliance route-test``: explain what the rules would do with some DICOM files.

Reads each file given (the only I/O on the rule engine's side), asks ``rules`` to evaluate the
configured routes against it, and returns the report: every rule tried, each condition with the
value it saw, the actions, and the destinations and tag edits that would apply. Nothing is
sent and nothing is recorded.

A file is read as ``appliance send`` reads it (``diskfile``: a bare data set is given the file
meta send would write; a truncated file or a DICOMDIR is refused with send's reason) and its
header as intake reads it (the same elements, with the same reader), so that the report is the
decision the running appliance takes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .config import Config
from .diskfile import NotImportable, part10_file
from .intake import UNREADABLE, read_for_routing
from .rules import Origin, OriginLike, evaluate, explain


@dataclass(frozen=True)
class Report:
    """What route-test prints, and the files it could not read (each named in ``text``)."""

    text: str
    unreadable: tuple[str, ...] = ()


def route_test(paths: Iterable[str | Path], config: Config, origin: OriginLike | None = None) -> Report:
    """The report for each file, in order; a file that cannot be read says why and the rest go on."""
    origin = origin or Origin()
    given = [f"{k} {v}" for k, v in (("calling_ae", origin.calling_ae), ("called_ae", origin.called_ae),
                                     ("source_ip", origin.source_ip)) if v]
    arrival = ", ".join(given) if given else "no calling_ae, called_ae or source_ip given"
    out: list[str] = []
    unreadable: list[str] = []
    if not config.routes:
        out.append("no routes are configured: every instance would be kept as unrouted")
    with tempfile.TemporaryDirectory(prefix="route-test-") as scratch:
        for path in paths:
            try:
                dataset = _read(Path(path), config, Path(scratch))
            except NotImportable as exc:
                problem = str(exc)
            except OSError as exc:
                problem = exc.strerror or str(exc)
            except UNREADABLE as exc:
                problem = f"cannot read its data set: {exc}"
            else:
                sop_uid = dataset.get("SOPInstanceUID", "")
                out.append(f"{path}: SOPInstanceUID {sop_uid or '(none)'}; {arrival}")
                evaluation = evaluate(config.routes, dataset, origin)
                out.extend("  " + line for line in explain(evaluation, config.routes))
                out.append("")
                continue
            unreadable.append(str(path))
            out.append(f"{path}: cannot route it: {problem}")
            out.append("")
    return Report("\n".join(out).rstrip("\n") + "\n", tuple(unreadable))


def _read(path: Path, config: Config, scratch: Path) -> pydicom.Dataset:
    """The header the rules would see had ``appliance send`` imported ``path``."""
    readable = part10_file(path, path.name, scratch)
    try:
        return read_for_routing(readable, config)
    finally:
        if readable != path:
            readable.unlink()
