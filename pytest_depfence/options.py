"""Every setting of a fence, described and validated once.

The plugin (marker, CLI flag, ini key), the library (`Fence(...)`) and the
`depfence` command all take the same settings; each has one description and
one validator here that takes the value and where it came from, and raises
ConfigError naming both.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import outages
from .errors import ConfigError

RESOLV_CONF = "/etc/resolv.conf"
MODES = ("block", "audit")


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    validate: Callable[[Any, str], Any]  # (value, where) -> the value to use


def _mode(value: Any, where: str) -> str:
    if value not in MODES:
        raise ConfigError(str(value), f"mode must be one of {', '.join(MODES)}", where)
    return str(value)


def _outage(value: Any, where: str) -> str:
    if value not in outages.OUTAGES:
        choices = ", ".join(outages.OUTAGES)
        raise ConfigError(str(value), f"outage must be one of {choices}", where)
    return str(value)


def _timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(repr(value), "timeout must be a positive number of seconds", where)
    return float(value)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Below this, the command could not even start (its entry shell is OOM-killed).
MIN_MEMORY = 1 << 20
#: cpu.max takes a quota of at least 1 ms per 100 ms period.
MIN_CPUS = 0.01


def _memory(value: Any, where: str) -> int | None:
    """Bytes, from an int or a size such as "512M", "1.5G", "256MiB" (K/M/G/T: powers of 1024)."""
    if value is None:
        return None
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (found := _SIZE.fullmatch(value.strip())):
        size = float(found.group(1)) * _UNITS[found.group(2).upper()]
    if size is None:
        raise ConfigError(
            _shown(value), 'memory is a size in bytes, or a string such as "512M" or "2G"', where
        )
    if size < MIN_MEMORY:
        raise ConfigError(
            _shown(value), "memory must be at least 1M (the command could not even start)", where
        )
    return int(size)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _number_of(value: Any) -> float | None:
    """A number from a number or its text (ini keys and CLI flags are text); None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _cpus(value: Any, where: str) -> float | None:
    if value is None:
        return None
    number = _number_of(value)
    if number is None or not math.isfinite(number) or number < MIN_CPUS:
        raise ConfigError(
            _shown(value),
            f"cpus is a number of CPUs of at least {MIN_CPUS} (1.5: one and a half)",
            where,
        )
    return float(number)


def _pids(value: Any, where: str) -> int | None:
    if value is None:
        return None
    number = _number_of(value)
    if number is None or number != int(number) or number < 1:
        raise ConfigError(
            _shown(value), "pids is a whole number of processes and threads, at least 1", where
        )
    return int(number)


def _raw_sockets(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(repr(value), "raw_sockets must be True or False", where)
    return value


def _services(value: Any, where: str) -> tuple[Any, ...]:
    """Units or cgroup paths (cgroup.Adopted): each is looked for when a fence is built."""
    from .adopt import Adopted

    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(repr(value), "services is a list of systemd units or cgroup paths", where)
    adopted = []
    for spec in value:
        if isinstance(spec, Adopted):
            adopted.append(spec)
        elif isinstance(spec, str) and spec:
            adopted.append(Adopted(spec, where))
        else:
            raise ConfigError(repr(spec), "a service is a unit name or a cgroup path", where)
    return tuple(adopted)


def _ranges(value: Any, where: str) -> tuple[Any, ...]:
    """Ranges files (ranges.Ranges), each read now: a missing file or a bad line is said
    here, before any fence is built. Relative paths are relative to the current
    directory; the plugin makes marker and ini paths absolute first."""
    from .ranges import Ranges, load

    items = [value] if isinstance(value, (str, os.PathLike, Ranges)) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(repr(value), "ranges is a file, or a list of files", where)
    read = []
    for item in items:
        if isinstance(item, Ranges):
            read.append(item)
        elif isinstance(item, (str, os.PathLike)) and os.fspath(item):
            read.append(load(item, where))
        else:
            raise ConfigError(repr(item), "a ranges file is a path (str)", where)
    return tuple(read)


def _contract(value: Any, where: str) -> str:
    from .contract import check_name

    return check_name(value, where)


def parse_upstream(value: str, source: str = "upstream") -> tuple[str, int]:
    """`HOST[:PORT]`, `[V6]:PORT` or a bare IPv6 address; HOST must be an IP address."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(value, "expected [IPV6]:PORT", source)
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            value, "the upstream must be an IP address (HOST[:PORT])", source
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(value, f"port {port!r} is not in 1..65535", source)
    return host, int(port)


def default_upstream(resolv_conf: str = RESOLV_CONF) -> str:
    """The first nameserver of resolv.conf: where allowed names are resolved by default."""
    try:
        with open(resolv_conf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    raise ConfigError(
        resolv_conf,
        "no nameserver found; pass upstream= or --depfence-upstream",
        "default upstream",
    )


def _upstream(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(repr(value), "the upstream is a string, HOST[:PORT]", where)
    parse_upstream(value, where)
    return value


MODE = Option(
    "mode", "block (default) or audit (record forbidden egress without blocking it)", _mode
)
OUTAGE = Option(
    "outage",
    f"what a blocked host looks like (default {outages.DEFAULT}): {outages.choices_help()}",
    _outage,
)
TIMEOUT = Option("timeout", "kill everything the command started after this many seconds", _timeout)
CONTRACT = Option(
    "contract",
    "pin the test's egress to depfence-contracts/NAME.contract beside the test file",
    _contract,
)
RAW_SOCKETS = Option(
    "raw_sockets",
    "keep CAP_NET_RAW for the fenced command (raw and packet sockets, ping over raw "
    "sockets); off by default, because packet sockets bypass every hook of the fence",
    _raw_sockets,
)
MEMORY = Option(
    "memory",
    'memory limit of the fenced command (and of each fenced service), e.g. "512M": past it '
    "the kernel's OOM killer kills a process, and the test fails naming it",
    _memory,
)
CPUS = Option(
    "cpus",
    "CPU limit of the fenced command (and of each fenced service), in CPUs (1.5: one and a half)",
    _cpus,
)
PIDS = Option(
    "pids",
    "most processes and threads the fenced command (and each fenced service) may have at "
    "once; a fork past it fails, and so does the test",
    _pids,
)
SERVICES = Option(
    "services",
    "running services to fence for each run: systemd units (docker.service) or cgroup "
    "paths; their egress is judged and named while the run lasts, and they are never killed",
    _services,
)
RANGES = Option(
    "ranges",
    "files of address ranges (one address or CIDR per line, or JSON such as GitHub's "
    "https://api.github.com/meta) whose every range is an address rule of the policy: "
    "blocked under no_egress, allowed under egress_only",
    _ranges,
)
UPSTREAM = Option(
    "upstream",
    "DNS server the fence's proxy forwards allowed queries to, HOST[:PORT] (default: the "
    "first nameserver of /etc/resolv.conf; the lab's resolver with the lab)",
    _upstream,
)

#: The settings `fence(...)` takes, in the order help texts list them.
FENCE_OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (MODE, OUTAGE, TIMEOUT, CONTRACT, MEMORY, CPUS, PIDS, RAW_SOCKETS, SERVICES, RANGES)
}
#: The settings that are resource limits (`limits.Limits`).
LIMIT_OPTIONS = ("memory", "cpus", "pids")
#: Every setting `validate` knows: those of `fence(...)` and the session's upstream.
OPTIONS: dict[str, Option] = {**FENCE_OPTIONS, UPSTREAM.name: UPSTREAM}


def validate(name: str, value: Any, where: str) -> Any:
    """The value of setting `name`, checked; ConfigError names the value and `where`."""
    option = OPTIONS.get(name)
    if option is None:
        raise ConfigError(name, f"unknown setting; known: {', '.join(OPTIONS)}", where)
    return option.validate(value, where)
