"""``appliance route-test``: explain what the rules would do with some DICOM files.

Reads each file given (the only I/O on the rule engine's side), asks ``rules`` to evaluate the
configured routes against it, and returns the report: every rule tried, each condition with the
value it saw, the actions, and the destinations and tag edits that would apply. Nothing is
sent and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .config import Config
from .rules import Origin, OriginLike, evaluate, explain


def route_test(paths: Iterable[str | Path], config: Config, origin: OriginLike | None = None) -> str:
    """The report for each file, in order; a file that cannot be read says so and the rest go on."""
    origin = origin or Origin()
    given = [f"{k} {v}" for k, v in (("calling_ae", origin.calling_ae), ("called_ae", origin.called_ae),
                                     ("source_ip", origin.source_ip)) if v]
    arrival = ", ".join(given) if given else "no calling_ae, called_ae or source_ip given"
    out: list[str] = []
    if not config.routes:
        out.append("no routes are configured: every instance would be kept as unrouted")
    for path in paths:
        try:
            # Routing reads only the header, as the receiver does.
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, OverflowError) as exc:
            out.append(f"{path}: cannot read it as DICOM: {exc}")
            out.append("")
            continue
        sop_uid = dataset.get("SOPInstanceUID", "")
        out.append(f"{path}: SOPInstanceUID {sop_uid or '(none)'}; {arrival}")
        evaluation = evaluate(config.routes, dataset, origin)
        out.extend("  " + line for line in explain(evaluation, config.routes))
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
