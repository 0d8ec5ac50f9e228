"""Events and results for text tests: one factory, overridden field by field.

The defaults are GitHub's published example (`curl github.com ` blocked in
DNS); `connection()` is a refused IPv4 connect. A test names only the fields
it is about.
"""

from __future__ import annotations

from typing import Any

from pytest_depfence.events import EgressEvent, FenceResult

DNS_QUERY: dict[str, Any] = dict(
    domain="github.com",
    address=None,
    port=53,
    protocol="udp",
    verdict="blocked",
    blocked_at="dns",
    rule='no_egress("github.com") [CLI flag --no-egress]',
    pid=266767,
    cmdline="curl github.com ",
    qtype="A",
    forbidden=True,
    outage="nxdomain",
)

CONNECTION: dict[str, Any] = dict(
    DNS_QUERY,
    domain=None,
    address="10.77.1.1",
    port=443,
    protocol="tcp",
    blocked_at="connect",
    rule='no_egress("10.77.1.1")',
    pid=42,
    cmdline="curl https://10.77.1.1/",
    qtype=None,
    outage="refused",
    learned_from="rule",
)

#: What a permitted event changes (verdict, where, outage, rule).
ALLOWED: dict[str, Any] = dict(
    verdict="allowed", blocked_at=None, forbidden=False, outage=None, rule=None
)


def event(**overrides: Any) -> EgressEvent:
    """A DNS query through the proxy (blocked, unless overridden)."""
    return EgressEvent(**{**DNS_QUERY, **overrides})


def connection(**overrides: Any) -> EgressEvent:
    """A connection to an address (refused at connect, unless overridden)."""
    return EgressEvent(**{**CONNECTION, **overrides})


def result(returncode: int, *events: EgressEvent, timed_out: bool = False) -> FenceResult:
    return FenceResult("cmd", returncode, "", "", timed_out=timed_out, events=events)
