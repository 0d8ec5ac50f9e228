"""`drain()`: how a fence knows every query of a finished run has been observed.

`Draining` is that part of `DnsProxy` (a mixin, as `TcpClients` is: it uses the
proxy's state). A drain starts once nothing waits unread on a listener and the loop
is not reading one (so every query that reached the proxy is read, or on a
connection it sees), and never waits for the upstream: a query still waiting for its
answer is observed by drain() itself, with the verdict `query` gave it.
"""

from __future__ import annotations

import select
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .connection import Connection
from .tickets import Tickets
from .types import Query

#: drain() cannot be woken by bytes arriving on a client connection, so it re-checks
#: the connections at this interval while it waits.
DRAIN_POLL = 0.005


class Draining:
    """The proxy's drain()."""

    # The proxy's state this part reads (set by DnsProxy.__init__ and start()).
    _started: bool
    _stopped: bool
    _reading: bool
    _state: threading.Condition
    _tickets: Tickets
    _conn_last: int
    _connections: dict[int, Connection]
    _listen_poll: select.poll

    if TYPE_CHECKING:  # DnsProxy's

        def _observe(self, query: Query, verdict: Any) -> None: ...

    def drain(self, timeout: float = 5.0) -> None:
        """Return once every query that reached the proxy before this call is observed.

        Observing is all it waits for, never the upstream: a query still waiting
        for its upstream answer is observed here, with the verdict `query` gave
        it (its client, killed with its run, would not see the answer anyway).
        Raises TimeoutError if that takes longer than ``timeout`` seconds.
        """
        if not self._started or self._stopped:
            return
        deadline = time.monotonic() + timeout
        with self._state:
            while not self._listeners_read():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # The loop is still busy with what came before: say with what.
                    raise self._drain_timeout(timeout, self._tickets.busy(self._tickets.last), -1)
                self._state.wait(min(remaining, DRAIN_POLL))
            conn_cutoff = self._conn_last
        cutoff: int | None = None
        while True:
            with self._state:
                conns = [c for seq, c in self._connections.items() if seq <= conn_cutoff]
            tcp_left = sum(1 for conn in conns if not conn.idle())
            if tcp_left == 0 and cutoff is None:
                cutoff = self._tickets.last  # every query read so far has its ticket
            if cutoff is not None:
                # Nothing being judged or observed, and what waits for the upstream
                # claimed, in one step: no answer can start observing in between.
                claimed = self._tickets.claim_forwarded(cutoff)
                if claimed is not None:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = self._tickets.busy(self._tickets.last if cutoff is None else cutoff)
                raise self._drain_timeout(timeout, busy, tcp_left)
            with self._state:
                self._state.wait(min(remaining, DRAIN_POLL))
        for ticket in claimed:
            try:
                assert ticket.query is not None
                self._observe(ticket.query, ticket.verdict)
            finally:
                self._tickets.close(ticket)

    def _listeners_read(self) -> bool:
        """No datagram or connection waits on a listener, and the loop is not judging or
        registering one it took: every query that reached the proxy is read, or on a
        connection drain() sees. Readable is checked before `_reading` (the loop sets it
        before it reads), as `Connection.idle` does; under `_state`, one poll at a time."""
        return not self._listen_poll.poll(0) and not self._reading

    @staticmethod
    def _drain_timeout(timeout: float, busy: Counter[str], tcp_left: int) -> TimeoutError:
        connections = f" and {tcp_left} TCP connections" if tcp_left >= 0 else ""
        return TimeoutError(
            f"DNS proxy drain timed out after {timeout}s: {busy['udp']} UDP queries, "
            f"{busy['tcp']} TCP queries{connections} still being judged or observed"
        )
