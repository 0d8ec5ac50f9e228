"""The eBPF side: finding bcc, checking the machine, compiling once, attaching, reading maps.

The C sources in `bpf/` are compiled by bcc the first time a fence is built
in a process; every later fence reuses the loaded programs and tells them
apart by cgroup id. Programs are attached with bpf_link, so they are detached
when this process exits, however it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import ipaddress
import os
import platform
import select
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Union, cast

from .cgroup import cgroup2_mount
from .errors import FenceUnavailable

#: Set to a path list to say where the distro's `bcc` package lives (and only there).
BCC_PATH_ENV = "DEPFENCE_BCC_PATH"
_DISTRO_DIRS = (
    "/usr/lib/python3/dist-packages",
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",
    "/usr/local/lib/python3/dist-packages",
)

# Must match bpf/fence.h.
ARGC = 16
ARGLEN = 256
PROC_TRUNCATED = 1
PROC_EXITED = 2

# enum bpf_attach_type (uapi/linux/bpf.h)
ATTACH_TYPES = {
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "sendmsg6": 15,  # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg4": 19,  # BPF_CGROUP_UDP4_RECVMSG
    "recvmsg6": 20,  # BPF_CGROUP_UDP6_RECVMSG
    "egress": 1,  # BPF_CGROUP_INET_EGRESS
}
_BPF_PROG_TYPE_CGROUP_SKB = 8
_BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
_BPF_LINK_CREATE = 28
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

# Capabilities a fence needs (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39

BCC_INSTALL_HINT = (
    "install the distro package: apt-get install python3-bpfcc "
    "(bcc is not on PyPI; the PyPI package named 'bcc' is unrelated)"
)


def bpf_source_dir() -> Path:
    """The C sources: inside the wheel, or `bpf/` beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parent / "bpf"):
        if (candidate / "depfence.c").is_file():
            return candidate
    raise FenceUnavailable(f"the eBPF sources (depfence.c) are missing from {here / 'bpf'}")


def program_text(src: Path | None = None) -> str:
    """The C that bcc compiles: depfence.c with its local includes inlined.

    bcc rewrites TRACEPOINT_PROBE argument structs only in the main text, so the
    per-concern files are inlined rather than #included. Print this to debug.
    """
    src = src or bpf_source_dir()

    def expand(name: str, seen: set[str]) -> str:
        if name in seen:
            return ""
        seen.add(name)
        out = []
        for line in (src / name).read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith('#include "') and stripped.endswith('"'):
                out.append(expand(stripped[len('#include "') : -1], seen))
            else:
                out.append(line)
        return "\n".join(out)

    return expand("depfence.c", set())


def import_bcc() -> ModuleType:
    """Import the distro's bcc into this interpreter without adding the distro's site-packages."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    configured = os.environ.get(BCC_PATH_ENV)
    if configured is None:
        try:
            import bcc  # noqa: PLC0415

            return cast(ModuleType, bcc)
        except ImportError:
            dirs: list[str] = list(_DISTRO_DIRS)
    else:
        dirs = [d for d in configured.split(os.pathsep) if d]
    for d in dirs:
        init = Path(d) / "bcc" / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            "bcc", init, submodule_search_locations=[str(init.parent)]
        )
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules["bcc"]
            raise FenceUnavailable(f"bcc at {init.parent} does not load: {exc}") from exc
        return module
    where = f"{BCC_PATH_ENV}={configured!r}" if configured is not None else ", ".join(dirs)
    raise FenceUnavailable(f"bcc is not installed (looked in {where}); {BCC_INSTALL_HINT}")


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    needed = {"CAP_SYS_ADMIN": _CAP_SYS_ADMIN, "CAP_NET_ADMIN": _CAP_NET_ADMIN}
    # Before 5.8 there is no CAP_BPF and CAP_SYS_ADMIN covers it.
    if not caps & (1 << _CAP_SYS_ADMIN):
        needed["CAP_BPF"] = _CAP_BPF
    missing = [name for name, bit in needed.items() if not caps & (1 << bit)]
    if missing:
        raise FenceUnavailable(
            "a fence needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); "
            f"this process (uid {os.geteuid()}) lacks {', '.join(missing)}"
        )


def check_kernel_headers() -> Path:
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").is_dir():
        raise FenceUnavailable(
            f"no kernel header tree at {build} (bcc compiles the eBPF programs against it); "
            f"run scripts/bootstrap.sh, or apt-get install linux-headers-{platform.release()}; "
            "when the running kernel has no packaged headers, any distro tree works "
            "(e.g. linux-headers-amd64 linked as that path) because the programs use only "
            "UAPI types"
        )
    return build


def tracefs_dir(mount: bool = True) -> Path | None:
    """Where tracepoint formats live. With `mount`, mounts tracefs when nothing is mounted;
    without, only checks that it could be (None: mountable, not mounted yet)."""
    for candidate in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (candidate / "events").is_dir():
            return candidate
    target = Path("/sys/kernel/tracing")
    if not mount and target.is_dir():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if target.is_dir() and libc.mount(b"nodev", str(target).encode(), b"tracefs", 0, None) == 0:
        return target
    err = ctypes.get_errno()
    raise FenceUnavailable(
        f"tracefs is not mounted and mounting it at {target} failed ({os.strerror(err)}); "
        "run: mount -t tracefs nodev /sys/kernel/tracing"
    )


OUTAGE_CODES = {"refuse": 0, "reset": 1, "blackhole": 2}  # OUTAGE_* in fence.h
_FENCE_EGRESS_ONLY = 1
_FENCE_AUDIT = 2
VERDICT_CODES = {"block": 1, "allow": 2}
ACTIONS = {1: "refused", 2: "reset", 3: "blackhole", 4: "audited", 5: "allowed"}
WHERE = {1: "connect", 2: "sendmsg", 3: "packet"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class KernelFence:
    """What the kernel programs know of one fence cgroup."""

    fence_id: int
    proxy_port: int
    refuser_port: int
    egress_only: bool
    audit: bool
    outage: str  # a key of OUTAGE_CODES: what a refused connection meets


@dataclass(frozen=True)
class ConnEvent:
    """A connection or datagram: refused, would-be refused (audit), or permitted (first only)."""

    time_ns: int  # CLOCK_MONOTONIC, comparable with time.monotonic_ns()
    cgroup_id: int
    pid: int
    tid: int
    address: IPAddress
    port: int
    protocol: str
    action: str  # a value of ACTIONS
    where: str  # a value of WHERE


# The head conn_event (fence.h) and bypass_event (bypass.c) share. Spelled out in ctypes
# because bcc cannot derive ring buffer types from __u64 fields.
_EVENT_HEAD: list[tuple[str, type[Any]]] = [
    ("ts", ctypes.c_uint64),
    ("cgid", ctypes.c_uint64),
    ("pid", ctypes.c_uint32),
    ("tid", ctypes.c_uint32),
    ("ip6", ctypes.c_uint8 * 16),
    ("port", ctypes.c_uint16),
    ("proto", ctypes.c_uint8),
]


class _ConnEventStruct(ctypes.Structure):
    """struct conn_event of fence.h."""

    _fields_ = [
        *_EVENT_HEAD,
        ("action", ctypes.c_uint8),
        ("where", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class _BypassEventStruct(ctypes.Structure):
    """struct bypass_event of bypass.c."""

    _fields_ = [
        *_EVENT_HEAD,
        ("audited", ctypes.c_uint8),
        ("txid", ctypes.c_uint16),
        ("qtype", ctypes.c_uint16),
        ("name_len", ctypes.c_uint32),
        ("name", ctypes.c_uint8 * 128),
    ]


_NAME_HASH_MUL = 1099511628211  # NAME_HASH_MUL in bypass.c
NAME_KINDS = {"name": 1, "subdomains": 2}  # NAME_AND_BELOW, BELOW_ONLY


def name_hash(name: str) -> int:
    """The hash bypass.c computes for a name: DNS wire form, lowercase, hashed from its end."""
    wire = b"".join(bytes([len(label)]) + label for label in name.lower().encode().split(b"."))
    value = 0
    for byte in reversed(wire + b"\0"):
        value = (value * _NAME_HASH_MUL + byte) & 0xFFFFFFFFFFFFFFFF
    return value


def wire_name(raw: bytes) -> str:
    """Dotted text of a DNS name in wire form (labels with length bytes, final zero)."""
    labels, pos = [], 0
    while pos < len(raw) and raw[pos]:
        size = raw[pos]
        labels.append(raw[pos + 1 : pos + 1 + size].decode("ascii", errors="replace"))
        pos += size + 1
    return ".".join(labels)


@dataclass(frozen=True)
class BypassEvent:
    """A DNS query sent past the proxy (another resolver or port) for a forbidden name."""

    time_ns: int
    cgroup_id: int
    pid: int
    tid: int
    address: IPAddress
    port: int
    protocol: str
    name: str
    qtype: int
    txid: int
    audited: bool


class _ViewEventStruct(ctypes.Structure):
    """struct view_event of mounts.c."""

    _fields_ = [("cgid", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


@dataclass(frozen=True)
class Listener:
    """What a fence run wants to hear from the kernel, called from the events thread."""

    on_connection: Callable[[ConnEvent], None]
    on_bypass: Callable[[BypassEvent], None]
    #: A process of the fence changed its mounts and is stopped until this returns.
    on_view_change: Callable[[int], None]


def _mapped(address: IPAddress) -> bytes:
    """16 bytes as the programs store addresses: IPv4 as ::ffff:a.b.c.d."""
    if isinstance(address, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed


def _unmapped(raw: bytes) -> IPAddress:
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


@dataclass(frozen=True)
class Owner:
    """The process that owned a socket when it sent a message."""

    pid: int
    tid: int
    cgroup_id: int


@dataclass(frozen=True)
class ProcRecord:
    """What the kernel recorded of a fenced process."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    truncated: bool
    exited: bool
    cgroup_id: int


def _bpf_link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 16)()  # union bpf_attr, zero-padded
    attr[0], attr[1], attr[2], attr[3] = prog_fd, target_fd, attach_type, 0
    fd = libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_LINK_CREATE: {os.strerror(err)}")
    return int(fd)


class _StderrCapture:
    """Capture what C code writes to fd 2 (bcc prints compiler and verifier logs there)."""

    def __enter__(self) -> _StderrCapture:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


class Programs:
    """The loaded program set, shared by every fence of this process."""

    def __init__(self, bcc: ModuleType, bpf: Any, fns: dict[str, Any]) -> None:
        self.bcc = bcc
        self._bpf = bpf
        self._fns = fns
        self._fences = bpf.get_table(b"fences")
        self._flows = bpf.get_table(b"dnsflows")
        self._procs = bpf.get_table(b"procs")
        self._addrs = bpf.get_table(b"addrs")
        self._events_lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        self._conn_events = bpf.get_table(b"conn_events")
        self._conn_events.open_ring_buffer(self._on_conn_event)
        self._view_events = bpf.get_table(b"view_events")
        self._view_events.open_ring_buffer(self._on_view_event)
        self._bypass_events = bpf.get_table(b"bypass_events")
        self._bypass_events.open_ring_buffer(self._on_bypass_event)
        self._names = bpf.get_table(b"names")
        # One thread delivers events as they come: a process paused by mounts.c
        # waits for it. Consuming is serialized by _events_lock.
        self._poller = threading.Thread(target=self._poll, name="depfence-events", daemon=True)
        self._poller.start()

    # -- fences ---------------------------------------------------------------
    def register(self, cgroup_id: int, fence: KernelFence) -> None:
        key = self._fences.Key(cgroup_id)
        leaf = self._fences.Leaf()
        leaf.fence_id = fence.fence_id
        leaf.proxy_port = fence.proxy_port
        leaf.refuser_port = fence.refuser_port
        leaf.flags = (_FENCE_EGRESS_ONLY if fence.egress_only else 0) | (
            _FENCE_AUDIT if fence.audit else 0
        )
        leaf.outage = OUTAGE_CODES[fence.outage]
        self._fences[key] = leaf

    # -- addresses ------------------------------------------------------------
    def _addr_key(self, fence_id: int, network: IPNetwork) -> Any:
        key = self._addrs.Key()
        mapped_prefix = 96 if isinstance(network, ipaddress.IPv4Network) else 0
        key.prefixlen = 32 + mapped_prefix + network.prefixlen
        key.fence_id = fence_id
        offset = type(key).ip6.offset
        ctypes.memmove(ctypes.addressof(key) + offset, _mapped(network.network_address), 16)
        return key

    def add_network(self, fence_id: int, network: IPNetwork, verdict: str) -> None:
        """Judge every address in `network` for this fence: "block" or "allow"."""
        leaf = self._addrs.Leaf()
        leaf.verdict = VERDICT_CODES[verdict]
        self._addrs[self._addr_key(fence_id, network)] = leaf

    def forget_networks(self, fence_id: int) -> None:
        stale = []
        for key in self._addrs.keys():
            if key.fence_id == fence_id:
                stale.append(key)
        for key in stale:
            try:
                del self._addrs[key]
            except KeyError:
                pass

    # -- names, for DNS that skips the proxy ------------------------------------
    def add_name(self, fence_id: int, name: str, kind: str) -> None:
        """A name rule: "name" (it and below) or "subdomains" (below only)."""
        key = self._names.Key()
        key.fence_id = fence_id
        key.hash = name_hash(name)
        leaf = self._names.Leaf()
        leaf.kind = NAME_KINDS[kind]
        self._names[key] = leaf

    def forget_names(self, fence_id: int) -> None:
        stale = []
        for key in self._names.keys():
            if key.fence_id == fence_id:
                stale.append(key)
        for key in stale:
            try:
                del self._names[key]
            except KeyError:
                pass

    # -- connection events ----------------------------------------------------
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
        for table in (self._conn_events, self._view_events, self._bypass_events):
            poller.register(table.map_fd, select.EPOLLIN)
        while True:
            poller.poll()
            self.consume_events()

    def _on_bypass_event(self, _ctx: Any, data: Any, _size: int) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(_BypassEventStruct)).contents
        event = BypassEvent(
            time_ns=raw.ts,
            cgroup_id=raw.cgid,
            pid=raw.pid,
            tid=raw.tid,
            address=_unmapped(bytes(raw.ip6)),
            port=raw.port,
            protocol=PROTOCOLS.get(raw.proto, str(raw.proto)),
            name=wire_name(bytes(raw.name)[: raw.name_len]),
            qtype=raw.qtype,
            txid=raw.txid,
            audited=bool(raw.audited),
        )
        listener = self._listeners.get(event.cgroup_id)
        if listener is not None:
            listener.on_bypass(event)

    def _on_view_event(self, _ctx: Any, data: Any, _size: int) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(_ViewEventStruct)).contents
        listener = self._listeners.get(raw.cgid)
        try:
            if listener is not None:
                listener.on_view_change(raw.pid)
        finally:
            try:
                os.kill(raw.pid, signal.SIGCONT)  # mounts.c stopped it until we had looked
            except ProcessLookupError:
                pass

    def _on_conn_event(self, _ctx: Any, data: Any, _size: int) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(_ConnEventStruct)).contents
        ip6 = bytes(raw.ip6)
        event = ConnEvent(
            time_ns=raw.ts,
            cgroup_id=raw.cgid,
            pid=raw.pid,
            tid=raw.tid,
            address=_unmapped(ip6),
            port=raw.port,
            protocol=PROTOCOLS.get(raw.proto, str(raw.proto)),
            action=ACTIONS.get(raw.action, str(raw.action)),
            where=WHERE.get(raw.where, str(raw.where)),
        )
        listener = self._listeners.get(event.cgroup_id)
        if listener is not None:
            listener.on_connection(event)

    def unregister(self, cgroup_id: int) -> None:
        """Forget a fence cgroup and every process record made in it."""
        try:
            del self._fences[self._fences.Key(cgroup_id)]
        except KeyError:
            pass
        stale = []
        for key, leaf in self._procs.items():
            if leaf.cgid == cgroup_id:
                stale.append(key)
        for key in stale:
            try:
                del self._procs[key]
            except KeyError:
                pass

    def attach(self, cgroup_fd: int) -> list[int]:
        """Attach every cgroup program to one cgroup; returns the link fds (close to detach)."""
        links: list[int] = []
        try:
            for name, attach_type in ATTACH_TYPES.items():
                links.append(_bpf_link_create(self._fns[name].fd, cgroup_fd, attach_type))
        except OSError:
            for fd in links:
                os.close(fd)
            raise
        return links

    # -- attribution ----------------------------------------------------------
    def flow_owner(self, proto: str, proxy_port: int, client_port: int, txid: int) -> Owner | None:
        key = self._flows.Key()
        key.proxy_port = proxy_port
        key.client_port = client_port
        key.txid = txid if proto == "udp" else 0
        key.proto = 17 if proto == "udp" else 6
        try:
            leaf = self._flows[key]
        except KeyError:
            return None
        return Owner(pid=leaf.pid, tid=leaf.tid, cgroup_id=leaf.cgid)

    def process(self, pid: int) -> ProcRecord | None:
        try:
            leaf = self._procs[self._procs.Key(pid)]
        except KeyError:
            return None
        # A char-array field reads back cut at the first NUL; take the raw bytes.
        raw = ctypes.string_at(ctypes.addressof(leaf) + type(leaf).args.offset, ARGC * ARGLEN)
        argv = tuple(
            raw[i * ARGLEN : (i + 1) * ARGLEN].split(b"\0", 1)[0].decode(errors="replace")
            for i in range(min(leaf.argc, ARGC))
        )
        return ProcRecord(
            pid=pid,
            ppid=leaf.ppid,
            argv=argv,
            truncated=bool(leaf.flags & PROC_TRUNCATED),
            exited=bool(leaf.flags & PROC_EXITED),
            cgroup_id=leaf.cgid,
        )


_lock = threading.Lock()
_programs: Programs | None = None
_failure: FenceUnavailable | None = None


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


@dataclass(frozen=True)
class MachineState:
    """What a fence is built from on this machine (shown in pytest's header)."""

    kernel: str
    cgroup2: Path
    bcc_version: str

    def describe(self) -> str:
        return f"kernel {self.kernel}, cgroup2 at {self.cgroup2}, bcc {self.bcc_version}"


def preflight() -> MachineState:
    """Check every part a fence needs, without compiling; FenceUnavailable names the first gap."""
    check_privileges()
    bcc = import_bcc()
    check_kernel_headers()
    mount = cgroup2_mount()
    tracefs_dir(mount=False)  # a header or doctor check must not mount anything
    return MachineState(platform.release(), mount, str(getattr(bcc, "__version__", "unknown")))


def _logged(what: str, call: Callable[[], Any]) -> Any:
    """Run a bcc call; on failure raise FenceUnavailable with what bcc printed."""
    with _StderrCapture() as log:
        try:
            return call()
        except Exception as exc:
            failure = exc
    raise FenceUnavailable(f"{what}: {failure}\n{log.text.strip()}") from failure


def _compile() -> Programs:
    preflight()
    tracefs_dir()
    bcc = import_bcc()
    src = bpf_source_dir()
    cflags = [f"-DDEPFENCE_ARGC={ARGC}", f"-DDEPFENCE_ARGLEN={ARGLEN}"]
    bpf = _logged(
        "compiling or loading the eBPF programs failed",
        lambda: bcc.BPF(text=program_text(src).encode(), cflags=cflags),
    )
    fns: dict[str, Any] = {}
    for name, attach_type in ATTACH_TYPES.items():
        prog_type = (
            _BPF_PROG_TYPE_CGROUP_SKB if name == "egress" else _BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        )
        fns[name] = _logged(
            f"the kernel's verifier rejected the {name} program (verifier log below)",
            lambda: bpf.load_func(name.encode(), prog_type, attach_type=attach_type),
        )
    probe_link_support(fns["connect4"].fd)
    return Programs(bcc, bpf, fns)


def probe_link_support(prog_fd: int) -> None:
    """bpf_link for cgroups arrived in 5.7; say so plainly instead of failing per fence."""
    try:
        _bpf_link_create(prog_fd, -1, ATTACH_TYPES["connect4"])
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTDIR):
            return
        if exc.errno == errno.EINVAL:
            raise FenceUnavailable(
                "this kernel cannot attach cgroup programs with bpf_link (needs Linux 5.7+)"
            ) from exc
        raise FenceUnavailable(f"bpf_link probe failed: {exc}") from exc
