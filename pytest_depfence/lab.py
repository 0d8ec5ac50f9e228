"""The test lab: a private network namespace that plays the internet for fenced tests.

This module owns everything about that stand-in world: the namespace (made
with ``unshare`` in the calling thread, configured through pyroute2), the lab
addresses (on the namespace's ``lo``, so no kernel module is needed), the
authoritative DNS server for the lab names (dnslib; UDP and TCP, IPv4 and
IPv6, ports 53 and ``Lab.ALT_PORT``) and the HTTP servers on port 80 of every
lab host (fake GitHub with a dumb-HTTP git repository and release assets, an
internal mirror, an internal migrations service, a plain-HTTP ``dns.google``).

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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import http.server
import io
import json
import logging
import os
import selectors
import shutil
import socket
import socketserver
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, cast

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord

from .errors import DepfenceError

__all__ = ["Lab", "LabError", "LabHost"]

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02  # from linux/if_addr.h: usable at once, no duplicate address detection

# Every lab name: (IPv4, IPv6). IPv4 in 10.77.0.0/16, IPv6 in fd77::/64.
_LAB_HOSTS: dict[str, tuple[str, str]] = {
    "github.com": ("10.77.1.1", "fd77::1:1"),
    "api.github.com": ("10.77.1.2", "fd77::1:2"),
    "codeload.github.com": ("10.77.1.3", "fd77::1:3"),
    "objects.githubusercontent.com": ("10.77.2.1", "fd77::2:1"),
    "raw.githubusercontent.com": ("10.77.2.2", "fd77::2:2"),
    "mirror.internal": ("10.77.3.1", "fd77::3:1"),
    "migrations.internal": ("10.77.3.2", "fd77::3:2"),
    "pypi.internal": ("10.77.3.3", "fd77::3:3"),
    "dns.google": ("10.77.8.8", "fd77::8:8"),
}

# An allowed-looking name whose chain ends at a blocked one.
_LAB_CNAMES: dict[str, str] = {
    "downloads.mirror.internal": "objects.githubusercontent.com",
}

# Zones the lab claims; the SOA of a negative answer is the closest one (else the root).
_LAB_ZONES = ("github.com", "githubusercontent.com", "internal", "dns.google")

TTL = 60

RELEASE_TAG = "v1.2.3"
GIT_REPO_PATH = "/org/tool.git"


@dataclass(frozen=True)
class LabHost:
    """A lab name and the addresses the lab DNS gives for it (HTTP listens on both)."""

    name: str
    ipv4: str
    ipv6: str


class LabError(DepfenceError, RuntimeError):
    """The lab could not be built, or was used out of order (entered twice, exited unentered)."""


# --------------------------------------------------------------------------- namespace


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _thread_netns_path() -> str:
    # /proc/self/ns/net is the thread-group leader's namespace, not this thread's.
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def _unshare_netns() -> None:
    """Move the calling thread (only) into a fresh network namespace.

    A bare unshare keeps the namespace anonymous: nothing is mounted under
    /run/netns, so a crashed run leaves nothing behind and the namespace dies
    with its last thread, process or socket.
    """
    libc = _libc()
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (the lab needs root: CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise LabError(f"cannot create the lab network namespace: {os.strerror(err)}{hint}")


def _setns(fd: int) -> None:
    libc = _libc()
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"cannot return to the original network namespace: {os.strerror(err)}")


def _ensure_ipv6() -> None:
    # /proc/sys/net resolves against the calling thread's namespace.
    for iface in ("all", "default", "lo"):
        path = Path(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6")
        try:
            if path.read_text().strip() != "0":
                path.write_text("0\n")
        except OSError as exc:
            raise LabError(f"IPv6 is unavailable in the lab namespace ({path}: {exc})") from exc


def _configure_addresses(addresses: list[tuple[str, int]]) -> None:
    """Bring lo up and put every lab address on it.

    Addresses live on lo rather than a dummy device: dummy is a module some
    kernels lack, and local traffic goes through the loopback device anyway.
    Only host routes exist, so anything off-lab is unreachable.
    """
    from pyroute2 import IPRoute  # heavy; only when a lab is built

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
        for address, family in addresses:
            prefixlen = 32 if family == socket.AF_INET else 128
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


# --------------------------------------------------------------------------- DNS


class _Zone:
    """The authoritative data of the lab DNS and the answer logic."""

    def __init__(self, hosts: dict[str, LabHost]) -> None:
        self.hosts = hosts
        self.cnames = dict(_LAB_CNAMES)
        names = set(hosts) | set(self.cnames) | set(_LAB_ZONES)
        # Empty non-terminals (githubusercontent.com, internal, com) exist: NODATA, not NXDOMAIN.
        self.existing = set(names)
        for name in names:
            labels = name.split(".")
            for i in range(1, len(labels)):
                self.existing.add(".".join(labels[i:]))

    @staticmethod
    def _zone_of(name: str) -> str:
        best = ""
        for zone in _LAB_ZONES:
            if (name == zone or name.endswith("." + zone)) and len(zone) > len(best):
                best = zone
        return best + "."

    def _soa(self, name: str) -> Any:
        zone = self._zone_of(name)
        soa = SOA("ns.depfence-lab.", "hostmaster.depfence-lab.", (1, 3600, 600, 86400, TTL))
        return RR(zone, QTYPE.SOA, ttl=TTL, rdata=soa)

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to one wire query, or None for garbage that deserves no answer."""
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError):
            return None
        if request.header.qr:
            return None
        reply = request.reply(ra=1, aa=1)
        reply.header.ad = 0  # copied from the query's flags; the lab validates nothing
        reply.header.tc = 0
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(EDNS0(udp_len=1232))
        if request.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return cast(bytes, reply.pack())
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return cast(bytes, reply.pack())
        question = request.q
        if question.qclass not in (1, 255):  # IN, ANY
            reply.header.rcode = RCODE.REFUSED
            return cast(bytes, reply.pack())

        qtype = question.qtype
        # The first owner is the question's name as sent: its case is echoed.
        owner: Any = question.qname
        current = b".".join(question.qname.label).decode("ascii", "replace").lower()
        for _ in range(8):  # bounded CNAME chase
            target = self.cnames.get(current)
            if target is None:
                break
            reply.add_answer(RR(owner, QTYPE.CNAME, ttl=TTL, rdata=CNAME(target + ".")))
            if qtype == QTYPE.CNAME:
                return cast(bytes, reply.pack())
            owner, current = target + ".", target

        host = self.hosts.get(current)
        if host is not None:
            added = False
            if qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(owner, QTYPE.A, ttl=TTL, rdata=A(host.ipv4)))
                added = True
            if qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(owner, QTYPE.AAAA, ttl=TTL, rdata=AAAA(host.ipv6)))
                added = True
            if not added:
                reply.add_auth(self._soa(current))
        elif current in self.existing or current == "":
            reply.add_auth(self._soa(current))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa(current))
        return cast(bytes, reply.pack())


# --------------------------------------------------------------------------- servers


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


class _DNSUDPServer(socketserver.UDPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: _Zone) -> None:
        self.address_family = _family_of(address[0])
        self.zone = zone
        super().__init__(address, _DNSUDPHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("lab dns: error answering %s", client_address, exc_info=True)


class _DNSUDPHandler(socketserver.BaseRequestHandler):
    server: _DNSUDPServer

    def handle(self) -> None:
        data, sock = cast(tuple[bytes, socket.socket], self.request)
        reply = self.server.zone.answer(data)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _DNSTCPServer(_ConnectionThreads, socketserver.ThreadingTCPServer):
    label = "dns"
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: _Zone) -> None:
        self.address_family = _family_of(address[0])
        self.zone = zone
        super().__init__(address, _DNSTCPHandler)


class _DNSTCPHandler(socketserver.StreamRequestHandler):
    server: _DNSTCPServer
    timeout = 30  # an idle client does not hold a thread forever

    def handle(self) -> None:
        while True:  # several length-prefixed queries may share a connection
            prefix = self.rfile.read(2)
            if len(prefix) < 2:
                return
            size = int.from_bytes(prefix, "big")
            data = self.rfile.read(size)
            if len(data) < size:
                return
            reply = self.server.zone.answer(data)
            if reply is None:
                return
            self.wfile.write(len(reply).to_bytes(2, "big") + reply)
            self.wfile.flush()


# --------------------------------------------------------------------------- HTTP

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


def _make_tool_archive() -> bytes:
    """A tiny, byte-stable release archive: tool/bin/tool prints its version."""
    script = f"#!/bin/sh\necho tool {RELEASE_TAG}\n".encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("tool/bin/tool")
        info.size, info.mode, info.mtime = len(script), 0o755, 0
        tar.addfile(info, io.BytesIO(script))
    return gzip.compress(raw.getvalue(), mtime=0)


def _make_git_repo(root: Path) -> Path:
    """A bare repository with one commit and a tag, prepared for dumb HTTP."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Lab",
        "GIT_AUTHOR_EMAIL": "lab@mirror.internal",
        "GIT_COMMITTER_NAME": "Lab",
        "GIT_COMMITTER_EMAIL": "lab@mirror.internal",
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    }
    work, bare = root / "tool", root / "tool.git"

    def git(*args: str) -> None:
        try:
            subprocess.run(
                ["git", *args], env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise LabError("the lab needs the `git` command (apt-get install git)") from exc
        except subprocess.CalledProcessError as exc:
            raise LabError(
                f"git {' '.join(args)} failed: {exc.stderr.decode(errors='replace')}"
            ) from exc

    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("tool: served by the depfence lab\n")
    git("-C", str(work), "add", "README")
    git("-C", str(work), "commit", "-q", "-m", "tool")
    git("-C", str(work), "tag", RELEASE_TAG)
    git("clone", "-q", "--bare", str(work), str(bare))
    git("-C", str(bare), "update-server-info")
    return bare


# --------------------------------------------------------------------------- dispatcher


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


# --------------------------------------------------------------------------- the lab


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
            routes, static = self._site(host, repo, archive)
            for address in (host.ipv4, host.ipv6):
                servers.append(_LabHTTPServer(address, host, routes, static, self._record))

        dispatcher = _Dispatcher(servers)
        # Registered after close_servers, so it runs first: stop accepting, then close.
        stack.callback(dispatcher.stop)
        dispatcher.start()

    @staticmethod
    def _site(
        host: LabHost, repo: Path, archive: bytes
    ) -> tuple[dict[str, _Route], dict[str, Path]]:
        """What `host` serves over HTTP: exact paths, and static trees by path prefix."""
        index = f"lab:{host.name}\n".encode()
        routes: dict[str, _Route] = {"/": lambda: (200, "text/plain", index)}
        static: dict[str, Path] = {}
        if host.name == "github.com":
            static[GIT_REPO_PATH] = repo.resolve()
            routes["/org/tool/releases/latest/download/tool.tgz"] = lambda: (
                200,
                "application/gzip",
                archive,
            )
        elif host.name == "api.github.com":
            release = json.dumps({"tag_name": RELEASE_TAG}).encode() + b"\n"
            routes["/repos/org/tool/releases/latest"] = lambda: (200, "application/json", release)
        elif host.name == "mirror.internal":
            routes["/tool.tgz"] = lambda: (200, "application/gzip", archive)
        return routes, static
