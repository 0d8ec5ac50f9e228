"""Which addresses belong to which names, where that was learned, and what the kernel is told.

The kernel refuses connections by address; names only reach it through this
module. A fence learns addresses from every DNS answer its proxy forwards
(before the answer reaches the client), from resolving the blocked names
through the upstream when it opens, from /etc/hosts, and from address rules;
each address keeps the names it belongs to and the origin, for the report.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Protocol, Union

from dnslib import QTYPE, DNSRecord
from dnslib.label import DNSLabel

from .cgroup import read_file
from .policy import normalize_name, unmap

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Where an address was learned, as reports show it.
FROM_DNS = "dns"
FROM_UPSTREAM = "upstream"
FROM_HOSTS = "hosts file"
FROM_RULE = "rule"


class AddressSink(Protocol):
    """The kernel side (kernel.Programs): what a fence's address trie holds."""

    def add_network(self, fence_id: int, network: IPNetwork, verdict: str) -> None: ...

    def forget_networks(self, fence_id: int, networks: Iterable[IPNetwork]) -> None: ...


@dataclass(frozen=True)
class Learned:
    name: str | None
    origin: str


def as_address(text: str | IPAddress) -> IPAddress:
    """An address, with IPv4-mapped IPv6 judged as its IPv4 address."""
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return unmap(text)  # ip_address() of an address object would parse its text again
    return unmap(ipaddress.ip_address(text))


class AddressBook:
    """One fence's addresses: kept here for reports and in the kernel for enforcement."""

    def __init__(self, fence_id: int, sink: AddressSink) -> None:
        self.fence_id = fence_id
        self._sink = sink
        self._lock = threading.Lock()
        self._learned: dict[IPAddress, list[Learned]] = {}
        self._verdicts: dict[IPNetwork, str] = {}

    def note(self, address: str | IPAddress, name: str | None, origin: str) -> IPAddress:
        """Record that `address` belongs to `name` (for reports; the kernel is not told)."""
        addr = as_address(address)
        entry = Learned(name, origin)
        with self._lock:
            known = self._learned.setdefault(addr, [])
            if entry not in known:
                known.append(entry)
        return addr

    def learn(self, address: str | IPAddress, name: str | None, origin: str, verdict: str) -> None:
        """Record that `address` belongs to `name` and tell the kernel to block or allow it."""
        self.judge(ipaddress.ip_network(self.note(address, name, origin)), verdict)

    def judge(self, network: IPNetwork, verdict: str) -> None:
        """Tell the kernel how to judge a network; a block, once given, is never lifted.
        Under the lock: the kernel's last verdict is the one recorded here (a block and
        an allow of one address, from two answers at once, cannot land in the other
        order), and a verdict the kernel refused (its map full) is not recorded, so the
        next answer with that address tries again instead of passing as known."""
        with self._lock:
            if self._verdicts.get(network) == "block" or self._verdicts.get(network) == verdict:
                return
            self._sink.add_network(self.fence_id, network, verdict)
            self._verdicts[network] = verdict

    def names_of(self, address: str | IPAddress) -> list[Learned]:
        with self._lock:
            return list(self._learned.get(as_address(address), ()))

    def forget(self) -> None:
        """Forget every address, and take out of the kernel each network it was told."""
        with self._lock:
            self._learned.clear()
            told = list(self._verdicts)
            self._verdicts.clear()
        self._sink.forget_networks(self.fence_id, told)


@dataclass(frozen=True)
class Answer:
    """What a DNS answer says: the names in its CNAME chain and the addresses at its end."""

    names: tuple[str, ...]
    addresses: tuple[IPAddress, ...]


class UnreadableAnswer(ValueError):
    """An answer whose CNAME chain cannot be known: framing, question or a CNAME unreadable."""


_HEADER = struct.Struct("!6H")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_ADDRESS_SIZES = {QTYPE.A: 4, QTYPE.AAAA: 16}


def parse_answer(reply: bytes) -> Answer:
    """The question's name, every CNAME target, and every A/AAAA address of an answer.

    Read record by record, not with `DNSRecord.parse`: one record whose rdata does
    not fit its type (an A that is not 4 bytes) is skipped and every other CNAME and
    address still read, so a bad record cannot hide a CNAME into a blocked name.
    Raises `UnreadableAnswer` when the chain itself cannot be known: a short header,
    not one question, a name or a record running past the end, an unreadable CNAME.
    """
    try:
        return _parse_answer(bytes(reply))
    except UnreadableAnswer:
        raise
    except Exception as exc:  # noqa: BLE001 - dnslib's BufferError and friends: unreadable
        raise UnreadableAnswer(f"unreadable DNS answer: {exc}") from exc


#: dnslib renders a label byte outside 33..126 as \\ddd; a label without one is its text.
_PRINTABLE = bytes(range(33, 127))
#: Pointers followed in one name: compression never needs a pointer to a pointer, and a
#: chain is a loop or an attack (dnslib, read before, failed at its recursion limit).
_MAX_POINTERS = 128
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _read_name(reply: bytes, offset: int) -> tuple[str, int]:
    """The normalized name at `offset` and the offset after it, read as dnslib's
    `DNSBuffer.decode_name` reads it (a length byte of 0x40..0xbf is a length, a
    pointer must point before its own end, each label must be UTF-8) without its
    per-byte buffer; `normalize_name(str(DNSLabel))` is what callers compared before."""
    labels: list[bytes] = []
    size = len(reply)
    after = -1  # the offset after the name where it stands: after its first pointer
    seen: set[int] = set()
    while True:
        if offset >= size:
            raise UnreadableAnswer("a DNS name runs past the end of the answer")
        length = reply[offset]
        if length >= 0xC0:
            if offset + 2 > size:
                raise UnreadableAnswer("a DNS name pointer runs past the end of the answer")
            pointer = ((length & 0x3F) << 8) | reply[offset + 1]
            if pointer >= offset + 2 or offset in seen or len(seen) >= _MAX_POINTERS:
                raise UnreadableAnswer(f"a DNS name pointer at {offset} points forwards or loops")
            seen.add(offset)
            if after < 0:
                after = offset + 2
            offset = pointer
            continue
        offset += 1
        if length == 0:
            break
        if offset + length > size:
            raise UnreadableAnswer("a DNS label runs past the end of the answer")
        labels.append(reply[offset : offset + length])
        offset += length
    if after < 0:
        after = offset
    if not labels:
        return "", after
    raw = b".".join(labels)
    if not raw.translate(None, _PRINTABLE):
        return raw.decode("ascii").lower(), after
    for label in labels:
        try:
            label.decode()
        except UnicodeDecodeError:
            raise UnreadableAnswer(f"a DNS label is not UTF-8: {label!r}") from None
    return normalize_name(str(DNSLabel(labels))), after


def _address(rdata: bytes) -> IPAddress:
    if len(rdata) == 4:
        return ipaddress.IPv4Address(rdata)
    if rdata[:12] == _V4_MAPPED:
        return ipaddress.IPv4Address(rdata[12:])
    return ipaddress.IPv6Address(rdata)


def _parse_answer(reply: bytes) -> Answer:
    if len(reply) < _HEADER.size:
        raise UnreadableAnswer(f"a DNS answer of {len(reply)} bytes has no header")
    _, _, qdcount, ancount, _, _ = _HEADER.unpack_from(reply)
    if qdcount != 1:
        raise UnreadableAnswer(f"a DNS answer with {qdcount} questions")
    size = len(reply)
    name, offset = _read_name(reply, _HEADER.size)
    names = [name]
    offset += 4  # qtype, qclass
    if offset > size:
        raise UnreadableAnswer("a DNS question runs past the end of the answer")
    addresses: list[IPAddress] = []
    for _ in range(ancount):
        # The owner: the chain is read from the targets. Mostly a pointer to the question's
        # name (always valid: it points back to the header's end), not read again.
        if offset + 2 <= size and reply[offset] == 0xC0 and reply[offset + 1] == _HEADER.size:
            offset += 2
        else:
            _, offset = _read_name(reply, offset)
        if offset + _RR.size > size:
            raise UnreadableAnswer("a DNS answer record runs past the end of the message")
        rtype, _, _, rdlength = _RR.unpack_from(reply, offset)
        start = offset + _RR.size
        end = start + rdlength
        if end > size:
            raise UnreadableAnswer("a DNS answer record runs past the end of the message")
        if rtype == QTYPE.CNAME:
            target, after = _read_name(reply, start)
            if after != end:
                raise UnreadableAnswer(f"a CNAME to {target} does not fill its rdata")
            if target not in names:
                names.append(target)
        elif _ADDRESS_SIZES.get(rtype) == rdlength:
            addresses.append(_address(reply[start:end]))
        offset = end  # any other record, or an address of the wrong size: skipped
    return Answer(tuple(names), tuple(addresses))


#: What `resolve` learned in this process, kept for the answers' TTL (a fence per test
#: need not ask again): (name, upstream) -> (monotonic expiry, answer).
_resolved: dict[tuple[str, tuple[str, int]], tuple[float, Answer]] = {}


def resolve(name: str, upstream: tuple[str, int], timeout: float = 2.0) -> Answer:
    """Ask the upstream for A and AAAA of `name`; an unreachable upstream gives no addresses.
    An answer is reused for as long as its records' TTL (the shortest) allows; one with no
    record (or an upstream that did not answer) is asked again next time."""
    cached = _resolved.get((name, upstream))
    if cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    names: list[str] = [name]
    addresses: list[IPAddress] = []
    ttls: list[int] = []
    for qtype in ("A", "AAAA"):
        try:
            reply = DNSRecord.question(name, qtype).send(
                upstream[0], upstream[1], timeout=timeout, ipv6=":" in upstream[0]
            )
            answer = parse_answer(reply)
            record = DNSRecord.parse(reply)
        except Exception:  # noqa: BLE001 - what cannot be resolved cannot be pre-learned
            ttls.append(0)  # so it is asked again next time
            continue
        names.extend(n for n in answer.names if n not in names)
        addresses.extend(a for a in answer.addresses if a not in addresses)
        ttls.extend(rr.ttl for rr in (*record.rr, *record.auth))  # none: says nothing of time
    resolved = Answer(tuple(names), tuple(addresses))
    if ttls and min(ttls) > 0:
        _resolved[(name, upstream)] = (time.monotonic() + min(ttls), resolved)
    return resolved


HostsEntries = list[tuple[IPAddress, tuple[str, ...]]]

#: Bytes of a hosts file read: blocklist hosts files run to a few MiB; a bigger file is
#: judged by its first HOSTS_MAX bytes rather than read whole into memory.
HOSTS_MAX = 64 << 20


@dataclass(frozen=True)
class HostsFile:
    """What a hosts file said, and which file it was as the kernel names it."""

    entries: HostsEntries
    #: (dev, ino): the inode's superblock device in the kernel's encoding (major << 20 |
    #: minor) and its number; None when nothing was read.
    key: tuple[int, int] | None


def read_hosts(
    path: str = "/etc/hosts", mountinfo: str = "/proc/thread-self/mountinfo"
) -> HostsFile:
    """Read a hosts file: its entries and its inode (`HostsFile.key`).

    Only a regular file is read (a FIFO bind-mounted as /etc/hosts would block the
    reader forever, a device never end), opened non-blocking; anything else, or a file
    that cannot be opened, reads as no entries. The device is the superblock's as the
    mount table `mountinfo` (of the namespace `path` is resolved in) gives it, which is
    what the kernel's programs see (a btrfs subvolume's stat() shows another); when the
    mount is not found there, stat()'s.
    """
    read = _read_regular(path, lambda fd, _: _mount_dev(fd, mountinfo))
    if read is None:
        return HostsFile([], None)
    info, data, dev = read
    return HostsFile(_parse(data), (dev, info.st_ino))


def _read_regular(
    path: str, device: Callable[[int, os.stat_result], int | None]
) -> tuple[os.stat_result, bytes, int] | None:
    """A regular file's stat(), its first HOSTS_MAX bytes, and its superblock's device:
    `device(fd, stat)`, else stat()'s; None when it is not one, or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        data = _read_up_to(fd, HOSTS_MAX)
        dev = device(fd, info)
        if dev is None:
            dev = os.major(info.st_dev) << 20 | os.minor(info.st_dev)
        return info, data, dev
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse(data: bytes) -> HostsEntries:
    return parse_hosts(data.decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class _Seen:
    """What the last `read_own_hosts` learned, and of what."""

    #: The process's mount namespace and root directory, as (dev, ino) pairs.
    view: tuple[int, int, int, int]
    #: The file as stat() names it (dev, ino), and its superblock's device.
    file: tuple[int, int]
    dev: int
    digest: bytes  # of its bytes
    entries: HostsEntries


_seen: _Seen | None = None
#: The mount table of the view `_mounts_view`, open: poll() says when a mount changed in
#: it since the last poll().
_mounts, _mounts_view = -1, (0, 0, 0, 0)
_seen_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child shares the open mount table with its parent, and with it the
    kernel's note of the last change seen (one poll() of either takes it): its own."""
    global _seen, _mounts, _seen_lock
    if _mounts >= 0:
        os.close(_mounts)
    _seen, _mounts, _seen_lock = None, -1, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def read_own_hosts(path: str = "/etc/hosts") -> HostsFile:
    """`read_hosts(path)` as the calling thread sees it, at every run of a fence. The file
    is read each time; from the last read, its entries are taken while its bytes are the
    same, and its superblock's device (two /proc files: most of a read's 0.1-0.3 ms)
    while the thread is in the process's own mount namespace, with the same root, no
    mount changed there since (poll() on its mountinfo), and the file is the same inode.
    A thread in a mount namespace of its own reads it all: holding its mount table open
    would keep that namespace alive."""
    global _seen
    view = _view()
    if view is None:
        return read_hosts(path)
    with _seen_lock:
        changed = _mounts_changed(_mounts_of(view))
        seen = _seen if _seen is not None and _seen.view == view else None

        def device(fd: int, info: os.stat_result) -> int | None:
            if seen is not None and not changed and seen.file == (info.st_dev, info.st_ino):
                return seen.dev
            return _mount_dev(fd, "/proc/thread-self/mountinfo")

        read = _read_regular(path, device)
        if read is None:
            _seen = None
            return HostsFile([], None)
        info, data, dev = read
        digest = hashlib.blake2b(data, digest_size=16).digest()
        entries = seen.entries if seen is not None and seen.digest == digest else _parse(data)
        _seen = _Seen(view, (info.st_dev, info.st_ino), dev, digest, entries)
        return HostsFile(entries, (dev, info.st_ino))


def _mounts_of(view: tuple[int, int, int, int]) -> int:
    """The open mount table of `view` (this thread's), opened now if it is another's."""
    global _mounts, _mounts_view
    if _mounts < 0 or _mounts_view != view:
        if _mounts >= 0:
            os.close(_mounts)
        _mounts = os.open("/proc/thread-self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        _mounts_view = view
    return _mounts


def _view() -> tuple[int, int, int, int] | None:
    """The process's mount namespace and root, or None if this thread is in another."""
    namespace = os.stat("/proc/thread-self/ns/mnt")
    if namespace.st_ino != os.stat("/proc/self/ns/mnt").st_ino:
        return None
    root = os.stat("/")
    return namespace.st_dev, namespace.st_ino, root.st_dev, root.st_ino


def _mounts_changed(fd: int) -> bool:
    """Whether a mount changed in the namespace of the mount table `fd` since the last
    call (the kernel's mounts_poll: POLLPRI once per change, then quiet)."""
    poller = select.poll()
    poller.register(fd, select.POLLPRI)
    return any(events & (select.POLLPRI | select.POLLERR) for _, events in poller.poll(0))


def _read_up_to(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`, to its end: os.read, as a buffered file object costs
    more than this small read (at every run)."""
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(limit - size, 1 << 16))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _mount_dev(fd: int, mountinfo: str) -> int | None:
    """The kernel's device number of the superblock under descriptor `fd` (of this
    process), from its mount's line in `mountinfo`; None when that cannot be read."""
    try:
        fdinfo = read_file(f"/proc/self/fdinfo/{fd}")
        table = read_file(mountinfo)
    except OSError:
        return None
    for line in fdinfo.splitlines():
        if line.startswith("mnt_id:"):
            return mount_dev(table, int(line.split(":", 1)[1]))
    return None


def mount_dev(mountinfo: str, mount_id: int) -> int | None:
    """The device (major << 20 | minor) of mount `mount_id` in a /proc/<pid>/mountinfo text
    (`ID PARENT MAJOR:MINOR ROOT POINT ...`); None when it is not there or unreadable."""
    for line in mountinfo.splitlines():
        fields = line.split(maxsplit=3)
        if len(fields) < 3 or fields[0] != str(mount_id):
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            return None
        return int(major) << 20 | int(minor)
    return None


def parse_hosts(text: str) -> HostsEntries:
    """(address, names) per line of a hosts file's text; bad lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = as_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        entries.append((address, tuple(normalize_name(n) for n in fields[1:])))
    return entries
