"""The test lab: a private network namespace that plays the internet for fenced tests.

This package owns everything about that stand-in world: the namespace (made
with ``unshare`` in the calling thread, configured through pyroute2), the lab
addresses (on the namespace's ``lo``, so no kernel module is needed), the
authoritative DNS server for the lab names (dnslib; UDP and TCP, IPv4 and
IPv6, ports 53 and ``Lab.ALT_PORT``) and the HTTP servers on port 80 of every
lab host (fake GitHub with a dumb-HTTP git repository and release assets, an
internal mirror, a plain-HTTP ``dns.google``; ``migrations.internal`` serves only
its index page: the migrations service itself is ``examples/tools/migrations-service``,
which tests start on loopback, fenced or not).

Nothing the lab runs can reach the machine's network or resolver: the
namespace has only its own addresses and no route to anywhere else, so a
stray connect fails with ENETUNREACH before any packet exists.

Usage (root)::

    with Lab() as lab:          # this thread, and what it starts, now live in the lab
        subprocess.run(["curl", f"http://{lab.address('github.com')}/"])
        Fence(policy, upstream=lab.upstream)

Only the thread that entered the lab (and threads and processes it starts
afterwards) is inside the namespace; ``__exit__`` must run in that thread and
puts it back where it was.

Where things are: ``hosts`` (lab names and addresses), ``netns`` (the
namespace), ``dns`` (the authoritative server), ``http`` (the HTTP servers),
``content`` (what each host serves: git repository, release archive),
``servers`` (connection threads and the one dispatcher thread), ``errors``.
This module assembles them into ``Lab``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import ClassVar

# Lab._build looks these up in this module's namespace at call time, so a test
# can make one step fail by patching pytest_depfence.lab._make_git_repo (and so on).
from ..dnsproxy import parking
from .content import _make_git_repo, _make_tool_archive, _site
from .dns import _DNSTCPServer, _DNSUDPServer, _Zone
from .errors import LabError
from .hosts import _LAB_HOSTS, LabHost
from .http import _LabHTTPServer
from .netns import _configure_addresses, _ensure_ipv6, _setns, _thread_netns_path, _unshare_netns
from .servers import _ConnectionThreads, _Dispatcher

__all__ = ["Lab", "LabError", "LabHost"]


class Lab:
    """A network namespace with fake GitHub, internal services and an authoritative resolver.

    ``with Lab() as lab:`` moves the calling thread into the lab; processes it
    starts inherit it. Use ``lab.upstream`` as the fence's upstream resolver.
    """

    RESOLVER4: ClassVar[str] = "10.77.0.53"
    RESOLVER6: ClassVar[str] = "fd77::53"
    ALT_PORT: ClassVar[int] = 5300  # a "second resolver" for bypass tests

    hosts: dict[str, LabHost]

    def __init__(self) -> None:
        self.hosts = {name: LabHost(name, v4, v6) for name, (v4, v6) in _LAB_HOSTS.items()}
        self._log: list[tuple[str, str, str]] = []
        self._log_lock = threading.Lock()
        self._stack: contextlib.ExitStack | None = None
        self._thread_id: int | None = None
        self._entered = False

    # -- addresses

    @property
    def upstream(self) -> str:
        """The lab resolver as a fence upstream, ``HOST:PORT``."""
        return f"{self.RESOLVER4}:53"

    def address(self, name: str, family: int = 4) -> str:
        """The lab address of `name` for IP version 4 or 6 (socket.AF_INET/AF_INET6 work too)."""
        host = self.hosts.get(name.rstrip(".").lower())
        if host is None:
            known = ", ".join(sorted(self.hosts))
            raise KeyError(f"{name!r} is not a lab host (lab hosts: {known})")
        if family in (4, socket.AF_INET):
            return host.ipv4
        if family in (6, socket.AF_INET6):
            return host.ipv6
        raise ValueError(f"family must be 4 or 6, not {family!r}")

    # -- HTTP log

    def http_log(self) -> list[tuple[str, str, str]]:
        """(address the request arrived on, Host header, path) of every HTTP request served."""
        with self._log_lock:
            return list(self._log)

    def clear_http_log(self) -> None:
        """Forget the requests served so far (a per-test fixture calls this)."""
        with self._log_lock:
            self._log.clear()

    def _record(self, address: str, host: str, path: str) -> None:
        with self._log_lock:
            self._log.append((address, host, path))

    # -- lifecycle

    def __enter__(self) -> Lab:
        if self._entered:
            raise LabError("this Lab is already entered; a Lab can be entered once at a time")
        self._entered = True
        stack = contextlib.ExitStack()
        try:
            self._build(stack)
        except BaseException:
            self._entered = False
            stack.close()
            raise
        self._stack = stack
        self._thread_id = threading.get_native_id()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is None:
            raise LabError("this Lab was not entered")
        if threading.get_native_id() != self._thread_id:
            raise LabError("a Lab must be exited from the thread that entered it")
        stack, self._stack = self._stack, None
        self._entered = False
        self._thread_id = None
        stack.close()

    def _build(self, stack: contextlib.ExitStack) -> None:
        original = os.open(_thread_netns_path(), os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, original)
        _unshare_netns()
        # Undone last: everything else is torn down from inside the lab.
        stack.callback(_setns, original)
        # A fence's proxy parked in the lab would keep its namespace alive (`parking`).
        stack.callback(parking.release, os.stat(_thread_netns_path()).st_ino)

        addresses: list[tuple[str, int]] = [
            (self.RESOLVER4, socket.AF_INET),
            (self.RESOLVER6, socket.AF_INET6),
        ]
        for host in self.hosts.values():
            addresses += [(host.ipv4, socket.AF_INET), (host.ipv6, socket.AF_INET6)]
        _ensure_ipv6()
        _configure_addresses(addresses)

        workdir = Path(tempfile.mkdtemp(prefix="depfence-lab-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        repo = _make_git_repo(workdir)

        servers: list[socketserver.BaseServer] = []

        def close_servers() -> None:
            for server in servers:
                if isinstance(server, _ConnectionThreads):
                    server.close_connections()
                server.server_close()

        stack.callback(close_servers)

        zone = _Zone(self.hosts)
        for resolver in (self.RESOLVER4, self.RESOLVER6):
            for port in (53, self.ALT_PORT):
                servers.append(_DNSUDPServer((resolver, port), zone))
                servers.append(_DNSTCPServer((resolver, port), zone))

        archive = _make_tool_archive()
        for host in self.hosts.values():
            routes, static = _site(host, repo, archive)
            for address in (host.ipv4, host.ipv6):
                servers.append(_LabHTTPServer(address, host, routes, static, self._record))

        dispatcher = _Dispatcher(servers)
        # Registered after close_servers, so it runs first: stop accepting, then close.
        stack.callback(dispatcher.stop)
        dispatcher.start()
