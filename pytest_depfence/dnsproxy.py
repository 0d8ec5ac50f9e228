"""The per-fence DNS proxy: where a fenced process's DNS query is answered.

The eBPF programs redirect every port-53 query of a fence (UDP connected and
unconnected, TCP, IPv4 and IPv6) to this proxy on loopback. The proxy owns:

- listening on host4/host6 (UDP and TCP, one port for all four sockets);
- reading each query's question and asking ``decide(name)`` whether it is blocked;
- telling ``observer`` about every query before it is answered (the fence
  attributes the query to a process there, while the process still exists);
- the answer: a blocked name gets the configured outage answer, an allowed
  query is forwarded to the upstream byte for byte and the upstream's answer
  is returned byte for byte, and anything that goes wrong upstream becomes
  SERVFAIL rather than silence;
- ``drain()``, the barrier the fence uses to know every query of a finished
  run has been observed.

It knows nothing of policies, BPF maps or pytest: the decision and the
bookkeeping are callables handed in by the fence.
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
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Literal

from dnslib import QTYPE
from dnslib.label import DNSBuffer

__all__ = ["OUTAGES", "DnsProxy", "Query"]

Transport = Literal["udp", "tcp"]

#: Outage answers a blocked name can get, mapped to their RCODE (None: never answered).
OUTAGES: dict[str, int | None] = {"nxdomain": 3, "servfail": 2, "refused": 5, "timeout": None}

_HEADER = struct.Struct("!HHHHHH")
_FORMERR = 1
_SERVFAIL = 2
_NOTIMP = 4
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_RA = 0x0080
_MAX_MESSAGE = 65535
_UDP_WORKERS = 8
# A client that stops reading its replies must not hold a handler thread forever.
_TCP_SEND_TIMEOUT = 10.0
_BIND_ATTEMPTS = 32
# drain() cannot be woken by bytes arriving on a client connection, so it re-checks
# the connections at this interval while it waits.
_DRAIN_POLL = 0.005
_BARRIER_PREFIX = b"depfence-drain-barrier:"
# ::1 missing (ipv6.disable=1, a container without IPv6) shows up as one of these.
_NO_IPV6_ERRNOS = frozenset(
    {
        getattr(os, "EADDRNOTAVAIL", 99),
        getattr(os, "EAFNOSUPPORT", 97),
        getattr(os, "EPROTONOSUPPORT", 93),
    }
)


@dataclass(frozen=True)
class Query:
    """One DNS query as the proxy received it."""

    name: str  # qname as asked, lowercase, without trailing dot
    qtype: str  # "A", "AAAA", ... (dnslib QTYPE name; "TYPE65280" for unknown types)
    transport: Transport
    client: tuple[str, int]  # the peer (address, port) as the proxy saw it
    listen_port: int  # the proxy port it arrived on
    txid: int


class _UpstreamFailure(Exception):
    """The upstream did not produce a usable answer; the client gets SERVFAIL."""


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

    ``decide(name)`` returns an object with a ``blocked`` attribute (a policy
    Decision). For a name that is not blocked, ``review(query, answer)`` sees the
    upstream's answer before the client does and may return a new decision
    (blocked: the client gets the outage answer instead) or None (keep it).
    ``observer(query, decision)`` is called exactly once for every
    query that has a question, before it is answered, from a proxy thread;
    calls are serialized, so the observer need not be thread-safe. Anything
    unexpected in a proxy thread, including an exception from ``decide`` or
    ``observer``, is appended to ``errors`` and the proxy keeps serving;
    ``raise_errors()`` re-raises the first one in the caller's thread.
    """

    port: int
    has_ipv6: bool
    errors: list[BaseException]

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        decide: Callable[[str], Any],
        observer: Callable[[Query, Any], None],
        review: Callable[[Query, bytes], Any] | None = None,
        outage: str = "nxdomain",
        upstream_timeout: float = 2.0,
        host4: str = "127.0.0.1",
        host6: str | None = "::1",
    ) -> None:
        if outage not in OUTAGES:
            choices = ", ".join(repr(name) for name in OUTAGES)
            raise ValueError(f"unknown DNS outage {outage!r}: expected one of {choices}")
        if upstream_timeout <= 0:
            raise ValueError(f"upstream_timeout must be positive, got {upstream_timeout!r}")
        self.upstream = upstream
        self.outage = outage
        self.upstream_timeout = upstream_timeout
        self.host4 = host4
        self.host6 = host6
        self._decide = decide
        self._observer = observer
        self._review = review
        self.port = 0
        self.has_ipv6 = False
        self.errors = []

        self._upstream_family = socket.AF_INET
        self._upstream_addr: tuple[Any, ...] = upstream
        self._udp_listeners: list[socket.socket] = []
        self._tcp_listeners: list[socket.socket] = []
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
        self._bind()
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
        for listener in self._udp_listeners + self._tcp_listeners:
            listener.close()
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

    # -- binding -------------------------------------------------------------

    def _bind(self) -> None:
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            try:
                self._bind_once()
                return
            except OSError as exc:
                if exc.errno != getattr(os, "EADDRINUSE", 98):
                    raise
                # Another process holds the port on one of the other three
                # sockets; a fresh port from the kernel will do.
                last = exc
        assert last is not None
        raise last

    def _bind_once(self) -> None:
        sockets: list[socket.socket] = []
        try:
            udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(udp4)
            udp4.bind((self.host4, 0))
            port = udp4.getsockname()[1]
            tcp4 = self._tcp_listener(socket.AF_INET, self.host4, port)
            sockets.append(tcp4)
            udp: list[socket.socket] = [udp4]
            tcp: list[socket.socket] = [tcp4]
            has_ipv6 = False
            if self.host6 is not None:
                v6 = self._bind_v6(self.host6, port)
                if v6 is not None:
                    sockets.extend(v6)
                    udp.append(v6[0])
                    tcp.append(v6[1])
                    has_ipv6 = True
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self.port = port
        self.has_ipv6 = has_ipv6
        self._udp_listeners = udp
        self._tcp_listeners = tcp

    def _bind_v6(self, host: str, port: int) -> tuple[socket.socket, socket.socket] | None:
        sockets: list[socket.socket] = []
        try:
            udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sockets.append(udp6)
            udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp6.bind((host, port))
            tcp6 = self._tcp_listener(socket.AF_INET6, host, port)
            sockets.append(tcp6)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno in _NO_IPV6_ERRNOS:
                return None
            raise
        return udp6, tcp6

    @staticmethod
    def _tcp_listener(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a port with TIME_WAIT leftovers be reused; on Linux it still
            # refuses a port another socket is listening on, so nothing is stolen.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- the receive loop ----------------------------------------------------

    def _loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            for sock in self._udp_listeners:
                selector.register(sock, selectors.EVENT_READ, "udp")
            for sock in self._tcp_listeners:
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
                data, addr = sock.recvfrom(_MAX_MESSAGE, socket.MSG_DONTWAIT)
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
                chunk = conn.sock.recv(_MAX_MESSAGE + 2)
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
        if len(data) < _HEADER.size:
            return None
        txid, flags, qdcount, _, _, _ = _HEADER.unpack_from(data)
        if flags & _QR:
            # Answering a response could start a reply loop with another responder.
            return None
        if flags & _OPCODE_MASK:
            return _error_reply(txid, flags, _NOTIMP)
        if qdcount != 1:
            return _error_reply(txid, flags, _FORMERR)
        try:
            buffer = DNSBuffer(data)
            buffer.offset = _HEADER.size
            qname = buffer.decode_name()
            qtype, _ = buffer.unpack("!HH")
        except Exception:
            return _error_reply(txid, flags, _FORMERR)
        question = data[_HEADER.size : buffer.offset]
        query = Query(
            name=_name_text(qname.label),
            qtype=str(QTYPE[qtype]),
            transport=transport,
            client=client,
            listen_port=listen_port,
            txid=txid,
        )
        try:
            decision = self._decide(query.name)
            blocked = bool(decision.blocked)
        except Exception as exc:
            self._record(exc)
            return _answer(txid, flags, question, _SERVFAIL)
        reply = None
        if not blocked:
            try:
                reply = self._forward(data, txid, transport)
            except (_UpstreamFailure, OSError):
                reply = _answer(txid, flags, question, _SERVFAIL)
            else:
                try:
                    decision, blocked = self._reviewed(query, reply, decision)
                except Exception as exc:
                    self._record(exc)  # an answer nobody could check is not passed on
                    reply = _answer(txid, flags, question, _SERVFAIL)
        try:
            with self._observer_lock:
                self._observer(query, decision)
        except Exception as exc:
            self._record(exc)
        if blocked:
            rcode = OUTAGES[self.outage]
            return None if rcode is None else _answer(txid, flags, question, rcode)
        return reply

    def _forward(self, data: bytes, txid: int, transport: Transport) -> bytes:
        if transport == "udp":
            return self._forward_udp(data, txid)
        return self._forward_tcp(data, txid)

    def _reviewed(self, query: Query, reply: bytes, decision: Any) -> tuple[Any, bool]:
        """The decision after `review` saw the upstream's answer."""
        if self._review is None:
            return decision, False
        revised = self._review(query, reply)
        if revised is None:
            return decision, False
        return revised, bool(revised.blocked)

    def _forward_udp(self, data: bytes, txid: int) -> bytes:
        with socket.socket(self._upstream_family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.upstream_timeout)
            # Connected, so an ICMP port-unreachable from a dead upstream comes
            # back at once as ConnectionRefusedError instead of a timeout.
            sock.connect(self._upstream_addr)
            sock.send(data)
            reply = sock.recv(_MAX_MESSAGE)
        _check_reply(reply, txid)
        return reply

    def _forward_tcp(self, data: bytes, txid: int) -> bytes:
        deadline = time.monotonic() + self.upstream_timeout
        with socket.socket(self._upstream_family, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.upstream_timeout)
            sock.connect(self._upstream_addr)
            sock.sendall(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", _recv_exactly(sock, 2, deadline))
            reply = _recv_exactly(sock, length, deadline)
        _check_reply(reply, txid)
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
        for listener in self._udp_listeners:
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
        for listener in self._tcp_listeners:
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


def _name_text(labels: list[bytes]) -> str:
    # Presentation form, lowercased: a dot inside a label is escaped so that the
    # single label b"github.com" never reads as the name github.com.
    out = []
    for label in labels:
        text = label.decode("utf-8", errors="surrogateescape")
        escaped = "".join(
            f"\\{ch}"
            if ch in ".\\"
            else (f"\\{ord(ch):03d}" if ord(ch) <= 0x20 or ord(ch) == 0x7F else ch)
            for ch in text
        )
        out.append(escaped.lower())
    return ".".join(out)


def _error_reply(txid: int, flags: int, rcode: int) -> bytes:
    # No question section: the request's may be the very thing that is malformed.
    return _HEADER.pack(txid, _reply_flags(flags, rcode), 0, 0, 0, 0)


def _answer(txid: int, flags: int, question: bytes, rcode: int) -> bytes:
    # The question is echoed byte for byte so that resolvers checking the
    # 0x20 case randomisation of the name accept the answer.
    return _HEADER.pack(txid, _reply_flags(flags, rcode), 1, 0, 0, 0) + question


def _reply_flags(flags: int, rcode: int) -> int:
    return _QR | (flags & _OPCODE_MASK) | (flags & _RD) | _RA | rcode


def _check_reply(reply: bytes, txid: int) -> None:
    if len(reply) < _HEADER.size:
        raise _UpstreamFailure(f"short answer from upstream ({len(reply)} bytes)")
    rid, flags = struct.unpack_from("!HH", reply)
    if rid != txid:
        raise _UpstreamFailure(f"upstream answered id {rid}, asked {txid}")
    if not flags & _QR:
        raise _UpstreamFailure("upstream sent a query, not an answer")


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _UpstreamFailure("upstream timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise _UpstreamFailure("upstream closed the connection mid-answer")
        data += chunk
    return data
