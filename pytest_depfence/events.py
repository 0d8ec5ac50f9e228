"""What a fenced run observed: egress events and the run's result (their texts: render).

An `EgressEvent` is a DNS query (`address` None), a connection or datagram
(`address`, `port`, `protocol`), or a DNS query sent past the proxy (both).

Events the kernel could not report (a ring buffer was full) are one event
of `protocol="lost"` (`is_loss`), always a violation: `rule` says how many,
of which member.

A contact with a local service -- a loopback or local address, or a unix
socket (`protocol="unix"`, `address` its path, no port) -- names the process
listening there in `listener` ("pid 812 squid -f /etc/squid.conf (unit
squid.service)"); when that process belongs to a fenced or adopted service,
`listener` starts with "service NAME:". Events of a service's own processes
carry its name in `service`, and, within a run, `called_by`: the fenced
process of the run that contacted the service last before it (pid and
command line, then that process's ancestry), as `ancestry` is for `pid`.

A fenced process moved to a cgroup outside its fence (by itself or by any
other process) is an event too, and always a violation: out of the fence
nothing it does could be judged, so it has been killed, in audit mode too.
It has `protocol="cgroup"`, `blocked_at="cgroup"`, `verdict="blocked"`,
`outage="killed"`, no domain and no port; `address` is the destination
cgroup's path from the cgroup v2 root (`/`, `/system.slice`; `id:N`
when the kernel could not say it); `rule` says who moved it (or started it
there: clone3 with CLONE_INTO_CGROUP), and `moved_by` is that process's pid
when it was another one.
`pid`, `cmdline` and `ancestry` name the moved process, as for any event.
A fenced process that made a raw or packet socket its fence does not allow
(CAP_NET_RAW back through a user namespace) got past the hooks too: killed,
with `protocol="socket"`, `blocked_at="socket"` and `address` the socket's
family and type (`AF_PACKET/SOCK_RAW`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .limits import Usage

Verdict = Literal["allowed", "blocked"]
#: "cgroup": a process moved out of its fence (and killed); "socket": a process that made
#: a raw or packet socket its fence does not allow (and killed).
BlockedAt = Literal["dns", "connect", "packet", "cgroup", "socket"]


@dataclass(frozen=True)
class EgressEvent:
    """One egress attempt seen inside a fence, or a process leaving it (module docstring)."""

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
    #: `pid` names the socket's owner -- the process that created, connected or addressed
    #: it -- not surely the one that sent this message (another may share the socket): a
    #: DNS query over TCP, or over UDP on a kernel before 6.10 (reported "socket opened by").
    by_socket: bool = False
    #: The policy forbids it (in audit mode it is forbidden but not blocked).
    forbidden: bool = False
    #: What the script was shown: the DNS outage (nxdomain, ...) or, for a
    #: connection, refused / reset / blackhole.
    outage: str | None = None
    #: For a connection: where the address was learned to belong to `domain`
    #: (dns, upstream, hosts file, rule).
    learned_from: str | None = None
    #: For a process moved out of its fence by another process (or started outside
    #: it by its parent): that process's pid.
    moved_by: int | None = None
    #: For a contact with a local service: who listens there (module docstring).
    listener: str | None = None
    #: The fenced or adopted service whose process this event comes from.
    service: str | None = None
    #: For a service's event in a run: the run's process that called the service, then
    #: its ancestry ((pid, command line), ...); empty when nothing of the run called it.
    called_by: tuple[tuple[int, str], ...] = ()
    #: For a permitted connection or datagram, and a contact with a local service at an
    #: address: how many the kernel let through in the run, from this process to this
    #: endpoint (each connect(), and each datagram sent to an address without one). The
    #: kernel counts them and reports only the first (bpf/sockaddr.c); the count is known
    #: when the run ends (None before, as `on_event` sees the event, and for other events).
    connections: int | None = None

    @property
    def is_violation(self) -> bool:
        return self.forbidden

    @property
    def is_loss(self) -> bool:
        """Events the kernel could not report (`protocol="lost"`; `rule` says how many):
        always a violation, since one of them may have been a forbidden attempt."""
        return self.protocol == "lost"

    @property
    def is_local(self) -> bool:
        """A contact with a local service (a listener was found, or a unix socket)."""
        return self.listener is not None or self.protocol == "unix"

    @property
    def is_escape(self) -> bool:
        """A process that got past the fence's hooks (module docstring): moved out of its
        fence, or a raw or packet socket made all the same; not an egress attempt."""
        return self.protocol in ("cgroup", "socket")


@dataclass(frozen=True, repr=False)
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
    #: What the command used (CPU seconds; peak memory under a memory limit) and which
    #: of its limits (`fence(memory=, cpus=, pids=)`) it hit.
    usage: Usage = field(default_factory=Usage)

    @property
    def oom_killed(self) -> bool:
        """The kernel's OOM killer killed a process of the run for its memory limit
        (which ones: `usage.oom_victims`)."""
        return self.usage.oom_kills > 0

    @property
    def violations(self) -> list[EgressEvent]:
        return [e for e in self.events if e.is_violation]

    @property
    def domains(self) -> list[str]:
        return sorted({e.domain for e in self.events if e.domain is not None})

    def __repr__(self) -> str:
        # Short, so an assertion on a result stays readable: the output and events are
        # attributes (and the test's report sections), not part of the repr.
        timed_out = ", timed_out=True" if self.timed_out else ""
        return (
            f"FenceResult(command={self.command!r}, returncode={self.returncode}{timed_out}, "
            f"events={len(self.events)}, violations={len(self.violations)}, "
            f"domains={self.domains!r}, stdout={len(self.stdout)} chars, "
            f"stderr={len(self.stderr)} chars)"
        )
