"""The lab's HTTP servers: port 80 of every lab address, serving routes and static trees.

What each host serves is decided in ``content``; this module only answers
GET and HEAD from those tables (the git repository is a static tree: dumb
HTTP) and records every request for ``Lab.http_log()``.
"""

from __future__ import annotations

import http.server
import socketserver
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .hosts import LabHost
from .servers import _ConnectionThreads, _family_of

_Route = Callable[[], tuple[int, str, bytes]]


class _LabHTTPServer(_ConnectionThreads, http.server.ThreadingHTTPServer):
    label = "http"

    def __init__(
        self,
        address: str,
        host: LabHost,
        routes: dict[str, _Route],
        static: dict[str, Path],
        record: Callable[[str, str, str], None],
    ) -> None:
        self.address_family = _family_of(address)
        self.host = host
        self.routes = routes
        self.static = static
        self.record = record
        super().__init__((address, 80), _LabHTTPHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup
        # through the machine's resolver; the lab must never ask it anything.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class _LabHTTPHandler(http.server.BaseHTTPRequestHandler):
    server: _LabHTTPServer
    timeout = 30
    server_version = "depfence-lab"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass  # requests go to Lab.http_log(), not stderr

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        self.server.record(
            str(self.server.server_address[0]), self.headers.get("Host", ""), self.path
        )
        path = self.path.split("?", 1)[0]
        status, content_type, body = self._lookup(path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _lookup(self, path: str) -> tuple[int, str, bytes]:
        route = self.server.routes.get(path)
        if route is not None:
            return route()
        for prefix, root in self.server.static.items():
            if path.startswith(prefix + "/"):
                file = (root / path[len(prefix) + 1 :]).resolve()
                if file.is_relative_to(root) and file.is_file():
                    kind = (
                        "text/plain"
                        if file.name in ("refs", "packs", "HEAD")
                        else "application/octet-stream"
                    )
                    return 200, kind, file.read_bytes()
        return 404, "text/plain", b"not found\n"
