"""The "reset" outage's refuser: a loopback port bound but never listening.

A connection the fence refuses with outage "reset" is redirected here by
bpf/sockaddr.c, so it fails at once with ECONNREFUSED, as a host that is up
but closed would, instead of EPERM.
"""

from __future__ import annotations

import errno
import socket


class Refuser:
    """A loopback port bound but never listening: connecting to it is refused at once."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(32):
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind(("127.0.0.1", 0))
            self.port = first.getsockname()[1]
            self.sockets = [first]
            try:
                v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            except OSError:
                return  # no IPv6 here: nothing to refuse on
            try:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                v6.bind(("::1", self.port))
            except OSError as exc:
                v6.close()
                if exc.errno == errno.EADDRINUSE:
                    self.close()
                    continue
                return  # no IPv6 loopback here: nothing to refuse on
            self.sockets.append(v6)
            return
        raise OSError(errno.EADDRINUSE, "no free loopback port for refusing connections")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
