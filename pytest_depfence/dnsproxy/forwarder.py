"""UDP queries to the upstream over one persistent socket, answers matched back to them.

Each forwarded query is sent under an id of its own (random, unique among the
queries waiting), so the answers of many clients can share one connected
socket; an answer is matched by that id *and* its question, and leaves with
the client's id restored, otherwise byte for byte. A datagram that matches no
waiting query (a late answer, one with a wrong id or another question) is dropped: its query
gets SERVFAIL when the upstream timeout expires, never an answer nobody
matched. A datagram under a waiting query's id that is no answer (too short,
QR clear) fails that query at once; one whose question cannot be read goes to
the judge as that query's answer (it judges record by record, and what it
cannot read is answered SERVFAIL); a refused upstream (ICMP port unreachable)
fails every waiting query.

Owned by the proxy's loop thread: nothing here takes a lock.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import wire
from .tickets import Ticket

_ID = struct.Struct("!H")
# Queries waiting for the upstream at once; past that a query gets SERVFAIL at once
# (ids are 16 bits, and a resolver this far behind is failing anyway).
MAX_WAITING = 16384
_BUFFER = 4 << 20


@dataclass(eq=False)
class Waiting:
    """A query sent upstream: its ticket, its question, and where the answer goes."""

    ticket: Ticket
    question: wire.Question
    reply_to: Callable[[Optional[bytes]], None]  # sends the client its reply (None: nothing)
    deadline: float
    upstream_id: int = 0
    done: bool = field(default=False)


class UdpUpstream:
    """The persistent upstream socket and the queries waiting for its answers."""

    def __init__(self, family: int, addr: tuple[Any, ...], timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                self.sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
            # Connected: only the upstream's datagrams arrive here, and an ICMP port
            # unreachable from a dead upstream comes back as ConnectionRefusedError.
            self.sock.connect(addr)
        except BaseException:
            self.sock.close()
            raise
        self._waiting: dict[int, Waiting] = {}
        self._order: deque[Waiting] = deque()  # by deadline: one timeout for all
        self._queued: list[tuple[bytes, Waiting]] = []  # taken, not yet sent

    def close(self) -> None:
        self.sock.close()

    def queue(self, data: bytes, waiting: Waiting) -> bool:
        """Take a query to forward (`flush` sends it); False: no room (the caller answers
        SERVFAIL)."""
        if len(self._waiting) >= MAX_WAITING:
            return False
        upstream_id = random.getrandbits(16)
        while upstream_id in self._waiting:
            upstream_id = random.getrandbits(16)
        waiting.upstream_id = upstream_id
        self._waiting[upstream_id] = waiting
        self._order.append(waiting)
        self._queued.append((_ID.pack(upstream_id) + data[2:], waiting))
        return True

    def flush(self) -> list[Waiting]:
        """Send the queued queries, back to back; those that could not be sent (a refused
        or unreachable upstream, a full buffer) are returned, to be answered SERVFAIL."""
        failed: list[Waiting] = []
        send = self.sock.send
        for packet, waiting in self._queued:
            if waiting.done:
                continue  # failed with the rest below
            try:
                send(packet)
            except ConnectionRefusedError:
                # An earlier query's ICMP port unreachable: nothing listens upstream, and
                # every query sent or queued for it has failed (the error came once, for
                # one of them; the others would wait for their timeout).
                failed.extend(self._take_all())
            except OSError:
                self._finish(waiting)
                failed.append(waiting)
        self._queued.clear()
        return failed

    def receive(self) -> list[tuple[Waiting, bytes | None]]:
        """Answers that arrived, with the client's id restored (None: SERVFAIL it)."""
        out: list[tuple[Waiting, bytes | None]] = []
        while True:
            try:
                data = self.sock.recv(wire.MAX_MESSAGE)
            except BlockingIOError:
                return out
            except ConnectionRefusedError:
                # Nothing listens at the upstream: every waiting query has failed.
                out.extend((w, None) for w in self._take_all())
                continue
            except OSError:
                out.extend((w, None) for w in self._take_all())
                return out
            matched = self._match(data)
            if matched is not None:
                out.append(matched)
            if not self._waiting:
                # Nothing more is expected (a lone query's answer): no read to EAGAIN. What
                # else came (a late answer) keeps the socket readable for the next round.
                return out

    def _match(self, data: bytes) -> tuple[Waiting, bytes | None] | None:
        if len(data) < 2:
            return None
        (upstream_id,) = _ID.unpack_from(data)
        waiting = self._waiting.get(upstream_id)
        if waiting is None:
            return None  # late, or an id we never sent: dropped
        raw = waiting.question.raw
        if len(data) >= wire.HEADER.size:
            qdcount = _ID.unpack_from(data, 4)[0]
            end = wire.HEADER.size + len(raw)
            if (
                qdcount == 1
                and not _same_question(data[wire.HEADER.size : end], raw)
                and wire.read_labels(data) is not None
            ):
                return None  # another question under this id: not this query's answer
        # Ours, or an answer whose question cannot be read: the judge reads it record by
        # record, and what it cannot read is never passed on.
        self._finish(waiting)
        reply = _ID.pack(waiting.question.txid) + data[2:]
        try:
            wire.check_reply(reply, waiting.question.txid)
        except wire.UpstreamFailure:
            return waiting, None
        return waiting, reply

    def expire(self, now: float) -> list[Waiting]:
        """Queries whose upstream timeout has passed (they get SERVFAIL)."""
        expired = []
        order = self._order
        while order and (order[0].done or order[0].deadline <= now):
            waiting = order.popleft()
            if not waiting.done:
                self._finish(waiting)
                expired.append(waiting)
        return expired

    def next_timeout(self, now: float) -> float | None:
        """Seconds until the next query's upstream timeout; None: none is waiting."""
        order = self._order
        while order and order[0].done:
            order.popleft()
        if not order:
            return None
        return max(order[0].deadline - now, 0.0)

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def drop_all(self) -> None:
        """Forget every query, waiting or queued: their answers, should they come, match
        nothing (a parked proxy's: `DnsProxy.park`)."""
        self._take_all()
        self._order.clear()
        self._queued.clear()

    def _finish(self, waiting: Waiting) -> None:
        waiting.done = True
        self._waiting.pop(waiting.upstream_id, None)

    def _take_all(self) -> list[Waiting]:
        taken = list(self._waiting.values())
        for waiting in taken:
            waiting.done = True
        self._waiting.clear()
        return taken


def _same_question(answered: bytes, asked: bytes) -> bool:
    # A resolver may echo the name in another case (0x20 randomisation); type and
    # class must be the same bytes.
    if answered == asked:
        return True
    return (
        len(answered) == len(asked)
        and answered[-4:] == asked[-4:]
        and answered[:-4].lower() == asked[:-4].lower()
    )
