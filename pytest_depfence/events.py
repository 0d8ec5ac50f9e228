"""What a fenced run observed: egress events and the run's result (their texts: render)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["allowed", "blocked"]
BlockedAt = Literal["dns", "connect", "packet"]


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
