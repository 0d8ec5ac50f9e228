"""Asking the upstream over TCP: one query forwarded byte for byte on a connection of its own.

(UDP queries share one persistent socket: `forwarder`.) Each connection is in
`open_sockets` while it lasts, so that the proxy's `stop()` can cut it short:
teardown never waits for the upstream.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from . import wire
from .types import Transport


def forward(
    data: bytes,
    txid: int,
    transport: Transport,
    family: int,
    addr: tuple[Any, ...],
    timeout: float,
    open_sockets: set[socket.socket] | None = None,
) -> bytes:
    """The upstream's checked answer; `wire.UpstreamFailure` or OSError otherwise."""
    if transport == "udp":
        return _forward_udp(data, txid, family, addr, timeout)
    return _forward_tcp(
        data, txid, family, addr, timeout, set() if open_sockets is None else open_sockets
    )


def _forward_udp(
    data: bytes, txid: int, family: int, addr: tuple[Any, ...], timeout: float
) -> bytes:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        # Connected, so an ICMP port-unreachable from a dead upstream comes
        # back at once as ConnectionRefusedError instead of a timeout.
        sock.connect(addr)
        sock.send(data)
        reply = sock.recv(wire.MAX_MESSAGE)
    wire.check_reply(reply, txid)
    return reply


def _forward_tcp(
    data: bytes,
    txid: int,
    family: int,
    addr: tuple[Any, ...],
    timeout: float,
    open_sockets: set[socket.socket],
) -> bytes:
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        open_sockets.add(sock)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.sendall(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", wire.recv_exactly(sock, 2, deadline))
            reply = wire.recv_exactly(sock, length, deadline)
        finally:
            open_sockets.discard(sock)
    wire.check_reply(reply, txid)
    return reply
