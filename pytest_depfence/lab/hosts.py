"""The lab's names: every host and its addresses, the CNAMEs, the zones the lab claims.

The resolver addresses are not here: they belong to ``Lab`` (``Lab.RESOLVER4``,
``Lab.RESOLVER6``), which callers use to point a fence at the lab.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every lab name: (IPv4, IPv6). IPv4 in 10.77.0.0/16, IPv6 in fd77::/64.
_LAB_HOSTS: dict[str, tuple[str, str]] = {
    "github.com": ("10.77.1.1", "fd77::1:1"),
    "api.github.com": ("10.77.1.2", "fd77::1:2"),
    "codeload.github.com": ("10.77.1.3", "fd77::1:3"),
    "objects.githubusercontent.com": ("10.77.2.1", "fd77::2:1"),
    "raw.githubusercontent.com": ("10.77.2.2", "fd77::2:2"),
    "mirror.internal": ("10.77.3.1", "fd77::3:1"),
    "migrations.internal": ("10.77.3.2", "fd77::3:2"),
    "pypi.internal": ("10.77.3.3", "fd77::3:3"),
    "dns.google": ("10.77.8.8", "fd77::8:8"),
}

# An allowed-looking name whose chain ends at a blocked one.
_LAB_CNAMES: dict[str, str] = {
    "downloads.mirror.internal": "objects.githubusercontent.com",
}

# Zones the lab claims; the SOA of a negative answer is the closest one (else the root).
_LAB_ZONES = ("github.com", "githubusercontent.com", "internal", "dns.google")


@dataclass(frozen=True)
class LabHost:
    """A lab name and the addresses the lab DNS gives for it (HTTP listens on both)."""

    name: str
    ipv4: str
    ipv6: str
