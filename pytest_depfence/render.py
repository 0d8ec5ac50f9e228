"""Every text form of an egress event, written once.

- the terminal: `format_event` (an event's lines) and `format_violations`
  (the report a failing test or `depfence run` shows);
- the CLI's event log: `log_line`, in the key=value shape of GitHub's fence;
- a run that hit its limits: `limits_text` (`fence(memory=, pids=)`);
- destinations: `endpoint` ("ADDRESS:PORT/PROTO", an IPv6 address in
  brackets) is the one way an address and port are written; `target` (the
  terminal's), `report_target` (annotations, the step summary) and
  `destination` (a contract line's key) are built on it. A process moved out
  of its fence has no endpoint: its destination is a cgroup (`cgroup /`).

Tests import the constants, so the texts and the tests cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import EgressEvent
    from .limits import Usage

#: First line of every violation report; tests import it so text and tests cannot drift.
VIOLATION_HEADLINE = "{count} forbidden egress attempt{s} while running {command}"
#: What a run that hit its timeout says (the CLI's log line; in the headline: TIMED_OUT).
TIMED_OUT_TEXT = "timed out after {seconds:g} s; everything it started was killed"
#: Appended to the headline when the run hit its timeout.
TIMED_OUT = " (" + TIMED_OUT_TEXT + ")"
#: Shown instead of a process when the kernel could not tell who sent a query.
UNATTRIBUTED = "not attributed: {reason}"
#: The outages every event has unless it says otherwise; texts leave them unsaid.
DEFAULT_OUTAGES = ("nxdomain", "refused")
#: The name of a DNS query past the proxy the kernel could not read (its event's rule says why).
UNREAD_NAME = "(name not read)"
#: Where a process got past the fence, in the terminal, annotations and summary: the cgroup
#: it was moved to (`cgroup /system.slice`), or the socket it made (`socket AF_PACKET/SOCK_RAW`).
ESCAPE_TARGET = "{protocol} {address}"
#: What a run's lost events (the kernel could not report them) are shown as.
LOST_TARGET = "(events lost)"
#: Before the process of a service's event (a fenced or adopted service).
SERVICE = "in service {name}: "
#: The run's process that called the service whose event this is.
CALLED_BY = "called by pid {pid} {cmdline}"
#: Before `pid N`, when it names the socket's owner, not surely the sender (EgressEvent.by_socket).
SOCKET_OWNER = "socket opened by "
#: Who listens at a local destination (a loopback or local address, a unix socket).
LISTENER = "listening there: {listener}"
#: How many connections a permitted contact stands for (`EgressEvent.connections`).
CONNECTIONS = "{count} connection{s}"


# --------------------------------------------------------------------------- destinations


def endpoint(address: str, port: int | None, protocol: str) -> str:
    """`ADDRESS:PORT/PROTO`; an IPv6 address in brackets, so its port stays readable;
    `unix:PATH` for a unix socket."""
    if protocol == "unix":
        return f"unix:{address}"
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


def target(event: EgressEvent) -> str:
    """What an event reached, as the terminal says it: a name (with its query type), an
    endpoint, or for DNS sent past the proxy both (`github.com (A) to 10.0.0.53:53/udp`)."""
    if event.is_escape:
        return ESCAPE_TARGET.format(protocol=event.protocol, address=event.address)
    if event.is_loss:
        return LOST_TARGET
    if event.address is None:
        return f"{event.domain} ({event.qtype})" if event.qtype else str(event.domain)
    where = endpoint(event.address, event.port, event.protocol)
    if event.qtype:  # a query the kernel could not judge may have no name read
        return f"{event.domain or UNREAD_NAME} ({event.qtype}) to {where}"
    return where


def report_target(event: EgressEvent) -> str:
    """What an event reached, as annotations and the step summary say it: the name, then
    the endpoint when there is one (`github.com 140.82.112.3:443/tcp`)."""
    if event.is_escape:
        return ESCAPE_TARGET.format(protocol=event.protocol, address=event.address)
    if event.is_loss:
        return LOST_TARGET
    if event.address is None:
        return f"{event.domain} ({event.qtype})" if event.qtype else str(event.domain)
    name = f"{event.domain} " if event.domain else ""
    return name + endpoint(event.address, event.port, event.protocol)


def destination(event: EgressEvent) -> str:
    """A contract line's key: the DNS name, or the endpoint contacted without one
    (`cgroup:PATH` for a process moved out of its fence, `socket:AF_PACKET/SOCK_RAW` for a
    raw socket it should not have had: a key has no spaces)."""
    if event.is_escape:
        return f"{event.protocol}:{event.address}"
    if event.is_loss:
        return "lost-events"
    if event.domain is not None or event.address is None:
        return str(event.domain)
    return endpoint(event.address, event.port, event.protocol)


# --------------------------------------------------------------------------- the terminal


#: What `check=True` says of a command that failed (`how`: see `failure_text`).
COMMAND_FAILED = "{command} {how}"
#: How many of the last stderr lines a command failure shows.
STDERR_TAIL = 20


def failure_text(command: str, returncode: int, stderr: str, timed_out_after: float | None) -> str:
    """A failed command, as `check=True` reports it: how it ended, then its stderr's tail."""
    if timed_out_after is not None:
        how = TIMED_OUT_TEXT.format(seconds=timed_out_after)
    elif returncode < 0:
        how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with {returncode}"
    lines = [COMMAND_FAILED.format(command=command, how=how)]
    tail = stderr.rstrip("\n").splitlines()[-STDERR_TAIL:]
    if tail:
        lines.append(f"stderr (last {len(tail)} lines):")
        lines.extend(f"  {line}" for line in tail)
    return "\n".join(lines)


#: A run whose process the kernel's OOM killer killed for the fence's memory limit.
OOM_KILLED = "hit its memory limit ({limit}): the kernel killed {victims} (out of memory)"
#: ... when the kernel's log did not name the process (unreadable, or another's record).
OOM_UNNAMED = "{count} process{es} of the run (the kernel's log did not say which)"
#: A run that the pids limit refused forks.
FORKS_REFUSED = "hit its pids limit ({limit}): the kernel refused {count} fork{s}"


def limits_text(usage: Usage) -> str:
    """What limits a run hit, naming the processes the kernel killed; '' when none."""
    parts = []
    if usage.oom_kills:
        named = [f"pid {pid} {cmdline}" for pid, cmdline in usage.oom_victims]
        unnamed = usage.oom_kills - len(named)
        if unnamed > 0:
            named.append(OOM_UNNAMED.format(count=unnamed, es="" if unnamed == 1 else "es"))
        limit = usage.limits.describe("memory")
        parts.append(OOM_KILLED.format(limit=limit, victims=", ".join(named)))
    if usage.forks_refused:
        count = usage.forks_refused
        limit = usage.limits.describe("pids")
        parts.append(FORKS_REFUSED.format(limit=limit, count=count, s="" if count == 1 else "s"))
    return "; ".join(parts)


def violation_headline(count: int, command: str) -> str:
    return VIOLATION_HEADLINE.format(count=count, s="" if count == 1 else "s", command=command)


def attempts(events: Sequence[EgressEvent]) -> list[list[EgressEvent]]:
    """Events grouped into attempts, in order: one per process, destination and kind.

    One `curl https://github.com/` asks A and AAAA, and glibc probes each address
    with a UDP connect before the TCP one: each is an event (the detail stays in
    `result.events`), but together they are one attempt to reach github.com.
    """
    groups: dict[tuple[object, ...], list[EgressEvent]] = {}
    for event in events:
        who = event.pid if event.pid is not None else event.unattributed
        key = (who, event.domain or event.address, event.blocked_at, event.verdict)
        groups.setdefault(key, []).append(event)
    return list(groups.values())


def _attempt_target(attempt: Sequence[EgressEvent]) -> str:
    """What an attempt reached: `github.com (A, AAAA)`, or each endpoint once."""
    first = attempt[0]
    if all(e.address is None and e.qtype for e in attempt):
        return f"{first.domain} ({', '.join(dict.fromkeys(str(e.qtype) for e in attempt))})"
    return ", ".join(dict.fromkeys(target(e) for e in attempt))


def format_event(event: EgressEvent, shown: str | None = None) -> list[str]:
    """The lines one event (or an attempt it heads, `shown` as its target) takes in a report."""
    shown = target(event) if shown is None else shown
    head = f"  {event.verdict:<8} {shown:<22} at {event.blocked_at or '-':<8}"
    count = ""
    if event.connections is not None:
        count = ", " + CONNECTIONS.format(
            count=event.connections, s="" if event.connections == 1 else "s"
        )
    if event.is_local:
        head += f" (local service{count})"
    elif event.address is not None and not event.qtype and not event.is_escape:
        learned = f", learned from {event.learned_from}" if event.learned_from else ""
        head += f" ({event.domain or 'no name'}{learned}{count})"
    if event.outage and event.outage not in DEFAULT_OUTAGES:
        head += f" [{event.outage}]"
    if event.rule:  # an escape's says who moved it, a loss how many
        head += f" {event.rule}" if event.is_escape or event.is_loss else f" rule {event.rule}"
    lines = [head.rstrip()]
    service = SERVICE.format(name=event.service) if event.service else ""
    if event.pid is None:
        reason = UNATTRIBUTED.format(reason=event.unattributed or "unknown")
        lines.append(f"{'':11}{service}{reason}")
    else:
        owner = SOCKET_OWNER if event.by_socket else ""
        lines.append(f"{'':11}{service}{owner}pid {event.pid}  {event.cmdline or '?'}")
    lines.extend(f"{'':11}via pid {pid} {cmdline}" for pid, cmdline in event.ancestry)
    if event.called_by:
        (pid, cmdline), *chain = event.called_by
        lines.append(f"{'':11}{CALLED_BY.format(pid=pid, cmdline=cmdline)}")
        lines.extend(f"{'':11}via pid {pid} {cmdline}" for pid, cmdline in chain)
    if event.listener:
        lines.append(f"{'':11}{LISTENER.format(listener=event.listener)}")
    return lines


def format_violations(
    violations: list[EgressEvent], command: str, timed_out_after: float | None = None
) -> str:
    grouped = attempts(violations)
    lines = [violation_headline(len(grouped), command)]
    if timed_out_after is not None:
        lines[0] += TIMED_OUT.format(seconds=timed_out_after)
    for attempt in grouped:
        lines.extend(format_event(attempt[0], _attempt_target(attempt)))
    return "\n".join(lines)


def annotation_message(event: EgressEvent, command: str) -> str:
    """A GitHub annotation's message for one violation (before workflow-command escaping)."""
    service = SERVICE.format(name=event.service) if event.service else ""
    return (
        f"{report_target(event)} {event.verdict} at {event.blocked_at or '-'}: "
        f"{service}{event.cmdline or 'unattributed'} (while running {command})"
    )


# --------------------------------------------------------------------------- the CLI's log


def firewall_method(kind: str) -> str:
    """The log's `firewallMethod` for a policy kind."""
    return "allowlist" if kind == "egress_only" else "blocklist"


def verdict_word(event: EgressEvent) -> str:
    if event.verdict == "blocked":
        return "BLOCKED"
    if not event.forbidden:
        return "ALLOWED"
    # Forbidden but let through: audit mode (no outage), or a name resolved on purpose so
    # that its connections meet the reset/blackhole outage.
    return "AUDITED" if event.outage is None else "FORBIDDEN"


def log_line(event: EgressEvent, method: str) -> str:
    """One event in the key=value shape of GitHub's published fence.

    DNS through the proxy: `reason=FromDNSRequest`; a DNS query sent past the
    proxy and judged in the packet: `reason=FromDNSBypass` with the resolver's
    address; a connection or datagram: `reason=FromConnect` (at connect/sendmsg)
    or `FromPacket` (the backstop); a contact with a local service:
    `LOCAL ... reason=FromLocalContact` with `listener=`; a process moved out of its fence:
    `CGROUP BLOCKED reason=FromCgroupEscape` with `cgroup=PATH` and, when another
    process moved it, `movedBy=PID`; a raw or packet socket a fence does not allow:
    `SOCKET BLOCKED reason=FromRawSocket` with `socket=FAMILY/TYPE`. Fields that
    GitHub's line lacks come after `firewallMethod`, so its shape stays a prefix.
    """
    level = "WARN" if event.forbidden else "INFO"
    if event.is_escape:
        kind = event.protocol.upper()
        reason = "FromRawSocket" if event.protocol == "socket" else "FromCgroupEscape"
    elif event.is_loss:
        kind, reason = "KERNEL", "EventsLost"
    elif event.is_local:
        kind, reason = "LOCAL", "FromLocalContact"
    elif event.address is None:
        kind, reason = "DNS", "FromDNSRequest"
    elif event.qtype is not None:
        kind, reason = "DNS", "FromDNSBypass"
    else:
        kind, reason = "CONN", "FromPacket" if event.blocked_at == "packet" else "FromConnect"
    fields = [
        f"reason={reason}",
        f"blocked={'true' if event.verdict == 'blocked' else 'false'}",
        f"blockedAt={event.blocked_at or 'none'}",
    ]
    if event.domain:
        fields.append(f"domain={event.domain.rstrip('.')}.")
    if event.is_escape:
        fields.append(f"{event.protocol}={logfmt_value(event.address or '')}")
    elif event.address is not None:
        fields += [f"address={event.address}", f"port={event.port}", f"protocol={event.protocol}"]
    fields.append(f"pid={event.pid if event.pid is not None else 'unknown'}")
    fields.append(f"cmd={quoted(event.cmdline or '')}")
    fields.append(f"firewallMethod={method}")
    if event.outage and event.outage not in DEFAULT_OUTAGES:
        fields.append(f"outage={event.outage}")
    if event.qtype:
        fields.append(f"qtype={event.qtype}")
    if event.learned_from:
        fields.append(f"learnedFrom={logfmt_value(event.learned_from)}")
    if event.moved_by is not None:
        fields.append(f"movedBy={event.moved_by}")
    if event.listener:
        fields.append(f"listener={quoted(event.listener)}")
    if event.service:
        fields.append(f"service={logfmt_value(event.service)}")
    if event.called_by:
        fields.append(f"calledBy={event.called_by[0][0]}")
    if event.pid is None:
        fields.append(f"unattributed={logfmt_value(event.unattributed or 'unknown')}")
    return f"{level} {kind} {verdict_word(event)} " + " ".join(fields)


def quoted(text: str) -> str:
    """A logfmt quoted value (JSON string rules: `"`, `\\` and control characters escaped)."""
    return json.dumps(text, ensure_ascii=False)


def logfmt_value(text: str) -> str:
    """A value as logfmt writes it: bare when it can be, else quoted."""
    bare = text and not any(c.isspace() or c in '"=\\' for c in text)
    return text if bare else quoted(text)
