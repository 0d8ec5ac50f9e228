"""One accepted TCP client connection: what its reader thread and `drain()` share."""

from __future__ import annotations

import select
import socket
import struct
import threading


class Connection:
    """Book-keeping for one accepted TCP client connection, shared with drain()."""

    def __init__(self, seq: int, sock: socket.socket, client: tuple[str, int], listen_port: int):
        self.seq = seq
        self.sock = sock
        self.client = client
        self.listen_port = listen_port
        # True from the moment the handler is about to consume bytes until every
        # complete query in them is judged; drain() relies on that ordering.
        self.busy = False
        self.done = False  # nothing more is read (forwarded queries may still be answered)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        # Replies come from the reader and the upstream pool, and leave in the
        # order their queries came (a pipelining client may expect that).
        self.send_lock = threading.Lock()
        self._slots = 0
        self._next = 0
        self._ready: dict[int, bytes | None] = {}

    def slot(self) -> int:
        """The place of the next query's reply in the reply order."""
        with self.send_lock:
            self._slots += 1
            return self._slots - 1

    def send(self, slot: int, reply: bytes | None) -> None:
        """Send `reply` (None: nothing) once every earlier slot's reply has gone."""
        with self.send_lock:
            self._ready[slot] = reply
            while self._next in self._ready:
                out = self._ready.pop(self._next)
                self._next += 1
                if out is not None:
                    self.sock.sendall(struct.pack("!H", len(out)) + out)

    def idle(self) -> bool:
        """No query of this connection is unread or being judged."""
        with self.lock:
            if self.done:
                return True
            # Readable means unread bytes (or EOF the handler has not seen yet),
            # so the handler still has work; check before reading busy (see
            # DnsProxy._serve_tcp).
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            readable = bool(poller.poll(0))
            return not readable and not self.busy
