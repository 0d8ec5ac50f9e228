"""Drain barriers: a datagram and a connection the proxy sends itself, one per listener.

When the listener loop sees a barrier, everything queued on that listener before
it has been read (UDP) or accepted (TCP): `drain()`'s starting line.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

PREFIX = b"depfence-drain-barrier:"


class Barriers:
    """The barriers in flight, recognised by the listener loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._udp: dict[bytes, threading.Event] = {}
        self._tcp: dict[tuple[str, int], threading.Event] = {}

    def udp_arrived(self, data: bytes) -> bool:
        """Whether `data` is a barrier datagram (then consumed); it need not be ours still."""
        if not data.startswith(PREFIX):
            return False
        with self._lock:
            event = self._udp.pop(data, None)
        # A barrier whose drain() already gave up is dropped, not answered.
        if event is not None:
            event.set()
        return True

    def tcp_arrived(self, client: tuple[str, int]) -> bool:
        """Whether a connection from `client` is a barrier (the caller closes it)."""
        with self._lock:
            event = self._tcp.pop(client, None)
        if event is None:
            return False
        event.set()
        return True

    def pass_udp(self, listeners: Sequence[socket.socket], deadline: float) -> None:
        for listener in listeners:
            address = listener.getsockname()
            token = PREFIX + os.urandom(16)
            event = threading.Event()
            with self._lock:
                self._udp[token] = event
            try:
                with socket.socket(listener.family, socket.SOCK_DGRAM) as sock:
                    sock.sendto(token, address)
                _wait(event, deadline, "UDP", address)
            finally:
                with self._lock:
                    self._udp.pop(token, None)

    def pass_tcp(self, listeners: Sequence[socket.socket], deadline: float) -> None:
        for listener in listeners:
            address = listener.getsockname()
            event = threading.Event()
            with socket.socket(listener.family, socket.SOCK_STREAM) as sock:
                # Bound before connecting so the loop can recognise the barrier
                # connection however quickly it accepts it.
                sock.bind((address[0], 0))
                local = sock.getsockname()
                key = (local[0], local[1])
                with self._lock:
                    self._tcp[key] = event
                try:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    sock.connect(address)
                    _wait(event, deadline, "TCP", address)
                finally:
                    with self._lock:
                        self._tcp.pop(key, None)


def _wait(event: threading.Event, deadline: float, kind: str, address: tuple[Any, ...]) -> None:
    if not event.wait(max(deadline - time.monotonic(), 0)):
        raise TimeoutError(
            f"DNS proxy drain: the {kind} listener {address[0]}:{address[1]} did not catch up"
        )
