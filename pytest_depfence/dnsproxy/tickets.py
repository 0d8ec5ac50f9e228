"""Where each query is between its bytes being read and its observation: what `drain()` waits for.

A ticket is opened when a query's bytes are taken from a TCP connection, and is
``judging`` while the judge decides and (for a verdict that needs no upstream)
observes. A query forwarded upstream is ``upstream``: nothing the fence controls
is left to do until its answer comes, so `drain()` does not wait for it; whoever
claims it first observes it, the thread with the upstream's answer or `drain()`
(with `query`'s verdict), and only that one: every query is observed once.
A UDP query is judged on the loop thread that reads it, before the loop reads
the next datagram (drain() starts once the loop has none left): it gets a ticket
only when it is forwarded (`open_upstream`).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .types import Query, Transport

JUDGING = "judging"
UPSTREAM = "upstream"
OBSERVING = "observing"


@dataclass(eq=False)
class Ticket:
    seq: int
    transport: Transport
    state: str = JUDGING
    query: Query | None = None
    verdict: Any = None  # `query`'s verdict, once the query went upstream


class Tickets:
    """The open tickets; `changed` (the proxy's condition) is notified on every change."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._seq = itertools.count(1)
        self._open: dict[int, Ticket] = {}
        #: The newest ticket's number.
        self.last = 0

    def open(self, transport: Transport) -> Ticket:
        with self._changed:
            ticket = Ticket(next(self._seq), transport)
            self.last = ticket.seq
            self._open[ticket.seq] = ticket
            return ticket

    def open_upstream(self, transport: Transport, query: Query, verdict: Any) -> Ticket:
        """`open` then `upstream` in one step: a query judged and about to be forwarded."""
        with self._changed:
            ticket = Ticket(next(self._seq), transport, UPSTREAM, query, verdict)
            self.last = ticket.seq
            self._open[ticket.seq] = ticket
            return ticket  # nothing waits for one: drain() waits for judging and observing

    def upstream(self, ticket: Ticket, query: Query, verdict: Any) -> None:
        """The query is forwarded: drain() stops waiting for it."""
        with self._changed:
            ticket.query, ticket.verdict, ticket.state = query, verdict, UPSTREAM
            self._changed.notify_all()

    def claim(self, ticket: Ticket) -> bool:
        """The right to observe a forwarded query: True for the first caller only."""
        with self._changed:
            if ticket.state != UPSTREAM:
                return False
            ticket.state = OBSERVING
            return True

    def close(self, ticket: Ticket) -> None:
        with self._changed:
            self._open.pop(ticket.seq, None)
            self._changed.notify_all()

    def busy(self, cutoff: int) -> Counter[str]:
        """Tickets up to `cutoff` still being judged or observed, by transport."""
        with self._changed:
            return Counter(
                t.transport
                for seq, t in self._open.items()
                if seq <= cutoff and t.state in (JUDGING, OBSERVING)
            )

    def claim_forwarded(self, cutoff: int) -> list[Ticket] | None:
        """None while a ticket up to `cutoff` is being judged or observed; else the right to
        observe every one up to `cutoff` still waiting for the upstream, taken at once."""
        with self._changed:
            mine = []
            for seq, ticket in self._open.items():
                if seq > cutoff:
                    continue
                if ticket.state != UPSTREAM:
                    return None
                mine.append(ticket)
            for ticket in mine:
                ticket.state = OBSERVING
            return mine
