"""`DnsProxy`: the listeners' threads, answering each query, forwarding, and `drain()`.

``drain()`` is the barrier a fence uses to know every query of a finished run
has been observed.
"""

from __future__ import annotations

import itertools
import os
import select
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from . import listeners, wire
from .types import DnsJudge, Query, Transport

__all__ = ["DnsProxy"]

_UDP_WORKERS = 8
# A client that stops reading its replies must not hold a handler thread forever.
_TCP_SEND_TIMEOUT = 10.0
# drain() cannot be woken by bytes arriving on a client connection, so it re-checks
# the connections at this interval while it waits.
_DRAIN_POLL = 0.005
_BARRIER_PREFIX = b"depfence-drain-barrier:"


class _Connection:
    """Book-keeping for one accepted TCP client connection, shared with drain()."""

    def __init__(self, seq: int, sock: socket.socket, client: tuple[str, int], listen_port: int):
        self.seq = seq
        self.sock = sock
        self.client = client
        self.listen_port = listen_port
        # True from the moment the handler is about to consume bytes until every
        # complete query in them is answered; drain() relies on that ordering.
        self.busy = False
        self.done = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None


class DnsProxy:
    """A loopback DNS proxy that answers blocked names itself and forwards the rest.

    Every verdict comes from `judge` (see `DnsJudge`). Anything unexpected in a
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
        self._loop_thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._observer_lock = threading.Lock()
        self._errors_lock = threading.Lock()
        # Guards the sequence numbers, pending UDP tasks, connections and barriers;
        # drain() waits on it.
        self._state = threading.Condition()
        self._udp_seq = itertools.count(1)
        self._udp_last = 0
        self._udp_pending: set[int] = set()
        self._conn_seq = itertools.count(1)
        self._conn_last = 0
        self._connections: dict[int, _Connection] = {}
        self._udp_barriers: dict[bytes, threading.Event] = {}
        self._tcp_barriers: dict[tuple[str, int], threading.Event] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> DnsProxy:
        """Bind the listeners on one free port and start serving in daemon threads."""
        if self._started:
            raise RuntimeError("DnsProxy.start() called twice")
        self._started = True
        host, port = self.upstream
        # Resolved once here so that a bad upstream fails the fence at start,
        # not as a SERVFAIL in the middle of a run.
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._upstream_family = family
        self._upstream_addr = addr
        bound = listeners.bind(self.host4, self.host6)
        self._listeners, self.port, self.has_ipv6 = bound, bound.port, bound.has_ipv6
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pool = ThreadPoolExecutor(
            max_workers=_UDP_WORKERS, thread_name_prefix="depfence-dns-udp"
        )
        self._loop_thread = threading.Thread(
            target=self._loop, name="depfence-dns-loop", daemon=True
        )
        self._loop_thread.start()
        return self

    def stop(self) -> None:
        """Close every socket and join every thread; safe to call more than once."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        if self._loop_thread is not None:
            self._loop_thread.join()
        if self._listeners is not None:
            self._listeners.close()
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
            if conn.thread is not None:
                conn.thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

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

    def _loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            assert self._listeners is not None
            for sock in self._listeners.udp:
                selector.register(sock, selectors.EVENT_READ, "udp")
            for sock in self._listeners.tcp:
                selector.register(sock, selectors.EVENT_READ, "tcp")
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    try:
                        if key.data == "udp":
                            self._read_udp(ready)
                        elif key.data == "tcp":
                            self._accept(ready)
                        else:
                            self._drain_wake()
                    except Exception as exc:
                        self._record(exc)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _read_udp(self, sock: socket.socket) -> None:
        listen_port = sock.getsockname()[1]
        assert self._pool is not None
        # Read until the queue is empty so that a barrier datagram is seen only
        # after everything queued before it has been handed to the pool.
        while True:
            try:
                data, addr = sock.recvfrom(wire.MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # A stale ICMP error for an earlier reply; the listener is fine.
                continue
            if data.startswith(_BARRIER_PREFIX):
                with self._state:
                    barrier = self._udp_barriers.pop(data, None)
                # A barrier whose drain() already gave up is dropped, not answered.
                if barrier is not None:
                    barrier.set()
                continue
            with self._state:
                seq = next(self._udp_seq)
                self._udp_last = seq
                self._udp_pending.add(seq)
            try:
                self._pool.submit(self._serve_udp, seq, sock, data, addr, listen_port)
            except RuntimeError:
                # The pool is shutting down with the proxy.
                self._udp_done(seq)
                return

    def _udp_done(self, seq: int) -> None:
        with self._state:
            self._udp_pending.discard(seq)
            self._state.notify_all()

    def _serve_udp(
        self, seq: int, sock: socket.socket, data: bytes, addr: tuple[Any, ...], listen_port: int
    ) -> None:
        try:
            reply = self._handle(data, "udp", (addr[0], addr[1]), listen_port)
            if reply is not None:
                try:
                    sock.sendto(reply, addr)
                except OSError:
                    if not self._stopping.is_set():
                        raise
        except Exception as exc:
            self._record(exc)
        finally:
            self._udp_done(seq)

    def _accept(self, listener: socket.socket) -> None:
        listen_port = listener.getsockname()[1]
        while True:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except (ConnectionAbortedError, ConnectionResetError):
                continue
            client = (addr[0], addr[1])
            with self._state:
                barrier = self._tcp_barriers.pop(client, None)
            if barrier is not None:
                sock.close()
                barrier.set()
                continue
            sock.settimeout(_TCP_SEND_TIMEOUT)
            with self._state:
                seq = next(self._conn_seq)
                self._conn_last = seq
                conn = _Connection(seq, sock, client, listen_port)
                self._connections[seq] = conn
            conn.thread = threading.Thread(
                target=self._serve_tcp, args=(conn,), name=f"depfence-dns-tcp-{seq}", daemon=True
            )
            conn.thread.start()

    def _serve_tcp(self, conn: _Connection) -> None:
        buffer = b""
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
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
                    reply = self._handle(message, "tcp", conn.client, conn.listen_port)
                    if reply is not None:
                        conn.sock.sendall(struct.pack("!H", len(reply)) + reply)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, socket.timeout):
            # The client went away or stopped reading: its business, not an error.
            pass
        except OSError as exc:
            if not self._stopping.is_set():
                self._record(exc)
        except Exception as exc:
            self._record(exc)
        finally:
            with conn.lock:
                conn.done = True
                conn.sock.close()
            with self._state:
                self._connections.pop(conn.seq, None)
                self._state.notify_all()

    def _set_busy(self, conn: _Connection, busy: bool) -> None:
        with self._state:
            conn.busy = busy
            self._state.notify_all()

    # -- answering -----------------------------------------------------------

    def _handle(
        self, data: bytes, transport: Transport, client: tuple[str, int], listen_port: int
    ) -> bytes | None:
        """Answer one DNS message; None means send nothing."""
        question = wire.read_question(data)
        if not isinstance(question, wire.Question):
            return question  # an error reply, or nothing
        query = Query(question.name, question.qtype, transport, client, listen_port, question.txid)
        servfail = wire.answer(question.txid, question.flags, question.raw, wire.SERVFAIL)
        try:
            verdict = self._judge.query(query)
        except Exception as exc:
            self._record(exc)
            return servfail
        reply = None
        if not verdict.blocked:
            try:
                reply = self._forward(data, question.txid, transport)
            except (wire.UpstreamFailure, OSError):
                reply = servfail
            else:
                try:
                    verdict = self._judge.answer(query, reply, verdict)
                except Exception as exc:
                    self._record(exc)  # an answer nobody could check is not passed on
                    reply = servfail
        try:
            with self._observer_lock:
                self._judge.observe(query, verdict)
        except Exception as exc:
            self._record(exc)
        if not verdict.blocked:
            return reply
        if verdict.rcode is None:
            return None  # the outage is a query never answered
        return wire.answer(question.txid, question.flags, question.raw, verdict.rcode)

    def _forward(self, data: bytes, txid: int, transport: Transport) -> bytes:
        if transport == "udp":
            return self._forward_udp(data, txid)
        return self._forward_tcp(data, txid)

    def _forward_udp(self, data: bytes, txid: int) -> bytes:
        with socket.socket(self._upstream_family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.upstream_timeout)
            # Connected, so an ICMP port-unreachable from a dead upstream comes
            # back at once as ConnectionRefusedError instead of a timeout.
            sock.connect(self._upstream_addr)
            sock.send(data)
            reply = sock.recv(wire.MAX_MESSAGE)
        wire.check_reply(reply, txid)
        return reply

    def _forward_tcp(self, data: bytes, txid: int) -> bytes:
        deadline = time.monotonic() + self.upstream_timeout
        with socket.socket(self._upstream_family, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.upstream_timeout)
            sock.connect(self._upstream_addr)
            sock.sendall(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", wire.recv_exactly(sock, 2, deadline))
            reply = wire.recv_exactly(sock, length, deadline)
        wire.check_reply(reply, txid)
        return reply

    # -- drain ---------------------------------------------------------------

    def drain(self, timeout: float = 5.0) -> None:
        """Return once every query that reached the proxy before this call is handled.

        Handled means observed and answered (or deliberately left unanswered).
        Raises TimeoutError if that takes longer than ``timeout`` seconds.
        """
        if not self._started or self._stopped:
            return
        deadline = time.monotonic() + timeout
        self._barrier_udp(deadline)
        self._barrier_tcp(deadline)
        with self._state:
            udp_cutoff = self._udp_last
            conn_cutoff = self._conn_last
        while True:
            with self._state:
                udp_left = sum(1 for seq in self._udp_pending if seq <= udp_cutoff)
                conns = [c for seq, c in self._connections.items() if seq <= conn_cutoff]
            tcp_left = sum(1 for conn in conns if not self._tcp_idle(conn))
            if udp_left == 0 and tcp_left == 0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"DNS proxy drain timed out after {timeout}s: "
                    f"{udp_left} UDP queries and {tcp_left} TCP connections still being handled"
                )
            with self._state:
                self._state.wait(min(remaining, _DRAIN_POLL))

    @staticmethod
    def _tcp_idle(conn: _Connection) -> bool:
        with conn.lock:
            if conn.done:
                return True
            # Readable means unread bytes (or EOF the handler has not seen yet),
            # so the handler still has work; check before reading busy, see _serve_tcp.
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            readable = bool(poller.poll(0))
            return not readable and not conn.busy

    def _barrier_udp(self, deadline: float) -> None:
        assert self._listeners is not None
        for listener in self._listeners.udp:
            address = listener.getsockname()
            token = _BARRIER_PREFIX + os.urandom(16)
            event = threading.Event()
            with self._state:
                self._udp_barriers[token] = event
            try:
                with socket.socket(listener.family, socket.SOCK_DGRAM) as sock:
                    sock.sendto(token, address)
                self._wait_barrier(event, deadline, "UDP", address)
            finally:
                with self._state:
                    self._udp_barriers.pop(token, None)

    def _barrier_tcp(self, deadline: float) -> None:
        assert self._listeners is not None
        for listener in self._listeners.tcp:
            address = listener.getsockname()
            event = threading.Event()
            with socket.socket(listener.family, socket.SOCK_STREAM) as sock:
                # Bound before connecting so the loop can recognise the barrier
                # connection however quickly it accepts it.
                sock.bind((address[0], 0))
                local = sock.getsockname()
                key = (local[0], local[1])
                with self._state:
                    self._tcp_barriers[key] = event
                try:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    sock.connect(address)
                    self._wait_barrier(event, deadline, "TCP", address)
                finally:
                    with self._state:
                        self._tcp_barriers.pop(key, None)

    @staticmethod
    def _wait_barrier(
        event: threading.Event, deadline: float, kind: str, address: tuple[Any, ...]
    ) -> None:
        if not event.wait(max(deadline - time.monotonic(), 0)):
            raise TimeoutError(
                f"DNS proxy drain: the {kind} listener {address[0]}:{address[1]} did not catch up"
            )
