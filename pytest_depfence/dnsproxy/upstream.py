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


def forward_tcp(
    data: bytes,
    txid: int,
    family: int,
    addr: tuple[Any, ...],
    timeout: float,
    open_sockets: set[socket.socket],
) -> bytes:
    """The upstream's checked answer; `wire.UpstreamFailure` or OSError otherwise."""
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
