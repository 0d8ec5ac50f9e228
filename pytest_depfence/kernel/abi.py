"""The C<->Python contract of the eBPF programs, in one place.

Every constant both sides use is defined here and handed to the C as `-D`
flags (`cflags()`); the C has no defaults of its own (bpf/abi.h stops the
compile when one is missing). The ring-buffer events are mirrored as ctypes
structs here, next to the sizes they depend on, and decoded into the
dataclasses the rest of the package sees. The map structs need no mirror:
bcc derives their Key/Leaf types from the C.

The name hash of bpf/bypass.c (DNS that skips the proxy) is computed here for
the rules userspace stores; tests/integration/test_kernel_contract.py checks
both sides hash alike on real queries.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any, Union

from ..outages import KERNEL_ACTIONS
from ..policy import unmap

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# -- sizes ------------------------------------------------------------------------------

#: Arguments of a process the kernel copies at exec, and the bytes kept of each.
ARGC = 16
ARGLEN = 256
#: Process records kept at once (an LRU map: the oldest go first).
MAX_PROCS = 4096
#: Fenced processes alive at once that escape.c can know as fenced (`live`: never evicted;
#: one more is a lost event, so the run is not vouched for).
MAX_LIVE = 32768
#: Longest DNS name (wire form) and most labels bypass.c judges; powers of two (masks).
DNS_NAME_MAX = 128
DNS_LABELS_MAX = 32
#: Questions bypass.c judges in one packet (a TCP segment's messages together); more: unjudged.
DNS_QUESTIONS_MAX = 4
#: The multiplier of the name hash: odd, and drawn anew by each process (the programs read
#: it from their map `name_hash_mul`, written before any fence, so that the compiled
#: programs are the same in every process: progcache.py). bypass.c trusts a hash match
#: without comparing the names, and with a multiplier known in advance a name that hashes
#: like an allowed one can be computed (lattice reduction finds one in a minute): a
#: forbidden query past the proxy that passes under egress_only. A name of at most
#: DNS_NAME_MAX bytes cannot be made to collide under every odd multiplier at once.
NAME_HASH_MUL = secrets.randbits(64) | 1
#: Bytes kept of the destination path of a process moved out of its fence (escape.c).
CGROUP_PATH_MAX = 256
#: Bytes kept of a unix socket's path (unix.c): sun_path's 108, rounded up to a power of two.
UNIX_PATH_LEN = 128


# -- codes (each family's C names are its prefix + the member's name) -------------------


class FenceFlag(enum.IntFlag):
    """fence_cfg.flags."""

    EGRESS_ONLY = 1  # addresses not allowed explicitly are refused
    AUDIT = 2  # record what would be refused, refuse nothing
    ADOPTED = 4  # a cgroup the fence does not own (a running service): never killed or paused
    RAW_SOCKETS = 8  # the command keeps CAP_NET_RAW: raw and packet sockets are its to make


class Verdict(enum.IntEnum):
    """addr_rule.verdict: how an address of a fence is judged."""

    BLOCK = 1
    ALLOW = 2


class Action(enum.IntEnum):
    """conn_event.action; the lowercased name is ConnEvent.action."""

    REFUSED = 1
    RESET = 2
    BLACKHOLE = 3
    AUDITED = 4
    ALLOWED = 5  # a permitted destination: the first message per process, then counted


class At(enum.IntEnum):
    """conn_event.where; the lowercased name is ConnEvent.where."""

    CONNECT = 1
    SENDMSG = 2
    PACKET = 3


class ProcFlag(enum.IntFlag):
    """proc.flags."""

    TRUNCATED = 1  # more arguments, or a longer one, than fit
    EXITED = 2  # the process has exited; the pid may be reused
    EXECED = 4  # argv comes from an exec inside the fence


class Escape(enum.IntEnum):
    """escape_event.how: how a fenced process got past the fence's hooks."""

    MOVED = 0  # written into a cgroup.procs outside its fence
    BORN = 1  # started outside by its parent: clone3(CLONE_INTO_CGROUP)
    RAW_SOCKET = 2  # made a raw or packet socket the fence does not allow (a user namespace)


#: Socket families and types a raw-socket escape names (escape_event.dst_id's two bytes).
SOCKET_FAMILIES = {2: "AF_INET", 10: "AF_INET6", 17: "AF_PACKET", 44: "AF_XDP"}
SOCKET_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 10: "SOCK_PACKET"}


class NameKind(enum.IntEnum):
    """name_rule.kind (C names without a prefix)."""

    NAME_AND_BELOW = 1  # github.com: the name and every name below it
    BELOW_ONLY = 2  # *.github.com: names below it only


class Unjudged(enum.IntEnum):
    """bypass_event.unjudged: why a DNS-shaped message past the proxy could not be judged
    (it is dropped, or reported and let through in audit mode); 0: it was judged."""

    POINTER = 1  # a compression pointer in a question
    TOO_LONG = 2  # a name longer than DNS_NAME_MAX bytes
    TOO_MANY_LABELS = 3  # a name of more than DNS_LABELS_MAX labels
    TRUNCATED = 4  # the message ends inside its header or a question
    TOO_MANY_QUESTIONS = 5  # more than DNS_QUESTIONS_MAX questions in the packet
    SPLIT = 6  # a TCP segment not holding whole messages (length prefix and header)
    NOT_A_QUERY = 7  # sent to port 53 but not a query
    GSO = 8  # several datagrams in one send (UDP GSO), one of them DNS-shaped


#: Why a DNS query was not judged, as the report says it (Unjudged -> text).
UNJUDGED_TEXTS: dict[int, str] = {
    Unjudged.POINTER: "compression pointer in the question",
    Unjudged.TOO_LONG: f"name longer than {DNS_NAME_MAX} bytes",
    Unjudged.TOO_MANY_LABELS: f"name of more than {DNS_LABELS_MAX} labels",
    Unjudged.TRUNCATED: "message cut short",
    Unjudged.TOO_MANY_QUESTIONS: f"more than {DNS_QUESTIONS_MAX} questions",
    Unjudged.SPLIT: "TCP segment without a whole length prefix and header",
    Unjudged.NOT_A_QUERY: "not a query",
    Unjudged.GSO: "several datagrams sent as one (UDP GSO)",
}


#: What a refused connection meets (fence_cfg.outage): OUTAGE_<NAME>, code = index.
OUTAGE_CODES: dict[str, int] = {name: code for code, name in enumerate(KERNEL_ACTIONS)}
#: Policy rule kinds (policy.Rule.kind) as the kernel stores them.
NAME_KINDS: dict[str, NameKind] = {
    "name": NameKind.NAME_AND_BELOW,
    "subdomains": NameKind.BELOW_ONLY,
}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

_FAMILIES: tuple[tuple[str, type[enum.IntEnum] | type[enum.IntFlag]], ...] = (
    ("FENCE_", FenceFlag),
    ("VERDICT_", Verdict),
    ("ACTION_", Action),
    ("AT_", At),
    ("PROC_", ProcFlag),
    ("ESCAPE_", Escape),
    ("", NameKind),
    ("UNJUDGED_", Unjudged),
)


def defines() -> list[tuple[str, str]]:
    """Every (C name, value) the programs are compiled with, in a stable order."""
    pairs = [
        ("DEPFENCE_ARGC", str(ARGC)),
        ("DEPFENCE_ARGLEN", str(ARGLEN)),
        ("DEPFENCE_MAX_PROCS", str(MAX_PROCS)),
        ("DEPFENCE_MAX_LIVE", str(MAX_LIVE)),
        ("DNS_NAME_MAX", str(DNS_NAME_MAX)),
        ("DNS_LABELS_MAX", str(DNS_LABELS_MAX)),
        ("DNS_QUESTIONS_MAX", str(DNS_QUESTIONS_MAX)),
        ("CGROUP_PATH_MAX", str(CGROUP_PATH_MAX)),
        ("UNIX_PATH_LEN", str(UNIX_PATH_LEN)),
    ]
    for prefix, family in _FAMILIES:
        pairs.extend((prefix + name, str(int(m))) for name, m in family.__members__.items())
    pairs.extend((f"OUTAGE_{name.upper()}", str(code)) for name, code in OUTAGE_CODES.items())
    return pairs


def cflags() -> list[str]:
    """The -D flags for bcc: the whole contract."""
    return [f"-D{name}={value}" for name, value in defines()]


# -- ring-buffer events ---------------------------------------------------------------


class EventHead(ctypes.Structure):
    """struct event_head (fence.h): the start of conn_event and bypass_event."""

    _fields_ = [
        ("ts", ctypes.c_uint64),  # bpf_ktime_get_ns: CLOCK_MONOTONIC
        ("cgid", ctypes.c_uint64),  # the fence's cgroup (the registered one)
        ("pid", ctypes.c_uint32),  # 0: not known (a packet with no recorded owner)
        ("tid", ctypes.c_uint32),
        ("ip6", ctypes.c_uint8 * 16),  # IPv4 as ::ffff:a.b.c.d
        ("port", ctypes.c_uint16),  # host order
        ("proto", ctypes.c_uint8),
        ("by_socket", ctypes.c_uint8),  # 1: pid is the socket's owner, not surely the sender
        ("pad", ctypes.c_uint8 * 4),
    ]


class ConnEventStruct(ctypes.Structure):
    """struct conn_event (fence.h)."""

    _fields_ = [
        ("head", EventHead),
        ("action", ctypes.c_uint8),
        ("where", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 6),
    ]


class BypassEventStruct(ctypes.Structure):
    """struct bypass_event (bypass.c)."""

    _fields_ = [
        ("head", EventHead),
        ("name_len", ctypes.c_uint32),
        ("txid", ctypes.c_uint16),
        ("qtype", ctypes.c_uint16),
        ("audited", ctypes.c_uint8),
        ("unjudged", ctypes.c_uint8),  # 0: a forbidden name; else Unjudged: dropped unjudged
        ("pad", ctypes.c_uint8 * 6),
        ("name", ctypes.c_uint8 * DNS_NAME_MAX),  # wire form, lowercased
    ]


class ViewEventStruct(ctypes.Structure):
    """struct view_event (mounts.c)."""

    _fields_ = [
        ("cgid", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("fd", ctypes.c_int32),  # a descriptor to read too (hostsfile.c), or -1
    ]


class EscapeEventStruct(ctypes.Structure):
    """struct escape_event (escape.c)."""

    _fields_ = [
        ("ts", ctypes.c_uint64),  # bpf_ktime_get_ns: CLOCK_MONOTONIC
        ("cgid", ctypes.c_uint64),  # the fence it left (the registered cgroup)
        ("dst_id", ctypes.c_uint64),  # the cgroup it was moved to; RAW_SOCKET: family << 8 | type
        ("pid", ctypes.c_uint32),  # the moved process
        ("writer", ctypes.c_uint32),  # the process that wrote the pid into a cgroup.procs
        ("path_len", ctypes.c_int32),  # bytes of path with its NUL; < 0: not read
        ("killed", ctypes.c_uint8),  # the kernel sent it SIGKILL (it moved itself, or was born)
        ("how", ctypes.c_uint8),  # Escape: moved, born there (clone3), or a raw socket
        ("pad", ctypes.c_uint8 * 2),
        ("path", ctypes.c_uint8 * CGROUP_PATH_MAX),  # from the v2 root, cut to fit
    ]


class UnixEventStruct(ctypes.Structure):
    """struct unix_event (unix.c)."""

    _fields_ = [
        ("head", EventHead),  # no address, port or protocol
        ("ret", ctypes.c_int32),  # the connect's result: 0 or -errno
        ("path_len", ctypes.c_uint32),
        ("path", ctypes.c_uint8 * UNIX_PATH_LEN),  # sun_path as given; abstract: a NUL first
    ]


#: Ring buffer -> the struct of its events; also the fields of depfence.c's abi_check map.
RINGS: dict[str, tuple[str, type[ctypes.Structure]]] = {
    "conn_events": ("conn", ConnEventStruct),
    "bypass_events": ("bypass", BypassEventStruct),
    "view_events": ("view", ViewEventStruct),
    "escape_events": ("escape", EscapeEventStruct),
    "unix_events": ("unix_connect", UnixEventStruct),
}


def layout_mismatches(
    ours: type[ctypes.Structure], theirs: type[Any], where: str = ""
) -> list[str]:
    """How two ctypes structs differ in size, field offsets and sizes (nested ones too).

    `theirs` is bcc's type for the C struct; fields it adds for padding are ignored.
    """
    path = where or ours.__name__
    found = []
    if ctypes.sizeof(ours) != ctypes.sizeof(theirs):
        found.append(f"{path}: {ctypes.sizeof(ours)} bytes here, {ctypes.sizeof(theirs)} in C")
    their_fields = {f[0]: f[1] for f in getattr(theirs, "_fields_", [])}
    for field in ours._fields_:
        name, kind = field[0], field[1]
        mine, other = getattr(ours, name), getattr(theirs, name, None)
        if other is None or name not in their_fields:
            found.append(f"{path}.{name}: missing in C")
        elif (mine.offset, mine.size) != (other.offset, other.size):
            found.append(
                f"{path}.{name}: offset {mine.offset} size {mine.size} here, "
                f"offset {other.offset} size {other.size} in C"
            )
        elif isinstance(kind, type) and issubclass(kind, ctypes.Structure):
            found.extend(layout_mismatches(kind, their_fields[name], f"{path}.{name}"))
    return found


# -- addresses and names ----------------------------------------------------------------


def mapped(address: IPAddress) -> bytes:
    """16 bytes as the programs store addresses: IPv4 as ::ffff:a.b.c.d."""
    if isinstance(address, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed


def unmapped(raw: bytes) -> IPAddress:
    """An address as the programs store it, IPv4 again when it is v4-mapped."""
    return unmap(ipaddress.IPv6Address(bytes(raw)))


def to_wire(name: str) -> bytes:
    """A dotted name in DNS wire form, lowercased: length-prefixed labels and a final zero."""
    labels = [label for label in name.lower().encode("ascii").split(b".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def name_hash(name: str) -> int:
    """The hash bypass.c computes for a name: its wire form, lowercased, hashed from its end."""
    value = 0
    for byte in reversed(to_wire(name)):
        value = (value * NAME_HASH_MUL + byte) & 0xFFFFFFFFFFFFFFFF
    return value


def wire_name(raw: bytes) -> str:
    """Dotted text of a DNS name in wire form (labels with length bytes, final zero)."""
    labels, pos = [], 0
    while pos < len(raw) and raw[pos]:
        size = raw[pos]
        labels.append(raw[pos + 1 : pos + 1 + size].decode("ascii", errors="replace"))
        pos += size + 1
    return ".".join(labels)


# -- decoded events ---------------------------------------------------------------------

#: A permitted contact as sockaddr.c counts it (map `contacts`): (fence cgroup id, pid,
#: address, port, protocol, where), the names as ConnEvent has them.
ContactKey = tuple[int, int, IPAddress, int, str, str]


@dataclass(frozen=True)
class ConnEvent:
    """A connection or datagram: refused, would-be refused (audit), or permitted (the first
    of its `contact` key only; the kernel counts the rest)."""

    time_ns: int  # CLOCK_MONOTONIC, comparable with time.monotonic_ns()
    cgroup_id: int
    pid: int
    tid: int
    address: IPAddress
    port: int
    protocol: str
    action: str  # refused, reset, blackhole, audited, allowed (Action)
    where: str  # connect, sendmsg, packet (At)
    #: `pid` is the socket's recorded owner, not surely the process that sent the packet.
    by_socket: bool = False

    @property
    def contact(self) -> ContactKey:
        """The key the kernel counts a permitted message under (sockaddr.c `contacts`)."""
        return (self.cgroup_id, self.pid, self.address, self.port, self.protocol, self.where)


@dataclass(frozen=True)
class BypassEvent:
    """A DNS query sent past the proxy (another resolver or port) for a forbidden name,
    or one the kernel could not judge (`unjudged`: why, and `name` is what it read)."""

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
    #: Why it could not be judged (UNJUDGED_TEXTS); None: judged, the name is forbidden.
    unjudged: str | None = None
    #: `pid` is the socket's recorded owner, not surely the process that sent the query.
    by_socket: bool = False


@dataclass(frozen=True)
class EscapeEvent:
    """A fenced process moved to a cgroup outside its fence (it has been killed: see
    `Listener.on_escape`)."""

    time_ns: int
    cgroup_id: int  # the fence it left
    pid: int  # the moved process
    writer: int  # the process that moved it: `pid` when it moved itself
    dst_id: int
    #: The destination's path from the cgroup v2 root ("" when the kernel could not
    #: read it; ending in "…" when cut to CGROUP_PATH_MAX).
    dst_path: str
    #: The kernel killed it (it moved itself, or was born there); else userspace did, on receipt.
    killed_in_kernel: bool
    #: Not moved: started there by its parent (`writer`) with clone3(CLONE_INTO_CGROUP).
    born: bool = False
    #: Not moved: it made a raw or packet socket its fence does not allow, which only a
    #: user namespace makes possible ("AF_PACKET/SOCK_RAW"); the kernel killed it.
    raw_socket: str | None = None


@dataclass(frozen=True)
class UnixEvent:
    """A fenced process's connect() to a unix socket."""

    time_ns: int
    cgroup_id: int
    pid: int
    tid: int
    #: The socket's path; an abstract name is written "@name", as /proc/net/unix shows it.
    path: str
    #: The connect's result: 0 (or -EINPROGRESS), else -errno: nothing was reached.
    ret: int

    @property
    def reached(self) -> bool:
        return self.ret in (0, -errno.EINPROGRESS)


@dataclass(frozen=True)
class Owner:
    """Who sent a message: the process sending it, or (`by_socket`) the socket's owner --
    the process that created, connected or addressed it, which may not be the sender (a
    TCP segment; a datagram on a kernel before 6.10: bpf/egress.c)."""

    pid: int
    tid: int
    cgroup_id: int
    #: When the message left (CLOCK_MONOTONIC); 0: not known.
    time_ns: int = 0
    by_socket: bool = False
    #: Another process sent with the same flow key just before: which sent it is unknown.
    clash: bool = False


@dataclass(frozen=True)
class ProcRecord:
    """What the kernel recorded of a fenced process."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    truncated: bool
    exited: bool
    cgroup_id: int
    #: The path its program was exec'd by ('' before its first exec in the fence).
    exe: str = ""
    #: Since when the record holds (CLOCK_MONOTONIC): its exec, or its fork.
    since_ns: int = 0


def _code_name(family: type[enum.IntEnum], code: int) -> str:
    try:
        return family(code).name.lower()
    except ValueError:
        return str(code)


def _head(head: EventHead) -> dict[str, Any]:
    return {
        "time_ns": head.ts,
        "cgroup_id": head.cgid,
        "pid": head.pid,
        "tid": head.tid,
        "address": unmapped(bytes(head.ip6)),
        "port": head.port,
        "protocol": PROTOCOLS.get(head.proto, str(head.proto)),
        "by_socket": bool(head.by_socket),
    }


def decode_conn(raw: ConnEventStruct) -> ConnEvent:
    return ConnEvent(
        **_head(raw.head),
        action=_code_name(Action, raw.action),
        where=_code_name(At, raw.where),
    )


def decode_contact(key: Any) -> ContactKey:
    """A key of map `contacts` (bcc's struct contact_key) as ConnEvent.contact says it."""
    return (
        key.cgid,
        key.pid,
        unmapped(bytes(key.ip6)),
        key.port,
        PROTOCOLS.get(key.proto, str(key.proto)),
        _code_name(At, key.where),
    )


def decode_bypass(raw: BypassEventStruct) -> BypassEvent:
    return BypassEvent(
        **_head(raw.head),
        name=wire_name(bytes(raw.name)[: raw.name_len]),
        qtype=raw.qtype,
        txid=raw.txid,
        audited=bool(raw.audited),
        unjudged=UNJUDGED_TEXTS.get(raw.unjudged, f"reason {raw.unjudged}")
        if raw.unjudged
        else None,
    )


def decode_escape(raw: EscapeEventStruct) -> EscapeEvent:
    size = min(raw.path_len, CGROUP_PATH_MAX)
    path = bytes(raw.path)[: max(size - 1, 0)].decode(errors="replace")
    if size == CGROUP_PATH_MAX:
        path += "…"  # the kernel filled the buffer: the path may go on
    return EscapeEvent(
        time_ns=raw.ts,
        cgroup_id=raw.cgid,
        pid=raw.pid,
        writer=raw.writer,
        dst_id=raw.dst_id,
        dst_path=path,
        killed_in_kernel=bool(raw.killed),
        born=raw.how == Escape.BORN,
        raw_socket=socket_kind(raw.dst_id) if raw.how == Escape.RAW_SOCKET else None,
    )


def socket_kind(packed: int) -> str:
    """`AF_PACKET/SOCK_RAW` from escape.c's family << 8 | type."""
    family, kind = packed >> 8 & 0xFF, packed & 0xFF
    return (
        f"{SOCKET_FAMILIES.get(family, f'family {family}')}/"
        f"{SOCKET_TYPES.get(kind, f'type {kind}')}"
    )


def decode_unix(raw: UnixEventStruct) -> UnixEvent:
    path = bytes(raw.path)[: min(raw.path_len, UNIX_PATH_LEN)]
    if path[:1] == b"\0":  # abstract: the name is every byte given (NULs included)
        text = "@" + path[1:].decode(errors="replace")
    else:  # a filesystem path ends at its first NUL
        text = path.split(b"\0", 1)[0].decode(errors="replace")
    return UnixEvent(
        time_ns=raw.head.ts,
        cgroup_id=raw.head.cgid,
        pid=raw.head.pid,
        tid=raw.head.tid,
        path=text,
        ret=raw.ret,
    )


def decode_argv(raw: bytes, argc: int) -> tuple[str, ...]:
    """argv from proc.args: ARGC slots of ARGLEN bytes, each cut at its first NUL."""
    return tuple(
        raw[i * ARGLEN : (i + 1) * ARGLEN].split(b"\0", 1)[0].decode(errors="replace")
        for i in range(min(argc, ARGC))
    )
