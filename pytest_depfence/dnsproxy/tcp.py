"""DNS over TCP: a thread per client connection, a pool thread per query forwarded.

`TcpClients` is the TCP half of `DnsProxy` (a mixin: it uses the proxy's state
and its answering, `_judge_query` and `_conclude`). Each accepted connection
gets a reader thread that judges its queries in order; an allowed query is
forwarded over a connection of its own on the upstream pool, so a silent
upstream never holds a reader; replies leave in the queries' order. `stop()`
cuts those upstream connections short.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import upstream, wire
from .connection import Connection
from .tickets import Ticket, Tickets
from .types import Query

# A client that stops reading its replies must not hold a handler thread forever.
_TCP_SEND_TIMEOUT = 10.0

# Optional, not `bytes | None`: a runtime alias, and Debian 11 runs Python 3.9.
Send = Callable[[Optional[bytes]], None]  # called once per query; None: send nothing


class TcpClients:
    """The proxy's TCP clients: accepting, reading, forwarding, replying in order."""

    # The proxy's state this half shares (set by DnsProxy.__init__ and start()).
    upstream_timeout: float
    _stopping: threading.Event
    _reading: bool
    _state: threading.Condition
    _tickets: Tickets
    _conn_seq: itertools.count[int]
    _conn_last: int
    _connections: dict[int, Connection]
    _upstream_pool: ThreadPoolExecutor | None
    _upstream_family: int
    _upstream_addr: tuple[Any, ...]
    _tcp_upstreams: set[socket.socket]

    if TYPE_CHECKING:  # DnsProxy's

        def _record(self, exc: BaseException) -> None: ...

        def _judge_query(self, query: Query, question: wire.Question, send: Send) -> Any: ...

        def _conclude(
            self, ticket: Ticket, question: wire.Question, answer: bytes | None
        ) -> tuple[bytes | None, Any]: ...

        def _finish(self, ticket: Ticket, verdict: Any) -> None: ...

        def _sender(self, query: Query) -> None: ...

        def _read_done(self) -> None: ...

    def _cut_tcp_upstreams(self) -> None:
        for sock in list(self._tcp_upstreams):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        listen_port = listener.getsockname()[1]
        self._reading = True
        try:
            while True:
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    return
                except (ConnectionAbortedError, ConnectionResetError):
                    continue
                sock.settimeout(_TCP_SEND_TIMEOUT)
                with self._state:
                    seq = next(self._conn_seq)
                    self._conn_last = seq
                    conn = Connection(seq, sock, (addr[0], addr[1]), listen_port)
                    self._connections[seq] = conn
                name = f"depfence-dns-tcp-{seq}"
                conn.thread = threading.Thread(
                    target=self._serve_tcp, args=(conn,), name=name, daemon=True
                )
                conn.thread.start()
        finally:
            self._read_done()

    def _serve_tcp(self, conn: Connection) -> None:
        buffer = b""
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        forwarded: list[Future[None]] = []
        try:
            while not self._stopping.is_set():
                self._set_busy(conn, False)
                # poll() leaves the bytes in the socket until busy is set, so
                # drain() always sees a query either in the socket or as busy.
                poller.poll()
                self._set_busy(conn, True)
                chunk = conn.sock.recv(wire.MAX_MESSAGE + 2)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2:
                    (length,) = struct.unpack("!H", buffer[:2])
                    if len(buffer) < 2 + length:
                        break
                    message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                    ticket = self._tickets.open("tcp")
                    send = partial(self._send_tcp, conn, conn.slot())
                    future = self._handle(ticket, message, conn, send)
                    forwarded = [f for f in forwarded if not f.done()]
                    if future is not None:
                        forwarded.append(future)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, socket.timeout):
            # The client went away or stopped reading: its business, not an error.
            pass
        except OSError as exc:
            if not self._stopping.is_set():
                self._record(exc)
        except Exception as exc:
            self._record(exc)
        finally:
            self._end_tcp(conn, forwarded)

    def _end_tcp(self, conn: Connection, forwarded: list[Future[None]]) -> None:
        with conn.lock:
            conn.done = True
        with self._state:
            self._state.notify_all()
        # The answers still coming from the upstream go out before the socket closes.
        wait_all(forwarded)
        with conn.lock:
            conn.sock.close()
        with self._state:
            self._connections.pop(conn.seq, None)
            self._state.notify_all()

    def _send_tcp(self, conn: Connection, slot: int, reply: bytes | None) -> None:
        try:
            conn.send(slot, reply)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, socket.timeout):
            try:  # a client that stopped reading: the reader sees the end
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError as exc:
            if not self._stopping.is_set():
                self._record(exc)

    def _set_busy(self, conn: Connection, busy: bool) -> None:
        with self._state:
            conn.busy = busy
            self._state.notify_all()

    def _handle(
        self, ticket: Ticket, data: bytes, conn: Connection, send: Send
    ) -> Future[None] | None:
        """Answer one DNS message now, or (the future) once the upstream has."""
        once = _Once(send)
        forwarded = None
        try:
            forwarded = self._decide(ticket, data, conn, once)
        except Exception as exc:
            self._record(exc)
        finally:
            if forwarded is None:
                once(None)  # nothing, if it was answered
                self._tickets.close(ticket)
        return forwarded

    def _decide(
        self, ticket: Ticket, data: bytes, conn: Connection, send: Send
    ) -> Future[None] | None:
        """None: answered with `send` (or nothing to send); else the forward under way."""
        question = wire.read_question(data)
        if not isinstance(question, wire.Question):
            send(question)  # an error reply, or nothing
            return None
        query = Query(question.name, question.qtype, "tcp", conn.client, conn.listen_port,
                      question.txid, time.monotonic_ns())  # fmt: skip
        verdict = self._judge_query(query, question, send)
        if verdict is None:
            return None
        self._sender(query)
        self._tickets.upstream(ticket, query, verdict)
        assert self._upstream_pool is not None
        try:
            return self._upstream_pool.submit(self._complete, ticket, question, data, send)
        except RuntimeError:  # the proxy is stopping: SERVFAIL, as from a failed upstream
            self._reply(ticket, question, None, send)
            return None

    def _complete(self, ticket: Ticket, question: wire.Question, data: bytes, send: Send) -> None:
        """Forward a TCP query, then `_conclude` it; on a pool thread."""
        answer: bytes | None = None
        try:
            if self._stopping.is_set():
                raise wire.UpstreamFailure("the proxy is stopping")
            answer = upstream.forward_tcp(
                data,
                question.txid,
                self._upstream_family,
                self._upstream_addr,
                self.upstream_timeout,
                self._tcp_upstreams,
            )
        except (wire.UpstreamFailure, OSError):
            pass
        except Exception as exc:
            self._record(exc)  # answered SERVFAIL, as a failed upstream
        self._reply(ticket, question, answer, send)

    def _reply(
        self, ticket: Ticket, question: wire.Question, answer: bytes | None, send: Send
    ) -> None:
        """Answer a forwarded query with the upstream's `answer` (None: SERVFAIL), then
        observe it."""
        reply, verdict = self._conclude(ticket, question, answer)
        try:
            send(reply)
        finally:
            self._finish(ticket, verdict)


class _Once:
    """A `Send` that sends the first reply it is given and ignores the rest."""

    def __init__(self, send: Send) -> None:
        self._send: Send | None = send

    def __call__(self, reply: bytes | None) -> None:
        send, self._send = self._send, None
        if send is not None:
            send(reply)
