"""Value types of the configuration: how a YAML scalar becomes an AE title, a port, a
duration, an amount of disk, a network. Used by ``config.py`` and by the print settings; it
imports nothing of the appliance but the YAML-reading mechanism.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated

from .yamlschema import Check, Parse


def is_ae_title(value: str) -> bool:
    """PS3.5 AE: 1-16 characters of the default repertoire, no backslash or control characters."""
    return 0 < len(value.strip()) <= 16 and len(value) <= 16 and all(
        " " <= ch <= "~" and ch != "\\" for ch in value
    )


AETitle = Annotated[str, Check(is_ae_title, "an AE title (1-16 printable ASCII characters, no backslash)")]
Port = Annotated[int, Check(lambda p: 1 <= p <= 65535, "an integer 1-65535")]
PositiveInt = Annotated[int, Check(lambda n: n >= 1, "an integer of at least 1")]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1.5h``, ``7d``, ``250ms`` or a bare number of seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d|w)?\s*", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


DURATION = Parse(parse_duration, 'a duration such as "30s", "10m", "7d"')
Duration = Annotated[float, DURATION]


def above_zero(example: str, note: str = "") -> Check:
    """For a duration that 0 would make meaningless (a timeout, a backoff, a hold):
    ``Annotated[float, DURATION, above_zero("30s")]``; ``note`` says what to write instead."""
    return Check(lambda seconds: seconds > 0, f'a duration above zero, such as "{example}"'
                                              + (f" ({note})" if note else ""))


# A timeout of 0 would end every connection or association at once; one of tens of thousands of
# years does not fit the platform's time_t, and the socket refuses it when it is set.
Timeout = Annotated[float, DURATION, above_zero("30s"),
                    Check(lambda seconds: seconds <= 30 * 86400, "a timeout of at most 30d")]

_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Space:
    """An amount of disk: absolute bytes, or a percentage of the filesystem's size."""

    bytes: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        return self.bytes if self.bytes is not None else int(total * (self.percent or 0) / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.bytes} bytes"


def parse_space(text: str) -> Space:
    """``2GiB``, ``500MB``, ``10%`` -> :class:`Space`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(text)
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "%":
        if number > 100:
            raise ValueError(text)
        return Space(percent=number)
    return Space(bytes=int(number * _SIZES[unit]))


DiskSpace = Annotated[Space, Parse(parse_space, 'a size such as "2GiB", "500MB" or a percentage such as "10%"')]


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip(), strict=False)


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    Parse(parse_network, 'an address or network such as "10.0.0.0/8"'),
]
BindAddress = Annotated[str, Check(lambda a: _is_ip(a), "an IP address to listen on")]


def is_host(text: str) -> bool:
    """An IP address, or a DNS name (RFC 1123 labels, and underscores, which hosts files and
    some sites' names have; a trailing dot allowed). Not "host:port" nor a URL: the port is a
    key of its own."""
    if _is_ip(text):
        return True
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label) for label in name.split("."))


Host = Annotated[str, Check(is_host, "a host name or IP address, without a port (that is the port key) or scheme")]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
