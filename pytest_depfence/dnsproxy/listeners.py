"""The proxy's listening sockets: UDP and TCP on one loopback port, IPv4 and (if any) IPv6."""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

_BIND_ATTEMPTS = 32
#: Each UDP listener's receive buffer: a few thousand queries sent at once wait there for
#: the proxy's loop, instead of being dropped (`dropped()` counts any that were all the same).
RECEIVE_BUFFER = 8 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: getsockopt(SO_MEMINFO): the socket's memory counters, SK_MEMINFO_DROPS the ninth (4.7+).
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO = struct.Struct("9I")
# ::1 missing (ipv6.disable=1, a container without IPv6) shows up as one of these.
_NO_IPV6_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


@dataclass(frozen=True)
class Listeners:
    port: int
    udp: list[socket.socket]
    tcp: list[socket.socket]
    has_ipv6: bool

    def close(self) -> None:
        for sock in self.udp + self.tcp:
            sock.close()

    def discard_waiting(self) -> None:
        """Throw away, unread, every datagram and connection waiting on them."""
        for sock in self.udp:
            while True:
                try:
                    sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    continue  # a stale ICMP error for an earlier reply: the next one
        for sock in self.tcp:  # non-blocking (`_tcp_listener`)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except (ConnectionAbortedError, ConnectionResetError):
                    continue  # gone before it was taken
                conn.close()

    def dropped(self) -> int:
        """Datagrams the kernel dropped at the UDP listeners since they were made: a full
        receive buffer, any other reason a datagram that reached one was never read."""
        return sum(
            _MEMINFO.unpack_from(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))[8]
            for sock in self.udp
        )


def bind(host4: str, host6: str | None) -> Listeners:
    """Four sockets on one free port (two when there is no IPv6 loopback)."""
    last: OSError | None = None
    for _ in range(_BIND_ATTEMPTS):
        try:
            return _bind_once(host4, host6)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Another process holds the port on one of the other three
            # sockets; a fresh port from the kernel will do.
            last = exc
    assert last is not None
    raise last


def _bind_once(host4: str, host6: str | None) -> Listeners:
    sockets: list[socket.socket] = []
    try:
        udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(udp4)
        _enlarge(udp4)
        udp4.bind((host4, 0))
        port = udp4.getsockname()[1]
        tcp4 = _tcp_listener(socket.AF_INET, host4, port)
        sockets.append(tcp4)
        udp: list[socket.socket] = [udp4]
        tcp: list[socket.socket] = [tcp4]
        v6 = _bind_v6(host6, port) if host6 is not None else None
        if v6 is not None:
            sockets.extend(v6)
            udp.append(v6[0])
            tcp.append(v6[1])
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Listeners(port, udp, tcp, v6 is not None)


def _bind_v6(host: str, port: int) -> tuple[socket.socket, socket.socket] | None:
    sockets: list[socket.socket] = []
    try:
        udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sockets.append(udp6)
        udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _enlarge(udp6)
        udp6.bind((host, port))
        tcp6 = _tcp_listener(socket.AF_INET6, host, port)
        sockets.append(tcp6)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno in _NO_IPV6_ERRNOS:
            return None
        raise
    return udp6, tcp6


def _enlarge(sock: socket.socket) -> None:
    """RECEIVE_BUFFER for a UDP listener: past net.core.rmem_max where this process may
    (CAP_NET_ADMIN), else as far as that allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def _tcp_listener(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        # Lets a port with TIME_WAIT leftovers be reused; on Linux it still
        # refuses a port another socket is listening on, so nothing is stolen.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
