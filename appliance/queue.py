"""What the CLI shows and does with the forwarding queues: ``appliance queue`` and
``appliance send`` (import files from disk as if a modality had sent them)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from .config import Config
from .db import open_database
from .intake import Intake
from .rules import Origin
from .store import Store


def queue_report(config: Config, as_json: bool = False, dead: int = 0) -> str:
    """The queues, as ``appliance queue`` prints them; with ``dead``, that many of the most
    recent dead letters too, each with its instance and why."""
    db = open_database(config.storage.root)
    try:
        summaries = db.queue_summaries(list(config.destinations))
        holds = db.holds()
        unrouted = db.count_unrouted()
        now = db.schedule_now()  # holds are kept on the schedule clock (clock.py)
        release_walls = [db.wall_time_of(h["release_at"]) for h in holds]
        dead_total, dead_rows = db.dead_letters(dead) if dead else (0, [])
    finally:
        db.close()
    letters = [{"destination": r["destination"], "sop_instance_uid": r["sop_instance_uid"],
                "study_instance_uid": r["study_instance_uid"], "patient_name": r["patient_name"],
                "patient_id": r["patient_id"], "study_date": r["study_date"], "modality": r["modality"],
                "attempts": r["attempts"], "last_attempt_at": r["at"], "status": r["status"], "error": r["error"]}
               for r in dead_rows]
    # A destination taken out of the configuration (or renamed) keeps its deliveries: they
    # go out if it comes back, and ``appliance retry NAME`` still works, so it stays listed.
    configured = {s.name: s.name in config.destinations for s in summaries}
    if as_json:
        return json.dumps({
            "destinations": [{**s.__dict__, "configured": configured[s.name]} for s in summaries],
            "holds": [{"study_instance_uid": h["study_instance_uid"], "destination": h["destination"],
                       "release_at": wall, "releases_in": max(0.0, h["release_at"] - now), "state": h["state"],
                       "patient_name": h["patient_name"], "patient_id": h["patient_id"], "held": h["held"]}
                      for h, wall in zip(holds, release_walls, strict=True)],
            "unrouted": unrouted,
            **({"dead_letters": letters, "dead_letters_total": dead_total} if dead else {}),
        }, indent=2)
    lines = [f"{'DESTINATION':<16} {'PENDING':>8} {'HELD':>6} {'FLIGHT':>6} {'DELIVERED':>10} {'DEAD':>6}"
             f" {'OLDEST':>8}  LAST ERROR"]
    for s in summaries:
        age = _age(s.oldest_pending_age) if s.oldest_pending_age is not None else "-"
        last_error = s.last_error or "-"
        if s.last_error_at is not None:
            last_error = f"{last_error} ({_age(max(0.0, time.time() - s.last_error_at))} ago)"
        if not configured[s.name]:
            last_error = f"(not configured) {last_error}"
        lines.append(f"{s.name:<16} {s.pending:>8} {s.held:>6} {s.in_flight:>6} {s.delivered:>10} {s.dead:>6}"
                     f" {age:>8}  {last_error}")
    if not all(configured.values()):
        lines.append("(not configured): no longer in the configuration; its items wait until a destination of "
                     "that name is configured again")
    waiting = [h for h in holds if h["state"] == "waiting"]
    if waiting:
        lines.append("")
        lines.append("studies waiting to become stable:")
        for h in waiting:
            lines.append(f"  {h['patient_name'] or '-'} ({h['patient_id'] or '-'}), {h['held']} instance(s) of"
                         f" {h['study_instance_uid']} -> {h['destination']}: releases in "
                         f"{_age(max(0.0, h['release_at'] - now))}")
    lines.append(f"\n{unrouted} unrouted instance(s) in the cache (matched no rule that sends them anywhere)")
    if dead:
        lines.append("")
        shown = f"the {len(letters)} most recent of {dead_total}" if dead_total > len(letters) else f"{dead_total}"
        lines.append(f"dead letters ({shown}; `appliance retry DESTINATION` puts them back in the queue):")
        for letter in letters:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(letter["last_attempt_at"])) \
                if letter["last_attempt_at"] else "-"
            status = f"0x{letter['status']:04X}" if letter["status"] is not None else "-"
            patient = f"{letter['patient_name'] or '-'} ({letter['patient_id'] or '-'})"
            lines.append(f"  {when}  {letter['destination']}  {patient}  {letter['modality'] or '-'}"
                         f"  {letter['sop_instance_uid']}  {status}: {letter['error'] or 'failed'}"
                         f" ({letter['attempts']} attempt(s))")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def import_files(config: Config, paths: Sequence[Path], only_to: str | None = None, calling_ae: str = "IMPORT",
                 reading: Callable[[], AbstractContextManager[object]] = nullcontext) -> tuple[int, int]:
    """Copy each file into the cache (durably) and route it, or queue it for ``only_to``.
    ``paths`` are listed and opened within ``reading()`` (as the user who ran the command,
    when it acts as the data directory's owner otherwise). A progress bar goes to stderr;
    returns (imported, skipped)."""
    store = Store(config.storage.root)
    for directory in (store.root, store.incoming, store.cache):
        directory.mkdir(parents=True, exist_ok=True)
    db = open_database(config.storage.root)
    intake = Intake(config, db, store)
    origin = Origin(calling_ae=calling_ae, called_ae=config.node.ae_title, source_ip="")
    with reading():
        files = list(_files(paths))
    imported = skipped = 0
    try:
        for number, path in enumerate(files, start=1):
            with store.importing():
                detail = _import_one(intake, store, path, origin, only_to, reading)
            if detail is None:
                imported += 1
            else:
                skipped += 1
                print(f"{_BAR_START if sys.stderr.isatty() else ''}skipped {path}: {detail}", file=sys.stderr)
            _progress(number, len(files))
    finally:
        db.close()
    if files:
        print(file=sys.stderr)
    return imported, skipped


def _import_one(intake: Intake, store: Store, path: Path, origin: Origin, only_to: str | None,
                reading: Callable[[], AbstractContextManager[object]]) -> str | None:
    """Copy one file into ``incoming/`` and admit it; None if it is now in the cache, else why
    not. A file that cannot be read or copied (missing, unreadable, a full disk) is skipped
    like one that is not DICOM, or not whole: the rest of the import goes on."""
    from .diskfile import NotImportable, part10_file  # it loads pynetdicom, which `appliance queue` does without

    try:
        fd, temp = tempfile.mkstemp(dir=store.incoming, suffix=".dcm")
    except OSError as exc:
        return f"cannot create a file in {store.incoming}: {exc}"
    os.close(fd)
    admitted: Path | None = None
    try:
        try:
            with reading():
                source = open(path, "rb")  # noqa: SIM115 - as whoever ran the command; closed below
        except OSError as exc:
            return f"cannot read it: {exc.strerror or exc}"
        try:
            with source, open(temp, "wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
        except OSError as exc:
            return f"cannot copy it into {store.incoming}: {exc}"
        # The copy is what is checked and cached: the original may change while we look.
        try:
            admitted = part10_file(Path(temp), path.name)
        except NotImportable as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read it back from {store.incoming}: {exc}"
        outcome = intake.admit(admitted, origin, only_to=only_to)
        return None if outcome.acknowledged else outcome.detail
    finally:
        for leftover in (Path(temp), admitted):  # the admitted one has gone into the cache if stored
            if leftover is not None:
                leftover.unlink(missing_ok=True)


_BAR_START = "\r"  # back over the progress bar, on a terminal


def _progress(done: int, total: int) -> None:
    """A bar redrawn in place on a terminal; to a file or a pipe, nothing but the end."""
    if not sys.stderr.isatty():
        if done == total:
            print(f"{done}/{total} done", end="", file=sys.stderr)
        return
    width = 30
    filled = width * done // max(1, total)
    print(f"{_BAR_START}[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)
