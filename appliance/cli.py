"""The ``appliance`` command. Each subcommand is a small function that calls one module;
add one by writing ``cmd_<name>(args)`` and registering its arguments in ``_parser()``.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # the commands import what they use when they run: `appliance queue` starts fast
    from .config import Config

DEFAULT_CONFIG = "/etc/appliance/appliance.yaml"


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("APPLIANCE_CONFIG") or DEFAULT_CONFIG)


def _load_or_exit(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .config import ConfigError, load

    try:
        return load(_config_path(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc


def _unknown_destination(config: Config, name: str) -> int:
    """Say that ``name`` is no destination of ``config``; the exit status for it."""
    print(f'unknown destination "{name}" (destinations: {", ".join(config.destinations) or "none"})', file=sys.stderr)
    return 2


def _as_data_owner(root: Path, for_good: bool = True) -> Callable[[], AbstractContextManager[object]]:
    """Run as root against a data directory that another user owns (the service's: systemd's
    ``User=``), act as that user from here on, so that what this command creates there (cache
    files, study directories, the database and its journal) is the service's to read, write
    and delete — root's would refuse the receiver a study's directory and the forwarder its
    file. Called before the command touches the data directory.

    ``for_good``: the process gives up root entirely. Otherwise only its effective ids change,
    and the context returned reads as root again (what ``appliance send`` imports may be where
    only root can read it); the files it creates are still the owner's."""
    if os.geteuid() != 0:
        return nullcontext
    try:
        owner = root.stat()
    except OSError:  # not made yet: nothing to match
        return nullcontext
    if owner.st_uid == 0:
        return nullcontext
    uid, gid = owner.st_uid, owner.st_gid
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:  # an owner without a name
        groups = [gid]
    os.setgroups(groups)
    if for_good:
        os.setgid(gid)
        os.setuid(uid)
        return nullcontext
    os.setegid(gid)
    os.seteuid(uid)

    @contextmanager
    def as_root() -> Iterator[None]:
        os.seteuid(0)
        try:
            yield
        finally:
            os.seteuid(uid)

    return as_root


# ---- subcommands -------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from .app import run

    return run(_config_path(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError, load

    path = args.file or _config_path(args)
    try:
        config = load(path)
    except ConfigError as exc:
        print(exc)
        return 1
    for advice in config.advice:
        print(advice.as_warning())
    print(f"{path}: OK")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from .echo import echo

    calling_ae = args.calling_ae
    if calling_ae is None:  # speak as this box, when its configuration is at hand
        calling_ae = _load_or_exit(args).node.ae_title if args.config or os.environ.get("APPLIANCE_CONFIG") else "EDGE"
    ok, message = echo(args.host, args.port, args.aet, calling_ae=calling_ae, timeout=args.timeout)
    print(message)
    return 0 if ok else 1


def cmd_ls(args: argparse.Namespace) -> int:
    from .db import open_database

    config = _load_or_exit(args)
    _as_data_owner(config.storage.root)
    db = open_database(config.storage.root)
    studies = db.studies()
    header = f"{'PATIENT':<28} {'STUDY DATE':<10} {'MOD':<8} {'INST':>6} {'SIZE':>10}  {'STATE':<9} STUDY UID"
    print(header)
    for s in studies:
        patient = f"{s.patient_name or '-'} ({s.patient_id or '-'})"
        date = s.study_date or "-"
        print(f"{patient[:28]:<28} {date:<10} {s.modalities or '-':<8} {s.instances:>6} "
              f"{_size(s.size):>10}  {s.state:<9} {s.study_instance_uid}")
    total = sum(s.instances for s in studies)
    print(f"{len(studies)} studies, {total} instances, {_size(sum(s.size for s in studies))}")
    return 0


def cmd_route_test(args: argparse.Namespace) -> int:
    from .routetest import route_test
    from .rules import Origin

    config = _load_or_exit(args)
    origin = Origin(args.calling_ae or "", args.called_ae or "", args.source_ip or "")
    report = route_test(args.files, config, origin)
    print(report.text, end="")
    return 1 if report.unreadable else 0


def cmd_queue(args: argparse.Namespace) -> int:
    from .queue import queue_report

    config = _load_or_exit(args)
    _as_data_owner(config.storage.root)
    print(queue_report(config, as_json=args.json, dead=args.dead_limit if args.dead else 0))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from .db import open_database
    from .wakeup import Nudger

    config = _load_or_exit(args)
    if not args.all and not args.destination:
        print("name a destination, or --all", file=sys.stderr)
        return 2
    _as_data_owner(config.storage.root)
    db = open_database(config.storage.root)
    if not args.all and args.destination not in config.destinations and not db.has_deliveries(args.destination):
        # A destination no longer configured that still has items is retried like any other.
        return _unknown_destination(config, args.destination)
    count = db.retry_dead(None if args.all else args.destination)
    if count:
        Nudger(config.storage.root).nudge()  # the forwarder sends them now, not at its next look
    where = "all destinations" if args.all else args.destination
    print(f"{count} dead letter(s) for {where} back in the queue")
    return 0


def cmd_move(args: argparse.Namespace) -> int:
    from .db import open_database
    from .wakeup import Nudger

    config = _load_or_exit(args)
    if args.old in config.destinations:
        print(f'"{args.old}" is still configured: rename or remove it in the file first', file=sys.stderr)
        return 2
    if args.new not in config.destinations:
        return _unknown_destination(config, args.new)
    _as_data_owner(config.storage.root)
    result = open_database(config.storage.root).move_queue(args.old, args.new)
    if result.moved:
        Nudger(config.storage.root).nudge()
    print(f"{result.moved} instance(s) waiting for {args.old} now wait for {args.new}"
          + (f"; {result.kept} that {args.new} already has (or is sending) stay with {args.old}" if result.kept else "")
          + (f"; {result.following} being sent to {args.old} follow unless it takes them" if result.following else ""))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from .queue import import_files

    config = _load_or_exit(args)
    if args.to and args.to not in config.destinations:
        return _unknown_destination(config, args.to)
    # Loaded before the ids change: a Python installed where the data's owner cannot read (a
    # development box's pyenv under /root) could not load it afterwards.
    from . import diskfile  # noqa: F401

    as_root = _as_data_owner(config.storage.root, for_good=False)
    imported, skipped = import_files(config, args.paths, only_to=args.to, calling_ae=args.calling_ae,
                                     reading=as_root)
    print(f"imported {imported}, skipped {skipped}")
    return 0 if skipped == 0 else 1


def cmd_print_jobs(args: argparse.Namespace) -> int:
    from .printing.jobs import format_jobs, job_counts, list_jobs

    config = _load_or_exit(args)
    _as_data_owner(config.storage.root)
    if args.retry is not None:
        from .printing.jobs import retry_job

        if not retry_job(config.storage.root, args.retry):
            print(f"job {args.retry} cannot be retried (unknown, printed, or its PostScript is gone)", file=sys.stderr)
            return 1
        print(f"job {args.retry} queued again")
        return 0
    print(format_jobs(list_jobs(config.storage.root, limit=args.limit), job_counts(config.storage.root)))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Edge DICOM appliance")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Every subcommand that reads the configuration takes --config after its name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help=f"configuration file (default: $APPLIANCE_CONFIG or {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run the appliance in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[common], help="validate a configuration file; exit 0 if it is OK")
    p.add_argument("file", type=Path, nargs="?", help="the file (default: the one --config names)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("aet", help="the peer's AE title")
    p.add_argument("--calling-ae", help="our AE title (default: node.ae_title of the configuration, or EDGE)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("ls", parents=[common], help="list cached studies")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("queue", parents=[common], help="forwarding queues: pending, in flight, dead, waiting studies")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dead", action="store_true", help="also list the dead letters: which instance, where, why")
    p.add_argument("--limit", dest="dead_limit", type=int, default=100,
                   help="with --dead: the N most recent (default: 100)")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("retry", parents=[common], help="put dead letters back in the queue")
    p.add_argument("destination", nargs="?")
    p.add_argument("--all", action="store_true", help="every destination")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("move", parents=[common],
                       help="give what waits for a destination no longer configured (renamed) to another")
    p.add_argument("old", help="the destination's old name")
    p.add_argument("new", help="a configured destination")
    p.set_defaults(func=cmd_move)

    p = sub.add_parser("send", parents=[common], help="import DICOM files into the cache and route or send them")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories (recursed)")
    p.add_argument("--to", metavar="DEST", help="send to this destination only, instead of routing")
    p.add_argument("--calling-ae", default="IMPORT", help="the calling AE title rules see (default: IMPORT)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("route-test", parents=[common],
                       help="explain what the routes would do with DICOM files (nothing is sent)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--calling-ae", help="as if sent by this AE title")
    p.add_argument("--called-ae", help="as if sent to this AE title")
    p.add_argument("--source-ip", help="as if sent from this address")
    p.set_defaults(func=cmd_route_test)

    p = sub.add_parser("print-jobs", parents=[common], help="print jobs: queued, printed, failed, with previews")
    p.add_argument("--limit", type=int, default=50, help="newest N jobs (default: 50)")
    p.add_argument("--retry", type=int, metavar="JOB", help="send a failed or waiting job again now")
    p.set_defaults(func=cmd_print_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`appliance ls | head`): what it did not read is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
