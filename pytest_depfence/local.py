"""Who listens at a local destination: the process, command line and unit behind a socket.

A fenced process that connects to loopback, to an address of this machine or
to a unix socket reaches a service outside the fence (DESIGN.md, "Transient
dependencies"). The kernel tells us the destination; this module names the
listener from /proc alone (no eBPF, so any kernel from 5.10 on).

Every answer but the holders is of the network namespace of the calling
thread, which must therefore be the fenced processes' namespace: in this
project the fence's owner shares it with them. (The lab enters its namespace
per thread, so the tables are read from /proc/thread-self/net: /proc/net is
the main thread's.) Sources:
- TCP listeners: sock_diag netlink, asking for LISTEN sockets only, so the
  kernel walks just its listening hash (~20 us). /proc/net/tcp[6] is the
  fallback where sock_diag is missing: its reader walks every bucket of the
  established hash, ~3 ms per file with the 262144 buckets a 24 GB host
  gets, however few sockets the namespace holds.
- UDP and unix sockets: /proc/net/udp[6] and /proc/net/unix.
- Interface addresses: an RTM_GETADDR netlink dump (~15 us). /proc/net/fib_trie
  lists local addresses without their interface, and pyroute2 costs ~130 ms
  to import and ~0.5 ms a dump and cannot run in a thread with an asyncio loop.
- Holders of a socket: /proc/PID/fd; processes we may not read, or that
  exit meanwhile, are skipped.
- A unix socket's path as the connecting process meant it (`socket_path`):
  resolved against its working directory and root, symlinks followed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shlex
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Union

from .policy import unmap

__all__ = ["LocalListener", "LocalPeers", "unit_of"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: Interface addresses are reloaded when older than this, or on a miss the kernel
#: confirms (see `LocalPeers.is_local`).
ADDRESS_REFRESH_S = 1.0
#: A socket no process was seen to hold is searched for again after this long.
NO_HOLDER_RECHECK_S = 1.0
#: Cached socket holders; past this many, the cache starts over (closed sockets pile up).
MAX_CACHED = 4096

_UNIT_SUFFIXES = (".service", ".scope", ".socket")
#: /proc/net/{tcp,udp}[6]: the files, and the state that means "takes connections or
#: datagrams from anyone" (include/net/tcp_states.h).
_TCP_LISTEN = 10
#: The server side of a connection a listener accepted, as long as it is open:
#: ESTABLISHED, SYN_RECV, FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING (not SYN_SENT,
#: TIME_WAIT: no process holds those; not LISTEN).
_TCP_SERVED = sum(1 << state for state in (1, 3, 4, 5, 8, 9, 11))
_TCP_CLOSE = 7  # a UDP socket bound and not connected to one peer
_PROC_NET = {"tcp": (("tcp", "tcp6"), _TCP_LISTEN), "udp": (("udp", "udp6"), _TCP_CLOSE)}
_SO_ACCEPTCON = 0x10000  # /proc/net/unix flags of a listening socket
_SOCK_DGRAM = 2  # /proc/net/unix type

# Netlink (linux/netlink.h, rtnetlink.h, sock_diag.h, inet_diag.h, if_addr.h).
_NLMSG = struct.Struct("=LHHLL")  # length, type, flags, seq, pid
_NLM_F_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20
_RTM_GETADDR = 22
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zero inet_diag_sockid (48).
_DIAG_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sport (network order), dport, src (16),
# dst (16), interface, cookie (8), expires, rqueue, wqueue, uid, then the inode.
_DIAG_MSG = struct.Struct("=4xH2x16s16x12x16xI")
_GONE = (FileNotFoundError, ProcessLookupError, PermissionError)


def unit_of(cgroup: str) -> str | None:
    """The systemd unit of a cgroup v2 path: its last .service/.scope/.socket component."""
    for part in reversed(cgroup.split("/")):
        if part.endswith(_UNIT_SUFFIXES):
            return part
    return None


def socket_path(pid: int, path: str) -> str:
    """A unix socket's path as the process `pid` meant it, symlinks resolved: relative to
    its working directory, under its root (/var/run/docker.sock is /run/docker.sock).
    An abstract name (@name) is a name; a process already gone: the path resolved here."""
    if path.startswith("@"):
        return path
    root = f"/proc/{pid}/root"
    try:
        absolute = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)  # `path` if absolute
        # Python 3.9's realpath raises when the process exits while it reads the link.
        resolved, prefix = os.path.realpath(root + absolute), os.path.realpath(root)
    except OSError:
        return os.path.realpath(path)
    return "/" + os.path.relpath(resolved, prefix) if resolved.startswith(prefix) else resolved


@dataclass(frozen=True)
class LocalListener:
    #: A process holding the socket (see `LocalPeers.listener`); None: no process holds it.
    pid: int | None
    cmdline: str | None
    #: The cgroup v2 path ("0::" line of /proc/PID/cgroup), as the reader's cgroup ns shows it.
    cgroup: str | None
    unit: str | None
    inode: int

    def describe(self) -> str:
        """One line, e.g. `pid 812 squid -f /etc/squid/squid.conf (unit squid.service)`."""
        if self.pid is None:
            return f"socket inode {self.inode}, no process holds it"
        text = f"pid {self.pid} {self.cmdline}" if self.cmdline else f"pid {self.pid}"
        if self.unit:
            return f"{text} (unit {self.unit})"
        return f"{text} (cgroup {self.cgroup})" if self.cgroup else text


class LocalPeers:
    """Finds who listens at a local destination.

    Caches socket inode -> holding process (a listening socket keeps its
    inode; a pid that no longer holds it is looked up again) and the
    interface addresses. The socket tables themselves are read on every
    lookup, so a socket that is gone is never reported.

    `proc` relocates the /proc reads (tests give a tree of their own); the
    netlink answers (TCP listeners, interface addresses) always come from the
    running kernel. Shared between threads without a lock: each cache entry is
    replaced by one assignment, and the worst race is two threads doing the
    same reload.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._addresses: dict[IPAddress, str] = {}  # address -> interface name
        self._addresses_at = -ADDRESS_REFRESH_S
        self._holders: dict[int, tuple[int | None, str, float]] = {}  # inode -> pid, fd, when

    # --- is this destination on this machine -------------------------------------------

    def is_local(self, address: IPAddress) -> bool:
        """Whether a connection to `address` stays on this machine.

        Loopback (127/8, ::1, ::ffff:127.x.y.z), the unspecified address (Linux
        connects 0.0.0.0 and :: to loopback), or an address assigned to an
        interface other than ``lo``. Other addresses on ``lo`` are not local:
        the test lab puts its stand-in internet hosts (10.77.x.y, fd77::...) on
        ``lo`` of a private network namespace, and they must be judged as remote.
        """
        address = unmap(address)
        if address.is_loopback or address.is_unspecified:
            return True
        now = time.monotonic()
        # A miss reloads only when a bind() probe (~6 us) says the kernel has the
        # address, so a stream of remote destinations costs no reloads.
        if now - self._addresses_at >= ADDRESS_REFRESH_S or (
            address not in self._addresses and _assigned(address)
        ):
            self._addresses = _interface_addresses()
            self._addresses_at = now
        interface = self._addresses.get(address)
        return interface is not None and interface != "lo"

    # --- which socket, and who holds it --------------------------------------------------

    def listener(
        self,
        protocol: str,
        address: str | IPAddress,
        port: int | None = None,
        *,
        candidates: Iterable[int] = (),
    ) -> LocalListener | None:
        """Who listens at `address` (and `port`) for `protocol`; None if nobody does.

        "tcp": a socket in LISTEN state on that address or a wildcard (a v6
        wildcard also takes v4 unless it is v6only, which the kernel does not
        show); with none, the server side of a connection accepted there that is
        still open (a one-shot server closed its listener after accepting). "udp":
        an unconnected socket bound there. 0.0.0.0 and :: are looked up as
        loopback, where Linux connects them. "unix": `address` is
        the path, "@name" for an abstract socket; a listening or a bound
        datagram socket at that path as given or through os.path.realpath.

        The pid is the lowest of the processes holding the socket, but not pid
        1 when another holds it too: systemd keeps the sockets it activates
        services with, and the service is the listener worth naming. Processes
        in `candidates` are looked at first, then every /proc/PID/fd.
        """
        if protocol == "unix":
            inodes = self._unix_inodes(str(address))
        elif protocol in _PROC_NET:
            if port is None:
                raise ValueError(f"a {protocol} listener needs a port (address {address})")
            inodes = self._inet_inodes(protocol, ipaddress.ip_address(address), port)
        else:
            raise ValueError(f"protocol {protocol!r} is none of tcp, udp, unix")
        pids = sorted(set(candidates))
        unheld: LocalListener | None = None
        for inode in inodes:
            found = self._listener_of(inode, pids)
            if found.pid is not None:
                return found
            unheld = unheld or found
        if protocol == "tcp" and port is not None:
            # No process holds a listener there (any more): one that accepted is named
            # by the connection it accepted (looked for after the listeners, so a
            # listener closed between the two reads is not missed).
            for inode in self._served_inodes(ipaddress.ip_address(address), port):
                found = self._listener_of(inode, pids)
                if found.pid is not None:
                    return found
        return unheld

    def _inet_inodes(self, protocol: str, address: IPAddress, port: int) -> list[int]:
        """Inodes bound to `address` first (the kernel prefers them), then to a wildcard."""
        address = unmap(address)
        if address.is_unspecified:
            address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        exact: list[int] = []
        wildcard: list[int] = []
        for bound, bound_port, inode in self._bound(protocol):
            if bound_port != port:
                continue
            bound = unmap(bound)
            if bound == address:
                exact.append(inode)
            elif bound.is_unspecified and bound.version in (address.version, 6):
                wildcard.append(inode)
        return exact + wildcard

    def _served_inodes(self, address: IPAddress, port: int) -> list[int]:
        """The server side of connections accepted at `address`:`port` that are still open:
        a one-shot server (`nc -l`) closes its listener once it has accepted."""
        address = unmap(address)
        if address.is_unspecified:
            address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        try:
            served = list(_tcp_listeners(_TCP_SERVED))
        except OSError:
            return []
        return [i for bound, p, i in served if p == port and unmap(bound) == address and i]

    def _bound(self, protocol: str) -> Iterable[tuple[IPAddress, int, int]]:
        """(address, port, inode) of each socket that takes connections or datagrams."""
        if protocol == "tcp":
            try:
                return list(_tcp_listeners())
            except OSError:
                pass  # no sock_diag in this kernel: the tables, slower
        files, state = _PROC_NET[protocol]
        return [
            (_proc_net_address(bound), int(port, 16), int(fields[9]))
            for name in files
            for fields in _rows(f"{self._proc}/thread-self/net/{name}", 10)
            if int(fields[3], 16) == state
            for bound, port in [fields[1].split(":")]
        ]

    def _unix_inodes(self, path: str) -> list[int]:
        # Num RefCount Protocol Flags Type St Inode Path: the path may hold spaces.
        paths = {path} if path.startswith("@") else {path, os.path.realpath(path)}
        return [
            int(fields[6])
            for fields in _rows(f"{self._proc}/thread-self/net/unix", 8, split=7)
            if fields[7].rstrip("\n") in paths
            and (int(fields[3], 16) & _SO_ACCEPTCON or int(fields[4], 16) == _SOCK_DGRAM)
        ]

    def _listener_of(self, inode: int, candidates: list[int]) -> LocalListener:
        target = f"socket:[{inode}]"
        pid, fd, when = self._holders.get(inode, (None, "", -NO_HOLDER_RECHECK_S))
        now = time.monotonic()
        held = pid is not None and _readlink(f"{self._proc}/{pid}/fd/{fd}") == target
        if not held and (pid is not None or now - when >= NO_HOLDER_RECHECK_S):
            if len(self._holders) >= MAX_CACHED:
                self._holders = {}
            pid, fd = self._find_holder(target, candidates)
            self._holders[inode] = (pid, fd, now)
        if pid is None:
            return LocalListener(None, None, None, None, inode)
        cgroup = self._cgroup(pid)
        return LocalListener(pid, self._cmdline(pid), cgroup, cgroup and unit_of(cgroup), inode)

    def _find_holder(self, target: str, candidates: list[int]) -> tuple[int | None, str]:
        """The lowest pid holding `target` (not pid 1 if another does), candidates first."""
        for pids in (candidates, self._other_pids(set(candidates))):
            init_fd = None
            for pid in pids:
                fd = self._fd_holding(pid, target)
                if fd is not None and pid != 1:
                    return pid, fd
                if fd is not None:
                    init_fd = fd
            if init_fd is not None:
                return 1, init_fd
        return None, ""

    def _other_pids(self, known: set[int]) -> Iterator[int]:
        """Every pid but `known`, ascending; /proc is listed only once this is iterated."""
        pids = sorted(int(name) for name in os.listdir(self._proc) if name.isdigit())
        yield from (pid for pid in pids if pid not in known)

    def _fd_holding(self, pid: int, target: str) -> str | None:
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except _GONE:
            return None
        for fd in fds:
            if _readlink(f"{fd_dir}/{fd}") == target:
                return fd
        return None

    def _cmdline(self, pid: int) -> str | None:
        raw = _read(f"{self._proc}/{pid}/cmdline")
        if not raw:
            return None
        return shlex.join(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0"))

    def _cgroup(self, pid: int) -> str | None:
        raw = _read(f"{self._proc}/{pid}/cgroup") or b""
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("0::"):
                return line[3:]
        return None


def _rows(path: str, width: int, *, split: int = -1) -> Iterator[list[str]]:
    """The whitespace-separated rows, after the header, of a /proc/net table (if any:
    booted with ipv6.disable=1, a kernel has no tcp6 or udp6)."""
    try:
        f = open(path)
    except FileNotFoundError:
        return
    with f:
        next(f, None)
        for line in f:
            fields = line.split(None, split)
            if len(fields) >= width:
                yield fields


def _proc_net_address(text: str) -> IPAddress:
    """An address as /proc/net/{tcp,udp}[6] print it: 32-bit words in host byte order."""
    words = (int(text[i : i + 8], 16) for i in range(0, len(text), 8))
    return ipaddress.ip_address(b"".join(struct.pack("=I", word) for word in words))


def _netlink_dump(protocol: int, kind: int, request: bytes) -> Iterator[bytes]:
    """The payload of each message a netlink dump answers; OSError if the kernel refuses."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as nl:
        header = _NLMSG.pack(_NLMSG.size + len(request), kind, _NLM_F_DUMP_REQUEST, 1, 0)
        nl.sendall(header + request)
        while True:
            data = nl.recv(65536)  # a dump message is at most 32 KiB
            offset = 0
            while offset < len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                    raise OSError(code, os.strerror(code))
                yield data[offset + _NLMSG.size : offset + length]
                offset += (length + 3) & ~3


def _tcp_listeners(states: int = 1 << _TCP_LISTEN) -> Iterator[tuple[IPAddress, int, int]]:
    """(local address, port, inode) of each TCP socket in `states` (a mask; default:
    LISTEN), from sock_diag."""
    for family, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states)
        for msg in _netlink_dump(_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, request):
            port, address, inode = _DIAG_MSG.unpack_from(msg)
            yield ipaddress.ip_address(address[:size]), socket.ntohs(port), inode


def _interface_addresses() -> dict[IPAddress, str]:
    """Every address of this network namespace, and the name of its interface."""
    found: dict[IPAddress, str] = {}
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for msg in _netlink_dump(socket.NETLINK_ROUTE, _RTM_GETADDR, request):
        family, _, _, _, index = _IFADDRMSG.unpack_from(msg)
        attrs: dict[int, bytes] = {}
        offset = _IFADDRMSG.size
        while offset + _RTATTR.size <= len(msg):
            length, kind = _RTATTR.unpack_from(msg, offset)
            attrs[kind] = msg[offset + _RTATTR.size : offset + length]
            offset += max((length + 3) & ~3, _RTATTR.size)
        # IFA_LOCAL is the address itself; IFA_ADDRESS the peer on point-to-point links.
        address = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if family in (socket.AF_INET, socket.AF_INET6) and address:
            found[ipaddress.ip_address(address)] = _interface_name(index)
    return found


def _assigned(address: IPAddress) -> bool:
    """Whether the kernel may own `address` here: bind() fails with EADDRNOTAVAIL if not.

    Says yes to anything under net.ipv4.ip_nonlocal_bind, and to a link-local
    address without its scope (EINVAL): a reload (~15 us) then answers.
    """
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def _interface_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:  # removed since the dump
        return ""


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except _GONE:
        return None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read: the pid alone still names it
        return None
