"""How the lab's servers run: one thread per connection, one dispatcher thread for all sockets.

Shared by the DNS and HTTP servers, so that the whole lab starts and stops at
once and lab exit can cut idle clients instead of waiting for them.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import socketserver
import threading
from typing import Any, cast

log = logging.getLogger(__name__)


class _ConnectionThreads(socketserver.BaseServer):
    """One named daemon thread per accepted connection, all closable at once.

    Replaces ThreadingMixIn's bookkeeping so that shutting the lab down can cut
    idle keep-alive or DNS-over-TCP clients instead of waiting for them.
    """

    label = "server"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conn_lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"depfence-lab-{self.label}-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (or being cut at lab exit) are normal here.
        log.debug("lab %s: error serving %s", self.label, client_address, exc_info=True)

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread, _ in conns:
            thread.join()


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class _Dispatcher:
    """One thread that waits on every listening socket and hands work to its server.

    A serve_forever thread per server would poll and take up to half a second
    each to stop; one selector with a wake-up socket costs nothing idle and
    stops at once.
    """

    def __init__(self, servers: list[socketserver.BaseServer]) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for server in servers:
            # Non-blocking: a readiness that vanished (client gone) must not stall the loop.
            sock = cast(socket.socket, cast(Any, server).socket)
            sock.setblocking(False)
            server.timeout = None
            self._selector.register(sock, selectors.EVENT_READ, server)
        self._thread = threading.Thread(target=self._run, name="depfence-lab-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                server = cast("socketserver.BaseServer | None", key.data)
                if server is None:
                    return
                try:
                    server.handle_request()
                except Exception:
                    log.warning("lab server %s failed", server.server_address, exc_info=True)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
