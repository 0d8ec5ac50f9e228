"""What a fenced run observed: egress events, the run's result, and the violation text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["allowed", "blocked"]
BlockedAt = Literal["dns", "connect", "packet"]

#: First line of every violation report; tests import it so text and tests cannot drift.
VIOLATION_HEADLINE = "{count} forbidden egress attempt{s} while running {command}"
#: Appended to the headline when the run hit its timeout.
TIMED_OUT = " (timed out after {seconds:g} s; everything it started was killed)"
#: Shown instead of a process when the kernel could not tell who sent a query.
UNATTRIBUTED = "not attributed: {reason}"


@dataclass(frozen=True)
class EgressEvent:
    """One egress attempt seen inside a fence (a DNS query, later also a connect)."""

    domain: str | None
    address: str | None
    port: int | None
    protocol: str
    verdict: Verdict
    blocked_at: BlockedAt | None
    rule: str | None
    pid: int | None
    cmdline: str | None
    ancestry: tuple[tuple[int, str], ...] = ()
    qtype: str | None = None
    #: Why pid/cmdline are missing, when they are.
    unattributed: str | None = None
    #: The policy forbids it (in audit mode it is forbidden but not blocked).
    forbidden: bool = False
    #: What the script was shown: the DNS outage (nxdomain, ...) or, for a
    #: connection, refused / reset / blackhole.
    outage: str | None = None
    #: For a connection: where the address was learned to belong to `domain`
    #: (dns, upstream, hosts file, rule).
    learned_from: str | None = None

    @property
    def is_violation(self) -> bool:
        return self.forbidden

    def target(self) -> str:
        if self.address is None:
            return f"{self.domain} ({self.qtype})" if self.qtype else str(self.domain)
        host = f"[{self.address}]" if ":" in self.address else self.address
        where = f"{host}:{self.port}/{self.protocol}"
        if self.qtype:  # a DNS query sent straight to that resolver, past the fence's proxy
            return f"{self.domain} ({self.qtype}) to {where}"
        return where


@dataclass(frozen=True)
class FenceResult:
    """What `Fence.run` returns: the process outcome plus everything the fence saw."""

    command: str
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    events: tuple[EgressEvent, ...] = field(default_factory=tuple)
    #: Wall time of the run, seconds.
    duration: float = 0.0

    @property
    def violations(self) -> list[EgressEvent]:
        return [e for e in self.events if e.is_violation]

    @property
    def domains(self) -> list[str]:
        return sorted({e.domain for e in self.events if e.domain is not None})


def format_event(event: EgressEvent) -> list[str]:
    """The lines one event takes in a report."""
    head = f"  {event.verdict:<8} {event.target():<22} at {event.blocked_at or '-':<8}"
    if event.address is not None and not event.qtype:
        learned = f", learned from {event.learned_from}" if event.learned_from else ""
        head += f" ({event.domain or 'no name'}{learned})"
    if event.outage and event.outage not in ("refused", "nxdomain"):
        head += f" [{event.outage}]"
    if event.rule:
        head += f" rule {event.rule}"
    lines = [head.rstrip()]
    if event.pid is None:
        lines.append(" " * 11 + UNATTRIBUTED.format(reason=event.unattributed or "unknown"))
    else:
        lines.append(f"{'':11}pid {event.pid}  {event.cmdline or '?'}")
    for pid, cmdline in event.ancestry:
        lines.append(f"{'':11}via pid {pid} {cmdline}")
    return lines


def format_violations(
    violations: list[EgressEvent], command: str, timed_out_after: float | None = None
) -> str:
    count = len(violations)
    lines = [VIOLATION_HEADLINE.format(count=count, s="" if count == 1 else "s", command=command)]
    if timed_out_after is not None:
        lines[0] += TIMED_OUT.format(seconds=timed_out_after)
    for event in violations:
        lines.extend(format_event(event))
    return "\n".join(lines)
