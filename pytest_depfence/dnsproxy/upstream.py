"""Asking the upstream: one query forwarded byte for byte over the client's transport."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from . import wire
from .types import Transport


def forward(
    data: bytes, txid: int, transport: Transport, family: int, addr: tuple[Any, ...], timeout: float
) -> bytes:
    """The upstream's checked answer; `wire.UpstreamFailure` or OSError otherwise."""
    if transport == "udp":
        return _forward_udp(data, txid, family, addr, timeout)
    return _forward_tcp(data, txid, family, addr, timeout)


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
    data: bytes, txid: int, family: int, addr: tuple[Any, ...], timeout: float
) -> bytes:
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.sendall(struct.pack("!H", len(data)) + data)
        (length,) = struct.unpack("!H", wire.recv_exactly(sock, 2, deadline))
        reply = wire.recv_exactly(sock, length, deadline)
    wire.check_reply(reply, txid)
    return reply
