"""`DnsProxy`: its listeners on the loop, answering each query, forwarding.

UDP, nearly every query, is served by the process's one event loop thread
(`loop.py`, shared by every proxy): it reads a query, judges it, answers a
blocked one or sends it upstream over one persistent socket (`forwarder`) and
looks up its sender while the upstream works; when the answer comes it judges
it (its addresses reach the kernel map), answers the client, and only then
observes the query. One thread, no hand-offs: the judge's work is all a query
costs, and only the judging of the question and of the answer stands between
the client and its answer. TCP clients each get a thread, and their queries a
pool thread for the upstream, as a silent upstream must never hold a reader;
a pool thread joins the network namespace the proxy was started in (where its
connections to the upstream must be made), should the loop's be another.

``drain()`` (`drain.py`) is how a fence knows every query of a finished run has been
observed.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import TracebackType
from typing import Any, Callable

from . import listeners, wire
from .connection import Connection
from .drain import DRAIN_POLL, Draining
from .forwarder import UdpUpstream, Waiting
from .loop import LOOP
from .tcp import Send, TcpClients
from .tickets import Ticket, Tickets
from .types import DnsJudge, Query

__all__ = ["DnsProxy"]

# Datagrams read from one listener before the loop looks at the others.
_UDP_BATCH = 64
# TCP queries waiting for the upstream at once; more wait their turn (drain() never does).
_UPSTREAM_WORKERS = 32
_NETNS = "/proc/thread-self/ns/net"
_CLONE_NEWNET = 0x40000000


def _join_netns(netns: int) -> None:
    """Into the network namespace `netns` (an fd), unless this thread is there already."""
    if os.fstat(netns).st_ino == os.stat(_NETNS).st_ino:
        return
    if _libc().setns(netns, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot join the DNS proxy's network namespace: {os.strerror(err)}")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class DnsProxy(TcpClients, Draining):
    """A loopback DNS proxy that answers blocked names itself and forwards the rest.

    Every verdict comes from `judge` (see `DnsJudge`): a blocked query is answered
    at once, then observed; an allowed one is forwarded, its answer judged and
    passed on, then observed. Anything unexpected in a
    proxy thread, including an exception from the judge, is appended to
    ``errors`` and the proxy keeps serving (a query whose judging failed gets
    SERVFAIL); ``raise_errors()`` re-raises the first one in the caller's thread.
    """

    port: int
    has_ipv6: bool
    errors: list[BaseException]

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        judge: DnsJudge[Any],
        upstream_timeout: float = 2.0,
        host4: str = "127.0.0.1",
        host6: str | None = "::1",
    ) -> None:
        if upstream_timeout <= 0:
            raise ValueError(f"upstream_timeout must be positive, got {upstream_timeout!r}")
        self.upstream = upstream
        self.upstream_timeout = upstream_timeout
        self.host4 = host4
        self.host6 = host6
        self._judge = judge
        self.port = 0
        self.has_ipv6 = False
        self.errors = []

        self._upstream_family = socket.AF_INET
        self._upstream_addr: tuple[Any, ...] = upstream
        self._listeners: listeners.Listeners | None = None
        self._started = False
        self._stopped = False
        self._stopping = threading.Event()
        #: The network namespace start() ran in (an fd), which TCP forwards are made in,
        #: and its inode: which namespace a parked proxy may serve again (`parking`).
        self._netns = -1
        self.netns_id = 0
        #: The loop's handlers of its sockets (`start`; `resume` gives them again).
        self._handlers: dict[int, Callable[[], None]] = {}
        #: What its listeners had dropped when it last started serving (`dropped`).
        self._drops_before = 0
        self._udp_upstream: UdpUpstream | None = None
        # TCP queries' own connections to the upstream, cut by stop().
        self._tcp_upstreams: set[socket.socket] = set()
        self._upstream_pool: ThreadPoolExecutor | None = None
        self._observer_lock = threading.Lock()
        self._errors_lock = threading.Lock()
        # Guards the tickets and connections; drain() waits on it.
        self._state = threading.Condition()
        self._tickets = Tickets(self._state)
        self._conn_seq = itertools.count(1)
        self._conn_last = 0
        self._connections: dict[int, Connection] = {}
        # True while the loop reads a listener (a datagram or a connection taken from it
        # is not yet judged or registered); drain() reads it after the listeners.
        self._reading = False
        self._listen_poll = select.poll()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> DnsProxy:
        """Bind the listeners on one free port and start serving (`loop.LOOP`); what a
        failure left made is closed before it is raised."""
        if self._started:
            raise RuntimeError("DnsProxy.start() called twice")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        host, port = self.upstream
        # Resolved once here so that a bad upstream fails the fence at start,
        # not as a SERVFAIL in the middle of a run.
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._upstream_family = family
        self._upstream_addr = addr
        bound = listeners.bind(self.host4, self.host6)
        self._listeners, self.port, self.has_ipv6 = bound, bound.port, bound.has_ipv6
        for sock in (*bound.udp, *bound.tcp):
            self._listen_poll.register(sock, select.POLLIN)
        forwarder = self._udp_upstream = UdpUpstream(family, addr, self.upstream_timeout)
        self._netns = os.open(_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        self.netns_id = os.fstat(self._netns).st_ino
        self._upstream_pool = self._new_pool()
        self._handlers = {forwarder.sock.fileno(): self._read_upstream}
        for sock in bound.udp:
            self._handlers[sock.fileno()] = partial(self._read_udp, sock, bound.port)
        for sock in bound.tcp:
            self._handlers[sock.fileno()] = partial(self._accept, sock)
        LOOP.add(self, self._handlers)

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(
            max_workers=_UPSTREAM_WORKERS,
            thread_name_prefix="depfence-dns-upstream",
            initializer=self._pool_thread_started,
        )

    def dropped(self) -> int:
        """Queries the kernel dropped before the proxy could read them (its UDP listeners'
        receive buffers were full), since it started: each unread, unjudged, unanswered."""
        if self._listeners is None or self._stopped:
            return 0
        return self._listeners.dropped() - self._drops_before

    def stop(self) -> None:
        """Leave the loop, close every socket and join every thread of its own; safe to call
        more than once."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._quiesce()
        # Queries still waiting for the upstream are dropped with it: teardown never
        # waits for the upstream (drain() has observed them).
        if self._listeners is not None:
            self._listeners.close()
        if self._udp_upstream is not None:
            self._udp_upstream.close()
        if self._netns >= 0:
            os.close(self._netns)

    def park(self) -> bool:
        """Stop serving and keep the sockets, for another fence in this network namespace
        (`resume`; `parking` keeps it): what `stop` does but close them, the queries still
        waiting for the upstream dropped as it drops them. False when it is stopped or has
        recorded an error (its caller stops it)."""
        if self._stopped or not self._started:
            return False
        self._quiesce()
        if self.errors:  # before or while it quiesced: the next fence would raise it
            return False
        assert self._udp_upstream is not None
        self._udp_upstream.drop_all()
        return True

    def resume(self, judge: DnsJudge[Any]) -> DnsProxy:
        """Serve again, a parked proxy (`park`), with `judge`: what reached its port while
        it was parked is nobody's, and is thrown away unread."""
        assert self._listeners is not None and not self._stopped
        self._judge = judge
        self._stopping = threading.Event()
        self._tickets = Tickets(self._state)
        self._upstream_pool = self._new_pool()
        if self._listen_poll.poll(0):  # mostly nothing: one poll, not a read of each
            self._listeners.discard_waiting()
        self._drops_before = self._listeners.dropped()
        LOOP.add(self, self._handlers)
        return self

    def _quiesce(self) -> None:
        """Leave the loop, cut every TCP client and upstream connection and join their
        threads, the pool's too: nothing of this proxy runs any more (`stop`, `park`)."""
        self._stopping.set()
        LOOP.remove(self)
        with self._state:
            connections = list(self._connections.values())
        for conn in connections:
            with conn.lock:
                if not conn.done:
                    try:
                        # Wakes the handler's poll() with EOF; close() alone would not.
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for conn in connections:
            # A reader waits for its queries' upstream answers before it closes: cut
            # them short (a forward is refused once stopping is set), never wait.
            while conn.thread is not None and conn.thread.is_alive():
                self._cut_tcp_upstreams()
                conn.thread.join(DRAIN_POLL)
        if self._upstream_pool is not None:
            self._upstream_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DnsProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def raise_errors(self) -> None:
        """Re-raise the first error recorded in a proxy thread, if any."""
        with self._errors_lock:
            first = self.errors[0] if self.errors else None
        if first is not None:
            raise first

    def _record(self, exc: BaseException) -> None:
        with self._errors_lock:
            self.errors.append(exc)

    def _pool_thread_started(self) -> None:
        """A pool thread starts in the namespaces of the thread that made it (a TCP
        client's reader, made by the loop thread); its connections to the upstream must
        be made in the proxy's network namespace. Should it fail, the pool takes no more
        queries: each is answered SERVFAIL (`_decide`)."""
        try:
            _join_netns(self._netns)
        except BaseException as exc:
            self._record(exc)
            raise

    def _next_timeout(self, now: float) -> float | None:
        """Seconds until the next UDP query waiting for the upstream times out (the loop)."""
        assert self._udp_upstream is not None
        return self._udp_upstream.next_timeout(now)

    def _expire(self, now: float) -> None:
        """SERVFAIL the UDP queries whose upstream answer is overdue (the loop)."""
        assert self._udp_upstream is not None
        expired = self._udp_upstream.expire(now)
        if expired:
            self._answer([(waiting, None) for waiting in expired])

    # -- UDP, on the loop thread ---------------------------------------------------

    def _read_udp(self, sock: socket.socket, listen_port: int) -> None:
        # In the order they came, each judged (a blocked one answered) before the next is
        # read. The first allowed one goes upstream at once (a lone query waits for
        # nothing, and the upstream wakes while the rest are judged); the rest go back to
        # back at the end (one wake-up of the upstream for the lot, not one each).
        self._reading = True
        forwarder = self._udp_upstream
        assert forwarder is not None
        queued: list[Waiting] = []
        failed: list[Waiting] = []
        try:
            for _ in range(_UDP_BATCH):
                try:
                    data, addr = sock.recvfrom(wire.MAX_MESSAGE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    # A stale ICMP error for an earlier reply; the listener is fine.
                    continue
                try:
                    waiting = self._query_udp(sock, data, addr, listen_port)
                except Exception as exc:
                    self._record(exc)
                    continue
                if waiting is not None:
                    queued.append(waiting)
                    if len(queued) == 1:
                        failed = forwarder.flush()
        finally:
            try:
                self._forward(queued, failed)
            finally:
                self._read_done()

    def _read_done(self) -> None:
        """The loop has judged what it read from a listener (drain() may be waiting)."""
        with self._state:
            self._reading = False
            self._state.notify_all()

    def _query_udp(
        self, sock: socket.socket, data: bytes, addr: tuple[Any, ...], listen_port: int
    ) -> Waiting | None:
        """Answer a datagram now (an error reply, a blocked name, no room upstream), or
        queue it for the upstream (`_forward` sends it)."""
        send = partial(self._send_udp, sock, addr)
        question = wire.read_question(data)
        if not isinstance(question, wire.Question):
            send(question)  # an error reply, or nothing
            return None
        query = Query(question.name, question.qtype, "udp", (addr[0], addr[1]), listen_port,
                      question.txid, time.monotonic_ns())  # fmt: skip
        verdict = self._judge_query(query, question, send)
        if verdict is None:
            return None
        forwarder = self._udp_upstream
        assert forwarder is not None
        ticket = self._tickets.open_upstream("udp", query, verdict)
        waiting = Waiting(ticket, question, send, forwarder.deadline())
        if forwarder.queue(data, waiting):
            return waiting
        self._sender(query)
        self._answer([(waiting, None)])
        return None

    def _forward(self, queued: list[Waiting], failed: list[Waiting]) -> None:
        """Send upstream what is queued and not yet sent, then look up the senders of
        `queued` while the upstream works (their answers are read after this returns: each
        flow entry still names its sender). Those the upstream socket refused (`failed`,
        sent already, and any now) get SERVFAIL."""
        if not queued:
            return
        assert self._udp_upstream is not None
        failed = failed + self._udp_upstream.flush()
        for waiting in queued:
            assert waiting.ticket.query is not None
            self._sender(waiting.ticket.query)
        self._answer([(waiting, None) for waiting in failed])

    def _read_upstream(self) -> None:
        assert self._udp_upstream is not None
        self._answer(self._udp_upstream.receive())

    def _answer(self, answered: list[tuple[Waiting, bytes | None]]) -> None:
        """Upstream answers to UDP queries (None: it failed): all judged, then all replies
        sent back to back, then the queries observed."""
        replies = []
        for waiting, answer in answered:
            reply, verdict = self._conclude(waiting.ticket, waiting.question, answer)
            replies.append((waiting, reply, verdict))
        try:
            for waiting, reply, _ in replies:
                waiting.reply_to(reply)
        finally:
            for waiting, _, verdict in replies:
                self._finish(waiting.ticket, verdict)

    def _send_udp(self, sock: socket.socket, addr: tuple[Any, ...], reply: bytes | None) -> None:
        if reply is None:
            return
        try:
            sock.sendto(reply, addr)
        except OSError as exc:
            if not self._stopping.is_set():
                self._record(exc)

    # -- answering -----------------------------------------------------------

    def _judge_query(self, query: Query, question: wire.Question, send: Send) -> Any:
        """The query's verdict, to forward it with; None: answered already with `send` (a
        blocked name, observed once the client has the outage; a judge that failed)."""
        try:
            verdict = self._judge.query(query)
        except Exception as exc:
            self._record(exc)
            send(wire.servfail(question))
            return None
        if verdict.blocked:
            # Never forwarded, whatever the upstream is doing; the sender looked up before
            # the client has its answer and may ask again on the same flow.
            self._sender(query)
            send(wire.outage(question, verdict.rcode))
            self._observe(query, verdict)
            return None
        return verdict

    def _conclude(
        self, ticket: Ticket, question: wire.Question, answer: bytes | None
    ) -> tuple[bytes | None, Any]:
        """(the reply to a forwarded query, the verdict to observe it with once the reply
        is sent; None: drain() observed it): the upstream's `answer` (None: it failed, the
        client gets SERVFAIL) judged. The caller sends the reply, then calls `_finish`.
        Never raises: the reply is then None (nothing is sent)."""
        try:
            query, verdict = ticket.query, ticket.verdict
            assert query is not None
            reply = answer
            if answer is None:
                reply = wire.servfail(question)
            else:
                try:
                    verdict = self._judge.answer(query, answer, verdict)
                except Exception as exc:
                    self._record(exc)  # an answer nobody could check is not passed on
                    reply = wire.servfail(question)
            if verdict.blocked:
                reply = wire.outage(question, verdict.rcode)
            return reply, (verdict if self._tickets.claim(ticket) else None)
        except Exception as exc:
            self._record(exc)
            return None, (ticket.verdict if self._tickets.claim(ticket) else None)

    def _finish(self, ticket: Ticket, verdict: Any) -> None:
        """After a forwarded query's reply: observe it with `verdict` (None: drain() did)
        and close its ticket."""
        try:
            if verdict is not None:
                assert ticket.query is not None
                self._observe(ticket.query, verdict)
        finally:
            self._tickets.close(ticket)

    def _sender(self, query: Query) -> None:
        try:
            self._judge.sender(query)
        except Exception as exc:
            self._record(exc)

    def _observe(self, query: Query, verdict: Any) -> None:
        try:
            with self._observer_lock:
                self._judge.observe(query, verdict)
        except Exception as exc:
            self._record(exc)
