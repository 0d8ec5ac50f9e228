"""What a fenced run observed: egress events, the run's result, and the violation text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["allowed", "blocked"]
BlockedAt = Literal["dns", "connect", "packet"]

#: First line of every violation report; tests import it so text and tests cannot drift.
VIOLATION_HEADLINE = "{count} forbidden egress attempt{s} while running {command}"
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

    @property
    def is_violation(self) -> bool:
        return self.forbidden

    def target(self) -> str:
        if self.domain is not None:
            return f"{self.domain} ({self.qtype})" if self.qtype else self.domain
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class FenceResult:
    """What `Fence.run` returns: the process outcome plus everything the fence saw."""

    command: str
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    events: tuple[EgressEvent, ...] = field(default_factory=tuple)

    @property
    def violations(self) -> list[EgressEvent]:
        return [e for e in self.events if e.is_violation]

    @property
    def domains(self) -> list[str]:
        return sorted({e.domain for e in self.events if e.domain is not None})


def format_event(event: EgressEvent) -> list[str]:
    """The lines one event takes in a report."""
    head = f"  {event.verdict:<8} {event.target():<22} at {event.blocked_at or '-':<8}"
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


def format_violations(violations: list[EgressEvent], command: str) -> str:
    count = len(violations)
    lines = [VIOLATION_HEADLINE.format(count=count, s="" if count == 1 else "s", command=command)]
    for event in violations:
        lines.extend(format_event(event))
    return "\n".join(lines)
