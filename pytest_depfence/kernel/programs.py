"""The loaded program set, shared by every fence of this process.

The C sources in `bpf/` are compiled by bcc the first time a fence is built
in a process (`load()`); every later fence reuses the loaded programs and
tells them apart by cgroup id. Programs are attached with bpf_link, so they
are detached when this process exits, however it exits. One thread delivers
ring-buffer events, to the listener subscribed for the event's fence cgroup.

A fenced process moved out of its fence is killed here when the kernel could
not kill it (another process moved it: bpf/escape.c), on the events thread,
before any listener hears of it; so it is killed whoever listens.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import select
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Union

from ..errors import FenceUnavailable
from . import abi, batch, machine, progcache, toolkit
from .abi import BypassEvent, ConnEvent, ContactKey, EscapeEvent, Owner, ProcRecord, UnixEvent

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class KernelFence:
    """What the kernel programs know of one fence cgroup."""

    fence_id: int
    proxy_port: int
    refuser_port: int
    egress_only: bool
    audit: bool
    outage: str  # an outages.KERNEL_ACTIONS entry: what a refused connection meets
    #: A cgroup the fence does not own (an adopted service): its processes are never
    #: killed for leaving it, nor paused when they change their mounts.
    adopted: bool = False
    #: The command keeps CAP_NET_RAW; without it a raw or packet socket that a fenced
    #: process makes all the same (through a user namespace) kills it (bpf/escape.c).
    raw_sockets: bool = False


@dataclass(frozen=True)
class Listener:
    """What a fence run wants to hear from the kernel, called from the events thread."""

    on_connection: Callable[[ConnEvent], None]
    on_bypass: Callable[[BypassEvent], None]
    #: A process of the fence changed its mounts, or wrote or made a hosts file, and is
    #: stopped until this returns: (fence cgroup id, pid, a descriptor of it to read as
    #: well, or -1).
    on_view_change: Callable[[int, int, int], None]
    #: A process of the fence was moved to a cgroup outside it; it has been killed
    #: (moves within the fence are not reported).
    on_escape: Callable[[EscapeEvent], None] | None = None
    #: A process of the fence connected to a unix socket (reached or not: `UnixEvent.ret`).
    on_unix: Callable[[UnixEvent], None] | None = None


def _in_tree(dir_fd: int, cgroup_id: int) -> bool:
    """Whether the cgroup directory `dir_fd`, or one below it, is cgroup `cgroup_id`
    (a cgroup's id is its directory's inode number)."""
    if os.fstat(dir_fd).st_ino == cgroup_id:
        return True
    with os.scandir(dir_fd) as entries:
        below = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    for name in below:
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            if _in_tree(child, cgroup_id):
                return True
        finally:
            os.close(child)
    return False


class Programs:
    """The loaded program set, shared by every fence of this process."""

    def __init__(self, bcc: ModuleType, bpf: Any, fns: dict[str, Any], built: str = "") -> None:
        self.bcc = bcc
        #: How the programs came to be: compiled, or loaded from the cache (progcache).
        self.built = built
        self._bpf = bpf
        self._fns = fns
        # Before any fence is registered: bypass.c and unix.c hash names with it.
        multiplier = bpf.get_table(b"name_hash_mul")
        multiplier[multiplier.Key(0)] = multiplier.Leaf(abi.NAME_HASH_MUL)
        self._fences = bpf.get_table(b"fences")
        self._flows = bpf.get_table(b"dnsflows")
        #: Socket owners: `sockets`, and `sockets_spill` once it is full (bpf/fence.h).
        self._sockets = (bpf.get_table(b"sockets"), bpf.get_table(b"sockets_spill"))
        self._redirected = bpf.get_table(b"redirected")
        self._rawsocks = bpf.get_table(b"rawsocks")
        self._contacts = bpf.get_table(b"contacts")
        self._procs = bpf.get_table(b"procs")
        self._procs_prev = bpf.get_table(b"procs_prev")
        #: pid -> (since, flags, ppid, its decoded record): a record is decoded once per
        #: exec (procs.c sets `since` at each exec and fork), not once per lookup.
        self._decoded: dict[int, tuple[int, int, int, ProcRecord]] = {}
        self._addrs = bpf.get_table(b"addrs")
        self._names = bpf.get_table(b"names")
        self._lost = bpf.get_table(b"lost_events")
        #: The unix paths each process reached, reported once, by fence cgroup (bpf/unix.c).
        self._unix_reached = bpf.get_table(b"unix_reached")
        self._hosts_files = bpf.get_table(b"hosts_files")
        #: (dev, ino) of each hosts file in `hosts_files` -> the fence cgroups that read it.
        self._hosts_readers: dict[tuple[int, int], set[int]] = {}
        self._hosts_lock = threading.Lock()
        self._events_lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        #: Fence cgroup id -> its directory (an fd of our own): what lies below it.
        self._dirs: dict[int, int] = {}
        #: Ring buffer -> the sizes of the events received on it (the C's sizeof).
        self.event_sizes: dict[str, set[int]] = {ring: set() for ring in abi.RINGS}
        handlers = {
            "conn_events": self._dispatch("conn_events", abi.decode_conn, "on_connection"),
            "bypass_events": self._dispatch("bypass_events", abi.decode_bypass, "on_bypass"),
            "view_events": self._on_view_event,
            "escape_events": self._on_escape_event,
            "unix_events": self._dispatch("unix_events", abi.decode_unix, "on_unix"),
        }
        self._rings = []
        for ring, handler in handlers.items():
            table = bpf.get_table(ring.encode())
            table.open_ring_buffer(handler)
            self._rings.append(table)
        # One thread delivers events as they come: a process paused by mounts.c
        # waits for it. Consuming is serialized by _events_lock.
        self._poller = threading.Thread(target=self._poll, name="depfence-events", daemon=True)
        self._poller.start()

    def table(self, name: str) -> Any:
        """A map of the loaded programs by name (bcc table; for checks and debugging)."""
        return self._bpf.get_table(name.encode())

    # -- fences ---------------------------------------------------------------
    def register(self, cgroup_id: int, fence: KernelFence, dir_fd: int) -> None:
        """Cgroup `cgroup_id` (its directory open at `dir_fd`) is a fence's: its processes
        are judged by `fence` (the programs it has, attached to it or an ancestor, look
        it up). A copy of `dir_fd` is kept until `unregister`: which cgroups are inside
        the fence (`_on_escape_event`)."""
        own = os.dup(dir_fd)
        with self._events_lock:
            old = self._dirs.get(cgroup_id)
            self._dirs[cgroup_id] = own
        if old is not None:
            os.close(old)
        leaf = self._fences.Leaf()
        leaf.fence_id = fence.fence_id
        leaf.proxy_port = fence.proxy_port
        leaf.refuser_port = fence.refuser_port
        leaf.flags = (
            (abi.FenceFlag.EGRESS_ONLY if fence.egress_only else 0)
            | (abi.FenceFlag.AUDIT if fence.audit else 0)
            | (abi.FenceFlag.ADOPTED if fence.adopted else 0)
            | (abi.FenceFlag.RAW_SOCKETS if fence.raw_sockets else 0)
        )
        leaf.outage = abi.OUTAGE_CODES[fence.outage]
        self._fences[self._fences.Key(cgroup_id)] = leaf

    def unregister(self, cgroup_id: int) -> None:
        """Forget a fence cgroup and everything recorded of it: its process records, its
        sockets' owners and DNS destinations, its DNS flows, its uncounted contacts (the
        socket maps only if its programs ever recorded a socket of it: `touched`), the
        unix paths its processes sent datagrams to."""
        fence_key = self._fences.Key(cgroup_id)
        touched = True
        try:
            touched = bool(self._fences[fence_key].touched)
            del self._fences[fence_key]
        except KeyError:
            pass
        with self._events_lock:  # not while the events thread walks it
            fd = self._dirs.pop(cgroup_id, None)
        if fd is not None:
            os.close(fd)
        gone = [k for k, leaf in batch.entries(self._procs) if leaf.cgid == cgroup_id]
        batch.delete(self._procs, gone)
        batch.delete(self._procs_prev, gone)  # a record before an exec is its pid's
        for key in gone:
            self._decoded.pop(key.value, None)
        batch.delete(self._lost, [self._lost.Key(cgroup_id)])
        reached = [k for k, _ in batch.entries(self._unix_reached) if k.cgid == cgroup_id]
        batch.delete(self._unix_reached, reached)
        if touched:
            self._forget_sockets(cgroup_id)
            self.take_contacts({cgroup_id})
        with self._hosts_lock:
            unread = []
            for key, readers in self._hosts_readers.items():
                readers.discard(cgroup_id)
                if not readers:
                    unread.append(key)
            for key in unread:
                del self._hosts_readers[key]
            batch.delete(self._hosts_files, [self._file_key(*key) for key in unread])

    def _forget_sockets(self, cgroup_id: int) -> None:
        """One pass over each socket map: the owners recorded for the cgroup's sockets (and
        raw sockets: sockcreate.c), the DNS destinations of those sockets (`redirected` is
        keyed by socket cookie), and the DNS messages they sent (`dnsflows`). A socket whose
        owner `sockets_spill` already evicted leaves its `redirected` entry to that map's
        own eviction."""
        raw = [k for k, owner in batch.entries(self._rawsocks) if owner.cgid == cgroup_id]
        batch.delete(self._rawsocks, raw)
        cookies: set[int] = set()
        for table in self._sockets:
            mine = [k for k, owner in batch.entries(table) if owner.cgid == cgroup_id]
            batch.delete(table, mine)
            cookies.update(k.value for k in mine)
        if cookies:
            redirected = batch.entries(self._redirected)
            batch.delete(self._redirected, [k for k, _ in redirected if k.value in cookies])
        flows = batch.entries(self._flows)
        batch.delete(self._flows, [k for k, owner in flows if owner.cgid == cgroup_id])

    # -- hosts files ------------------------------------------------------------
    def _file_key(self, dev: int, ino: int) -> Any:
        key = self._hosts_files.Key()
        key.dev = dev
        key.ino = ino
        return key

    def watch_hosts_file(self, cgroup_id: int, dev: int, ino: int) -> None:
        """Fence cgroup `cgroup_id` read the file (dev, ino) as a hosts file: a process of
        a fence that writes into it is paused until it has been read again
        (bpf/hostsfile.c); forgotten when no fence that read it is registered."""
        with self._hosts_lock:
            readers = self._hosts_readers.setdefault((dev, ino), set())
            if not readers:
                self._hosts_files[self._file_key(dev, ino)] = self._hosts_files.Leaf(1)
            readers.add(cgroup_id)

    def attach(self, cgroup_fd: int) -> list[int]:
        """Attach every cgroup program to one cgroup (and so to every cgroup below it);
        returns the link fds (close to detach)."""
        links: list[int] = []
        try:
            for name, attach_type in toolkit.ATTACH_TYPES.items():
                links.append(toolkit.bpf_link_create(self._fns[name].fd, cgroup_fd, attach_type))
        except OSError:
            for fd in links:
                os.close(fd)
            raise
        return links

    # -- addresses ------------------------------------------------------------
    def _addr_key(self, fence_id: int, network: IPNetwork) -> Any:
        key = self._addrs.Key()
        mapped_prefix = 96 if isinstance(network, ipaddress.IPv4Network) else 0
        key.prefixlen = 32 + mapped_prefix + network.prefixlen
        key.fence_id = fence_id
        offset = type(key).ip6.offset
        ctypes.memmove(ctypes.addressof(key) + offset, abi.mapped(network.network_address), 16)
        return key

    def add_network(self, fence_id: int, network: IPNetwork, verdict: str) -> None:
        """Judge every address in `network` for this fence: "block" or "allow"."""
        leaf = self._addrs.Leaf()
        leaf.verdict = abi.Verdict[verdict.upper()]
        self._addrs[self._addr_key(fence_id, network)] = leaf

    def forget_networks(self, fence_id: int, networks: Iterable[IPNetwork]) -> None:
        """Delete these address rules of the fence (the ones it added: a walk of the whole
        trie took two syscalls for every key of every fence)."""
        batch.delete(self._addrs, [self._addr_key(fence_id, n) for n in networks])

    # -- names, for DNS that skips the proxy ------------------------------------
    def _name_key(self, fence_id: int, name: str) -> Any:
        key = self._names.Key()
        key.fence_id = fence_id
        key.hash = abi.name_hash(name)
        return key

    def add_name(self, fence_id: int, name: str, kind: str) -> None:
        """A name rule: "name" (it and below) or "subdomains" (below only)."""
        leaf = self._names.Leaf()
        leaf.kind = abi.NAME_KINDS[kind]
        self._names[self._name_key(fence_id, name)] = leaf

    def forget_names(self, fence_id: int, names: Iterable[str]) -> None:
        """Delete these name rules of the fence (the ones it added)."""
        batch.delete(self._names, [self._name_key(fence_id, name) for name in names])

    # -- events ---------------------------------------------------------------
    def subscribe(self, cgroup_id: int, listener: Listener) -> None:
        with self._events_lock:
            self._listeners[cgroup_id] = listener

    def unsubscribe(self, cgroup_id: int) -> None:
        with self._events_lock:
            self._listeners.pop(cgroup_id, None)

    def consume_events(self) -> None:
        """Deliver every event the kernel has queued, now, to its fence's listener."""
        with self._events_lock:
            self._bpf.ring_buffer_consume()

    def _poll(self) -> None:
        poller = select.epoll()
        for table in self._rings:
            poller.register(table.map_fd, select.EPOLLIN)
        while True:
            poller.poll()
            self.consume_events()

    def _received(self, ring: str, data: Any, size: int) -> Any:
        """The event as its ctypes struct, or None when it is shorter than that struct."""
        self.event_sizes[ring].add(size)
        struct = abi.RINGS[ring][1]
        if size < ctypes.sizeof(struct):
            return None  # never read past what the kernel sent; the contract test flags it
        return ctypes.cast(data, ctypes.POINTER(struct)).contents

    def _dispatch(
        self, ring: str, decode: Callable[[Any], Any], callback: str
    ) -> Callable[[Any, Any, int], None]:
        """The handler of a ring whose events go, decoded, to their fence's listener
        (`Listener.<callback>`, when it has one)."""

        def handle(_ctx: Any, data: Any, size: int) -> None:
            raw = self._received(ring, data, size)
            if raw is None:
                return
            event = decode(raw)
            deliver = getattr(self._listeners.get(event.cgroup_id), callback, None)
            if deliver is not None:
                deliver(event)

        return handle

    def _on_view_event(self, _ctx: Any, data: Any, size: int) -> None:
        raw = self._received("view_events", data, size)
        if raw is None:
            return
        listener = self._listeners.get(raw.cgid)
        try:
            if listener is not None:
                listener.on_view_change(raw.cgid, raw.pid, raw.fd)
        finally:
            try:
                # mounts.c or hostsfile.c stopped it until we had looked
                os.kill(raw.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _on_escape_event(self, _ctx: Any, data: Any, size: int) -> None:
        raw = self._received("escape_events", data, size)
        if raw is None:
            return
        event = abi.decode_escape(raw)
        if not event.killed_in_kernel:
            # Another process moved it: the kernel could not tell whether the
            # destination is below the fence, nor signal the moved process.
            if event.raw_socket is None and self._below(event.cgroup_id, event.dst_id):
                return
            try:
                os.kill(event.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        listener = self._listeners.get(event.cgroup_id)
        if listener is not None and listener.on_escape is not None:
            listener.on_escape(event)

    def _below(self, fence_id: int, cgroup_id: int) -> bool:
        """Whether cgroup `cgroup_id` is fence `fence_id`'s or one below it (its directory tree).

        Unknown fence (never registered here), unreadable tree: False, so the process is killed.
        """
        fd = self._dirs.get(fence_id)
        if fd is None:
            return False
        try:
            return _in_tree(fd, cgroup_id)
        except OSError:
            return False

    def lost(self, cgroup_id: int) -> int:
        """Events of fence cgroup `cgroup_id` the programs could not report (a ring buffer
        was full): nothing can be said of what they recorded."""
        try:
            return int(self._lost[self._lost.Key(cgroup_id)].value)
        except KeyError:
            return 0

    def take_contacts(self, cgroup_ids: set[int]) -> dict[ContactKey, int]:
        """The permitted contacts the kernel counted for these fence cgroups (sockaddr.c
        `contacts`), each with its count, removed from the map in one pass: the next
        message of a key is reported again, as a first contact."""
        taken = [(k, v.value) for k, v in batch.entries(self._contacts) if k.cgid in cgroup_ids]
        batch.delete(self._contacts, [k for k, _ in taken])
        return {abi.decode_contact(k): count for k, count in taken}

    # -- attribution ----------------------------------------------------------
    def flow_owner(
        self, proto: str, proxy_port: int, client: tuple[str, int], txid: int
    ) -> Owner | None:
        """Who sent the message the proxy got on `proxy_port` from `client` (address,
        port) with DNS id `txid` (UDP); None: no fenced socket did (bpf/egress.c)."""
        key = self._flows.Key()
        key.proxy_port = proxy_port
        key.client_port = client[1]
        key.txid = txid if proto == "udp" else 0
        key.proto = 17 if proto == "udp" else 6
        address = _client_address(client[0])
        ctypes.memmove(ctypes.addressof(key) + type(key).client.offset, address, 16)
        try:
            leaf = self._flows[key]
        except KeyError:
            return None
        return Owner(
            pid=leaf.pid,
            tid=leaf.tid,
            cgroup_id=leaf.cgid,
            time_ns=leaf.ts,
            by_socket=bool(leaf.by_socket),
            clash=bool(leaf.clash),
        )

    def process(self, pid: int, at_ns: int | None = None) -> ProcRecord | None:
        """What the kernel recorded of `pid`; with `at_ns` (CLOCK_MONOTONIC), the record that
        held then: the one before its last exec (or before its pid was reused) when the
        current one is newer (bpf/procs.c). One record copy, two for a message older than
        its sender's last exec."""
        try:
            leaf = self._procs[self._procs.Key(pid)]
        except KeyError:
            return None
        if at_ns is not None and leaf.since > at_ns:
            try:
                return self._decode(pid, self._procs_prev[self._procs_prev.Key(pid)])
            except KeyError:
                pass  # not kept (evicted): the current record is the best there is
        stamp = (leaf.since, leaf.flags, leaf.ppid)
        known = self._decoded.get(pid)
        if known is not None and known[:3] == stamp:
            return known[3]
        record = self._decode(pid, leaf)
        if len(self._decoded) >= abi.MAX_PROCS:
            self._decoded.clear()
        self._decoded[pid] = (*stamp, record)
        return record

    @staticmethod
    def _decode(pid: int, leaf: Any) -> ProcRecord:
        # A char-array field reads back cut at the first NUL; take the raw bytes.
        offset = type(leaf).args.offset
        raw = ctypes.string_at(ctypes.addressof(leaf) + offset, abi.ARGC * abi.ARGLEN)
        return ProcRecord(
            pid=pid,
            ppid=leaf.ppid,
            argv=abi.decode_argv(raw, leaf.argc),
            truncated=bool(leaf.flags & abi.ProcFlag.TRUNCATED),
            exited=bool(leaf.flags & abi.ProcFlag.EXITED),
            cgroup_id=leaf.cgid,
            exe=bytes(leaf.exe).decode(errors="replace"),
            since_ns=leaf.since,
        )


@functools.lru_cache(maxsize=256)
def _client_address(text: str) -> bytes:
    """A DNS client's address as the flow map keys it (a few clients ask every query)."""
    return abi.mapped(ipaddress.ip_address(text.partition("%")[0]))


# -- once per process ---------------------------------------------------------------------

_lock = threading.Lock()
_programs: Programs | None = None
_failure: FenceUnavailable | None = None


def loaded() -> bool:
    """Whether `load()` has the programs already (else it compiles: most of a second)."""
    return _programs is not None


def load() -> Programs:
    """Compile and load the programs once per process; raise FenceUnavailable with the reason."""
    global _programs, _failure
    with _lock:
        if _programs is not None:
            return _programs
        if _failure is not None:
            raise _failure
        try:
            _programs = _compile()
        except FenceUnavailable as exc:
            _failure = exc
            raise
        return _programs


def _compile() -> Programs:
    machine.preflight()
    machine.tracefs_dir()
    bcc = machine.import_bcc()
    text, flags = toolkit.program_text(), toolkit.program_cflags(abi.cflags())
    cache = progcache.Cache.here(bcc, text, flags)
    cached = cache.load(bcc) if cache is not None else None
    bpf, fns = cached if cached is not None else _compile_and_load(bcc, text, flags)
    toolkit.probe_link_support(fns["connect4"].fd)
    if cached is None and cache is not None:
        cache.store(bpf)
    how = cache.status if cache is not None else f"compiled: {progcache.CACHE_ENV}=off"
    return Programs(bcc, bpf, fns, built=how)


def _compile_and_load(bcc: ModuleType, text: str, flags: list[str]) -> tuple[Any, dict[str, Any]]:
    """bcc's object of `text` (raw tracepoints attached) and its cgroup programs, loaded."""
    bpf = toolkit.compile_with(bcc, text, flags)
    fns = {
        name: toolkit.load_program(bpf, name, *toolkit.cgroup_program_kind(name))
        for name in toolkit.ATTACH_TYPES
    }
    return bpf, fns
