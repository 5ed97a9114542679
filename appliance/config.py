"""The appliance's configuration: one YAML file, read once into typed, frozen objects.

``load(path)`` returns a :class:`Config` or raises :class:`ConfigError` listing every problem with
its file:line:column and key path. The rest of the code never sees raw YAML. The mechanism
(how a dataclass field's type hint says how to read a value) is in ``yamlschema.py``; this module
is the schema: which sections exist, their keys, defaults and cross-checks.

To add a section: write a frozen dataclass whose fields carry type hints (see ``yamlschema``
for what a hint may say), give it a default instance in :class:`Config`, and add any check that
spans sections to ``_cross_check``. Print settings live in ``printing/settings.py`` and are
plugged in the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .printing.settings import PrintConfig, PrintRetry
from .valuetypes import (
    DURATION,
    AETitle,
    BindAddress,
    DiskSpace,
    Duration,
    Host,
    Network,
    Port,
    PositiveInt,
    Space,
    Timeout,
    above_zero,
    is_ae_title,
    parse_duration,
    parse_space,
)
from .yamlschema import INVALID, Check, ConfigError, Context, Custom, Problem, compose, read_section

__all__ = ["Config", "ConfigError", "Problem", "Space", "is_ae_title", "load", "loads", "parse_duration",
           "parse_space"]


# ---- sections ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: for the TCP connection, for an association reply, for a DIMSE reply,
    and for an idle network."""

    connect: Timeout = 10.0
    acse: Timeout = 30.0
    dimse: Timeout = 60.0
    network: Timeout = 60.0


@dataclass(frozen=True)
class Node_:
    """This box as a DICOM node (the Storage SCP)."""

    ae_title: AETitle = "EDGE"
    bind_address: BindAddress = "0.0.0.0"
    port: Port = 104
    max_associations: PositiveInt = 16
    # The called AE title a modality uses must be ours; false accepts any called AE.
    require_called_ae: bool = True
    # Empty means: any calling AE title / any source address.
    allowed_calling_aes: tuple[AETitle, ...] = ()
    allowed_networks: tuple[Network, ...] = ()
    # What a second C-STORE of a SOP Instance UID already cached does.
    on_duplicate: Literal["replace", "keep-first", "reject"] = "replace"
    # 0 = unlimited; large PDUs cost less CPU per byte on the receive path.
    max_pdu: Annotated[int, Check(lambda n: n == 0 or 4096 <= n <= 2**31, "0 or 4096-2147483648")] = 4 * 2**20
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class Disk:
    """Watermarks on the cache's filesystem."""

    # Low watermark: below this much free space, new C-STOREs get 0xA700 (out of resources).
    min_free: DiskSpace = field(default_factory=lambda: Space(percent=5.0))
    # High watermark: above this much used space, delivered instances are evicted, oldest first.
    evict_above: DiskSpace = field(default_factory=lambda: Space(percent=80.0))


@dataclass(frozen=True)
class Storage:
    """Where the cache and the database live."""

    path: str = "/var/lib/appliance"
    disk: Disk = field(default_factory=Disk)

    @property
    def root(self) -> Path:
        return Path(self.path)


@dataclass(frozen=True)
class Retry:
    """Backoff for a destination: initial delay, growth factor, cap, random jitter, and when to
    give up on an instance: after ``max_attempts`` attempts (tries that reached the PACS: an
    outage is not the instance's failure), or ``give_up_after`` since it was queued."""

    # 0 would retry a destination that is down as fast as it refuses; max_delay is at least
    # initial_delay (a cross-check).
    initial_delay: Annotated[float, DURATION, above_zero("10s")] = 10.0
    factor: Annotated[float, Check(lambda f: f >= 1.0, "a number of at least 1")] = 2.0
    max_delay: Annotated[float, DURATION, above_zero("10m")] = 600.0
    jitter: Annotated[float, Check(lambda j: 0.0 <= j <= 1.0, "a fraction 0-1")] = 0.2
    max_attempts: Annotated[int, Check(lambda n: n >= 0, "0 (no limit) or more")] = 0
    # Unlike max_attempts, 0 is no "no limit": every instance would be given up at its first
    # failure, the link's included.
    give_up_after: Annotated[float, DURATION, above_zero(
        "7d", "0 would give up at the first failure, the link's included: to give up on an image at the"
        " PACS's first failure with it, write max_attempts: 1")] = 7 * 86400.0


@dataclass(frozen=True)
class TLS:
    """DICOM TLS to a destination (pynetdicom's ssl support)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class Destination:
    """A remote Storage SCP (a PACS, a workstation) that instances are forwarded to."""

    ae_title: AETitle
    host: Host
    port: Port
    calling_ae: AETitle | None = None
    max_associations: PositiveInt = 1
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: Retry = field(default_factory=Retry)
    tls: TLS | None = None


def _read_when(node: Node, path: str, ctx: Context) -> object:
    """Rule conditions are read by the rule engine; here they only need to be a mapping."""
    from .rules import read_condition

    return read_condition(node, path, ctx)


def _read_tag_edits(node: Node, path: str, ctx: Context) -> object:
    from .rules import read_tag_edits

    return read_tag_edits(node, path, ctx)


def _read_tag_list(node: Node, path: str, ctx: Context) -> object:
    from .rules import read_tag_list

    return read_tag_list(node, path, ctx)


@dataclass(frozen=True)
class Route:
    """One routing rule: when its conditions hold, its actions apply."""

    name: str | None = None
    when: Annotated[object, Custom(_read_when)] = None
    send_to: tuple[str, ...] = ()
    set: Annotated[object, Custom(_read_tag_edits)] = field(default_factory=lambda: MappingProxyType({}))
    remove: Annotated[object, Custom(_read_tag_list)] = ()
    discard: bool = False
    # First match wins unless a rule says to keep evaluating.
    continue_: bool = field(default=False, metadata={"yaml": "continue"})
    # 0 would hold nothing: left out is what sends at once.
    stable_after: Annotated[float, DURATION, above_zero(
        "30s", "leave stable_after out to send without waiting")] | None = None


@dataclass(frozen=True)
class Retention:
    """How long delivered instances stay in the cache, and their records in the database."""

    # 0: evicted once every destination has confirmed it (nothing kept on the box).
    keep_delivered_for: Duration = 86400.0
    # The records of an evicted instance (its deliveries and every attempt) answer "did it
    # reach the PACS?" for this long after its delivery; then they go, so that the database of
    # a box that runs for years stays the size of its recent work.
    keep_history_for: Duration = 30 * 86400.0


@dataclass(frozen=True)
class Web:
    """The status page and its JSON API."""

    enabled: bool = True
    bind_address: BindAddress = "0.0.0.0"
    port: Port = 80


@dataclass(frozen=True)
class Logging:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    """The whole file."""

    node: Node_ = field(default_factory=Node_)
    storage: Storage = field(default_factory=Storage)
    destinations: Mapping[str, Destination] = field(default_factory=lambda: MappingProxyType({}))
    routes: tuple[Route, ...] = ()
    retention: Retention = field(default_factory=Retention)
    print: PrintConfig = field(default_factory=PrintConfig)
    web: Web = field(default_factory=Web)
    logging: Logging = field(default_factory=Logging)
    source: str = field(default="", metadata={"internal": True})
    # The text it was read from: what the main process hands its children (app.py).
    text: str = field(default="", repr=False, compare=False, metadata={"internal": True})
    # What is valid but most likely not what the admin meant: shown by check-config, and
    # logged as warnings when the box starts or reloads the file.
    advice: tuple[Problem, ...] = field(default=(), repr=False, compare=False, metadata={"internal": True})


# ---- loading -----------------------------------------------------------------------------------

def loads(text: str, filename: str = "<config>", base_dir: Path | None = None) -> Config:
    """Read configuration text; relative storage paths are taken from ``base_dir``."""
    ctx = Context(filename)
    root = compose(text, ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    if root is None or (isinstance(root, ScalarNode) and root.tag.endswith(":null")) \
            or (isinstance(root, MappingNode) and not root.value):
        # Every key has a default, so an empty file would be a valid box that forwards
        # nothing; it is a file cut short or blanked far more often than a wish.
        ctx.error(None, "", "the file has no settings")
        raise ConfigError(ctx.problems)
    config = read_section(Config, root, "", ctx)
    if ctx.problems or config is INVALID:
        raise ConfigError(ctx.problems)
    _cross_check(config, root, ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    storage = config.storage
    if base_dir is not None and not Path(storage.path).is_absolute():
        storage = Storage(path=str((base_dir / storage.path).resolve()), disk=storage.disk)
    return _replace(config, storage=storage, source=filename, text=text, advice=tuple(_advice(config, root, filename)))


def load(path: str | Path) -> Config:
    """Read and validate a configuration file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), 1, 1, "", f"cannot read the file: {exc}")]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([_not_utf8(str(path), data, exc)]) from exc
    return loads(text, str(path), base_dir=path.resolve().parent)


def _not_utf8(filename: str, data: bytes, exc: UnicodeDecodeError) -> Problem:
    """Where the first byte that is not UTF-8 is, as an editor counts lines and characters."""
    line_start = data.rfind(b"\n", 0, exc.start) + 1
    line = data.count(b"\n", 0, exc.start) + 1
    # The bytes before it are valid UTF-8 (it is the first that is not): count characters.
    column = len(data[line_start:exc.start].decode("utf-8")) + 1
    return Problem(filename, line, column, "", f"the file must be UTF-8, and byte 0x{data[exc.start]:02X} here is "
                                               "not part of a UTF-8 character (an editor that saved it as Latin-1 "
                                               "or Windows-1252? save it as UTF-8)")


def _replace(config: Config, **changes: object) -> Config:
    import dataclasses

    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def _find(root: Node, *keys: str | int) -> Node | None:
    """The node at a key path, for pointing cross-check errors at the right line: the key node
    for a final mapping key, the item node for a list index."""
    node: Node | None = root
    last: Node | None = root
    for key in keys:
        if isinstance(key, int) and isinstance(node, SequenceNode):
            node = last = node.value[key] if key < len(node.value) else None
        elif isinstance(key, str) and isinstance(node, MappingNode):
            pair = next(((k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == key), None)
            if pair is None:
                return last
            last, node = pair
        else:
            return last
    return last


def _cross_check(config: Config, root: Node, ctx: Context) -> None:
    """Checks that span sections: routes name existing destinations, ports do not collide."""
    from .rules import route_problems

    for i, route in enumerate(config.routes):
        for j, name in enumerate(route.send_to):
            if name not in config.destinations:
                known = ", ".join(config.destinations) or "none are configured"
                ctx.error(_find(root, "routes", i, "send_to", j), f"routes[{i}].send_to[{j}]",
                          f'unknown destination "{name}" (destinations: {known})')
            elif name in route.send_to[:j]:
                ctx.error(_find(root, "routes", i, "send_to", j), f"routes[{i}].send_to[{j}]",
                          f'"{name}" is listed twice (an instance goes to a destination once)')
        if route.discard and route.send_to:
            ctx.error(_find(root, "routes", i, "discard"), f"routes[{i}].discard",
                      "a rule cannot both discard and send_to")
        for key, message in route_problems(route):
            ctx.error(_find(root, "routes", i, key), f"routes[{i}].{key}", message)
    for name, destination in config.destinations.items():
        _check_backoff(destination.retry, root, ("destinations", name, "retry"), ctx)
    for name, printer in getattr(config.print, "printers", {}).items():
        _check_backoff(printer.retry, root, ("print", "printers", name, "retry"), ctx)
    ports = {"node.port": config.node.port}
    if config.web.enabled:
        ports["web.port"] = config.web.port
    if getattr(config.print, "enabled", False):
        ports["print.port"] = getattr(config.print, "port", 0)
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            section, name = key.split(".")
            ctx.error(_find(root, section, name), key, f"port {port} is also used by {seen[port]}")
        seen[port] = key


def _advice(config: Config, root: Node, filename: str) -> list[Problem]:
    """What the box would run with but the admin most likely did not mean: a destination no
    rule sends to (a send_to misspelt, or dropped in an edit), and rules that are never
    evaluated because a rule above matches everything and stops there."""
    ctx = Context(filename)
    used = {name for route in config.routes for name in route.send_to}
    for name in config.destinations:
        if name not in used:
            ctx.error(_find(root, "destinations", name), f"destinations.{name}",
                      f"no rule sends to it: only `appliance send --to {name}` will")
    catch_all = next((i for i, route in enumerate(config.routes) if route.when is None and not route.continue_), None)
    if catch_all is not None:
        for j in range(catch_all + 1, len(config.routes)):
            ctx.error(_find(root, "routes", j), f"routes[{j}]",
                      f"never evaluated: routes[{catch_all}] above has no `when`, so it matches every instance,"
                      " and it has no `continue: true`")
    return ctx.problems


def _check_backoff(retry: Retry | PrintRetry, root: Node, keys: tuple[str, ...], ctx: Context) -> None:
    """The wait between attempts starts at initial_delay and grows up to max_delay: a cap below
    the start is a slip, reported at the key that was written (max_delay, if it was)."""
    if retry.max_delay >= retry.initial_delay:
        return
    why = "the wait between attempts starts at initial_delay and grows up to max_delay"
    where = _find(root, *keys, "max_delay")
    path = ".".join(keys)
    if where is not None and getattr(where, "value", None) == "max_delay":
        ctx.error(where, f"{path}.max_delay", f"{retry.max_delay:g} s is shorter than initial_delay "
                                              f"({retry.initial_delay:g} s): {why}")
    else:
        ctx.error(_find(root, *keys, "initial_delay"), f"{path}.initial_delay",
                  f"{retry.initial_delay:g} s is longer than max_delay ({retry.max_delay:g} s, the default): {why}")
