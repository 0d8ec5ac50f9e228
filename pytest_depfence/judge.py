"""Every verdict of a fence, and the event that records it.

The judge turns (policy, mode, outage, what the fence has learned of
addresses) plus a DNS query, an upstream answer, a connection the kernel
reported, or a query the kernel caught past the proxy into a verdict and an
`EgressEvent`; a process moved out of its fence is an event too, always a
violation. It is pure: no threads, no kernel, no sockets. What it learns of
addresses goes to an `AddressBook`, whose sink (the kernel's address trie) is
handed in; who did it (an `Attribution`) is handed in too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dnslib import QTYPE

from . import outages
from .addresses import (
    FROM_DNS,
    FROM_HOSTS,
    FROM_RULE,
    FROM_UPSTREAM,
    AddressBook,
    IPAddress,
    Learned,
    UnreadableAnswer,
    parse_answer,
)
from .events import BlockedAt, EgressEvent
from .policy import Policy, Rule
from .procinfo import Attribution

if TYPE_CHECKING:
    from .dnsproxy import Query
    from .kernel import BypassEvent, ConnEvent, EscapeEvent

#: Why a packet the backstop dropped names no process.
OWNERLESS = (
    "a socket whose owner the kernel does not know: no hook of the fence saw it made or "
    "used (it predates the fence's programs, or came from outside), or its record was "
    "evicted (more sockets than the kernel's map holds)"
)
#: An escape's rule: who moved the process out of its fence.
MOVED_ITSELF = "moved itself out of the fence"
MOVED_BY = "moved out of the fence by {mover}"
STARTED_BY = "started outside the fence by {mover}"
#: The rule of a raw or packet socket made in a fence without raw_sockets (escape.c).
RAW_SOCKET_TAKEN = (
    "made a socket {socket}, which passes below the fence's hooks: CAP_NET_RAW came back "
    "through a user namespace (fence(raw_sockets=True) allows raw sockets)"
)
#: The rule of a DNS query past the proxy that the kernel could not judge (dropped, or
#: let through in audit mode): `reason` is kernel.abi.UNJUDGED_TEXTS's.
UNJUDGED_QUERY = "a DNS query the fence cannot judge ({reason})"
#: An upstream answer the fence could not read: the client got SERVFAIL instead.
UNJUDGED = "the upstream's answer could not be read, so the client got SERVFAIL instead"
#: The outage an unjudged answer meets.
UNJUDGED_OUTAGE = "servfail"
#: Events the kernel could not report for a member of a run (a ring buffer was full).
LOST = (
    "the kernel could not report {count} event(s) of {member} (a ring buffer was full): "
    "what they recorded is unknown, so the run is not vouched for"
)
#: Queries to the fence's proxy the kernel dropped unread (a receive buffer was full).
DROPPED_QUERIES = (
    "the kernel dropped {count} DNS quer{ies} to the fence's proxy unread (its receive "
    "buffer was full): what they asked is unknown, so the run is not vouched for"
)
#: Why a loss names no process.
LOST_WHO = "lost events name no process"
#: The rule of a contact with a local service outside the fence that egress_only forbids:
#: `pattern` is the local:/unix: pattern that would allow it.
LOCAL_OUTSIDE = (
    '{policy}: a local service outside the fence (fence or adopt it, or allow "{pattern}")'
)


@dataclass(frozen=True)
class DnsVerdict:
    """A DNS query's fate: what the proxy answers, and what the report says."""

    #: Answered with the outage instead of the real answer.
    blocked: bool
    #: The policy forbids it (also in audit mode, also when it still resolves).
    forbidden: bool
    #: The outage answer's rcode when blocked; None: the query is never answered.
    rcode: int | None = None
    #: The rule that decided (None with `forbidden`: egress_only, nothing allowed it).
    rule: Rule | None = None
    #: The CNAME target that made an allowed name forbidden.
    via_cname: str | None = None
    #: The upstream's answer could not be read: replaced by SERVFAIL (see `Judge.answer`).
    unjudged: bool = False


ALLOWED = DnsVerdict(blocked=False, forbidden=False)


class Judge:
    """One fence's verdicts: a policy, a mode, an outage, and what it has learned."""

    def __init__(self, policy: Policy, mode: str, outage: str, book: AddressBook) -> None:
        self.policy = policy
        self.mode = mode
        self.outage = outages.OUTAGES[outage]
        self.book = book
        #: What a learned address of a name in the policy gets.
        self._learned_verdict = "block" if policy.kind == "no_egress" else "allow"

    # -- learning addresses ---------------------------------------------------------
    def learn_rules(self) -> None:
        """Address rules, judged as written."""
        for rule in self.policy.rules:
            if rule.network is not None:
                self.book.judge(rule.network, self._learned_verdict)

    def names_to_preresolve(self) -> list[str]:
        """The blocked names whose addresses the fence learns from the upstream at open."""
        if self.policy.kind != "no_egress":
            return []
        return [r.name for r in self.policy.rules if r.kind == "name" and r.name]

    def learn_upstream(self, name: str, addresses: Iterable[IPAddress]) -> None:
        for address in addresses:
            self.book.learn(address, name, FROM_UPSTREAM, "block")

    def learn_hosts(self, entries: Iterable[tuple[IPAddress, tuple[str, ...]]]) -> None:
        """A hosts file's addresses: judged for the names the policy names, noted for others."""
        for address, names in entries:
            if address.is_loopback:
                continue
            for name in names:
                in_policy = self.policy.check_name(name).blocked == (
                    self.policy.kind == "no_egress"
                )
                if in_policy:
                    self.book.learn(address, name, FROM_HOSTS, self._learned_verdict)
                else:
                    self.book.note(address, name, FROM_HOSTS)

    # -- DNS --------------------------------------------------------------------------
    def _forbidden(self, rule: Rule | None, via_cname: str | None = None) -> DnsVerdict:
        # A connect-level outage lets the name resolve; audit mode blocks nothing.
        blocked = self.mode == "block" and self.outage.layer == "dns"
        return DnsVerdict(blocked, True, self.outage.rcode, rule, via_cname)

    def query(self, name: str) -> DnsVerdict:
        """A query's name, before anything is forwarded."""
        decision = self.policy.check_name(name)
        return self._forbidden(decision.rule) if decision.blocked else ALLOWED

    def answer(self, name: str, reply: bytes, verdict: DnsVerdict) -> DnsVerdict:
        """The upstream's answer to a query `query` let through, before the client sees it.

        Its addresses are learned first (so a connection can be judged the moment
        the client has them); a CNAME chain through a forbidden name forbids the
        query. Returns the verdict that stands.

        An answer whose chain cannot be read (`UnreadableAnswer`; a single bad
        address record is skipped, not that) is never passed on, in any mode: the
        client gets SERVFAIL and the event says so (`UNJUDGED`, blocked at dns).
        Under no_egress it is not a violation: nothing showed a blocked name, and an
        upstream's fault must not fail a deploy test; the user still sees the event.
        Under egress_only it is one: nothing showed the chain stays on the allowlist,
        and what cannot be shown allowed is forbidden there.
        """
        try:
            answer = parse_answer(reply)
        except UnreadableAnswer:
            forbidden = verdict.forbidden or self.policy.kind == "egress_only"
            return DnsVerdict(
                True, forbidden, outages.OUTAGES[UNJUDGED_OUTAGE].rcode, verdict.rule, unjudged=True
            )
        for cname in answer.names:
            # The query's own name was judged by `query`: forbidden is blocked there.
            decision = None if cname == name else self.policy.check_name(cname)
            if not (decision.blocked if decision else verdict.forbidden):
                continue
            for address in answer.addresses:
                if self.policy.kind == "no_egress":
                    self.book.learn(address, cname, FROM_DNS, "block")
                else:
                    self.book.note(address, cname, FROM_DNS)  # refused: never allowed
            if decision is None:
                return verdict
            return self._forbidden(decision.rule, via_cname=cname)
        for address in answer.addresses:  # every name of the chain is allowed
            if self.policy.kind == "egress_only":
                self.book.learn(address, name, FROM_DNS, "allow")
            else:
                self.book.note(address, name, FROM_DNS)
        return verdict

    def dns_event(self, query: Query, verdict: DnsVerdict, who: Attribution) -> EgressEvent:
        rule = None
        outage = self.outage.name if verdict.forbidden and self.mode == "block" else None
        if verdict.unjudged:
            rule, outage = UNJUDGED, UNJUDGED_OUTAGE
        elif verdict.forbidden:
            rule = self.policy.explain(verdict.rule)
            if verdict.via_cname:
                rule += f" via CNAME {verdict.via_cname}"
        return EgressEvent(
            domain=query.name,
            address=None,
            port=53,
            protocol=query.transport,
            verdict="blocked" if verdict.blocked else "allowed",
            blocked_at="dns" if verdict.blocked else None,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            qtype=query.qtype,
            unattributed=who.unattributed,
            by_socket=who.by_socket,
            forbidden=verdict.forbidden,
            outage=outage,
        )

    # -- what the kernel reports --------------------------------------------------------
    def _connection_rule(
        self, conn: ConnEvent, learned: list[Learned], name: str | None, origin: str | None
    ) -> tuple[str, str | None, str | None]:
        """(rule text, name, origin) of a refused (or would-be refused) address."""
        if self.policy.kind == "egress_only":
            return self.policy.explain(None), name, origin
        for entry in learned:
            if entry.name:
                decision = self.policy.check_name(entry.name)
                if decision.blocked:
                    return self.policy.explain(decision.rule), entry.name, origin
        # No blocked name owns it: an address rule refused it.
        return self.policy.explain(self.policy.check_address(conn.address).rule), name, FROM_RULE

    def connection(self, conn: ConnEvent, who: Attribution) -> EgressEvent:
        """A connection or datagram: refused, would-be refused (audit), or a first contact."""
        learned = self.book.names_of(conn.address)
        name = next((entry.name for entry in learned if entry.name), None)
        # Every way the address was learned: which one the process used is not known.
        origin = ", ".join(dict.fromkeys(entry.origin for entry in learned)) or None
        permitted = conn.action == "allowed"
        rule = None
        if not permitted:
            rule, name, origin = self._connection_rule(conn, learned, name, origin)
        blocked = conn.action not in ("audited", "allowed")
        at: BlockedAt = (
            "packet" if conn.action == "blackhole" or conn.where == "packet" else "connect"
        )
        return EgressEvent(
            domain=name,
            address=str(conn.address),
            port=conn.port,
            protocol=conn.protocol,
            verdict="blocked" if blocked else "allowed",
            blocked_at=at if blocked else None,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            unattributed=who.unattributed,
            by_socket=who.by_socket,
            forbidden=not permitted,
            outage=conn.action if blocked else None,
            learned_from=origin,
        )

    def bypass(self, query: BypassEvent, who: Attribution) -> EgressEvent:
        """A query sent past the proxy, dropped (or audited) in the kernel: for a forbidden
        name, or one the kernel could not judge (fail closed; `domain`: what it read)."""
        if query.unjudged is not None:
            domain = query.name.lower() or None
            rule = UNJUDGED_QUERY.format(reason=query.unjudged)
        else:
            domain = query.name
            rule = self.policy.explain(self.policy.check_name(query.name).rule)
        return EgressEvent(
            domain=domain,
            address=str(query.address),
            port=query.port,
            protocol=query.protocol,
            verdict="allowed" if query.audited else "blocked",
            blocked_at=None if query.audited else "packet",
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            qtype=str(QTYPE.get(query.qtype, f"TYPE{query.qtype}")) if query.qtype else "?",
            unattributed=who.unattributed,
            by_socket=who.by_socket,
            forbidden=True,
            outage=None if query.audited else "dropped",
            learned_from=None,
        )

    def local_contact(
        self,
        who: Attribution,
        *,
        address: str,
        port: int | None,
        protocol: str,
        listener: str,
        service: str | None,
    ) -> EgressEvent:
        """A contact with a local service (a loopback or local address, or a unix socket
        at `address`), always on record, never refused: the kernel let it through.

        Forbidden when a local:/unix: rule of a no_egress policy names it, or, under
        egress_only, when it reached a service outside the fence (`service` None: not a
        fenced or adopted one, whose own egress is judged instead) that no rule allows.
        """
        decision = self.policy.check_local(protocol, port, address)
        forbidden = decision.blocked and (self.policy.kind == "no_egress" or service is None)
        rule = None
        if forbidden and decision.rule is not None:
            rule = self.policy.explain(decision.rule)
        elif forbidden:
            pattern = f"unix:{address}" if protocol == "unix" else f"local:{port}"
            rule = LOCAL_OUTSIDE.format(policy=self.policy.explain(None), pattern=pattern)
        return EgressEvent(
            domain=None,
            address=address,
            port=port,
            protocol=protocol,
            verdict="allowed",
            blocked_at=None,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            unattributed=who.unattributed,
            by_socket=who.by_socket,
            forbidden=forbidden,
            listener=listener,
        )

    def lost(self, count: int, member: str) -> EgressEvent:
        """Events of `member` the kernel dropped: a violation in every mode (fail closed:
        one of them may have been a forbidden one)."""
        return self._loss(LOST.format(count=count, member=member))

    def dropped_queries(self, count: int) -> EgressEvent:
        """Queries the kernel dropped before the proxy read them: a violation in every
        mode, as lost events are (`lost`)."""
        return self._loss(DROPPED_QUERIES.format(count=count, ies="y" if count == 1 else "ies"))

    @staticmethod
    def _loss(rule: str) -> EgressEvent:
        return EgressEvent(
            domain=None,
            address=None,
            port=None,
            protocol="lost",
            verdict="blocked",
            blocked_at=None,
            rule=rule,
            pid=None,
            cmdline=None,
            unattributed=LOST_WHO,
            forbidden=True,
        )

    def escape(self, escape: EscapeEvent, who: Attribution, mover: str | None) -> EgressEvent:
        """A fenced process that got past the fence's hooks, and was killed for it: a
        violation in every mode (nothing it did out there could have been judged). It
        was moved to a cgroup outside its fence (or started there), or it made a raw or
        packet socket the fence does not allow (`protocol` "socket").

        `mover`: the process that moved it as text ("pid N command"), when another did.
        """
        itself = escape.writer == escape.pid
        protocol: BlockedAt
        if escape.raw_socket is not None:
            address, protocol = escape.raw_socket, "socket"
            rule = RAW_SOCKET_TAKEN.format(socket=escape.raw_socket)
        else:
            address, protocol = escape.dst_path or f"id:{escape.dst_id}", "cgroup"
            by = STARTED_BY if escape.born else MOVED_BY
            rule = MOVED_ITSELF if itself else by.format(mover=mover or f"pid {escape.writer}")
        return EgressEvent(
            domain=None,
            address=address,
            port=None,
            protocol=protocol,
            verdict="blocked",
            blocked_at=protocol,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            unattributed=who.unattributed,
            by_socket=who.by_socket,
            forbidden=True,
            outage="killed",
            moved_by=None if itself else escape.writer,
        )
