"""DNS messages as the proxy reads and writes them: the header, the question, replies.

Only the fields the proxy needs are parsed here, by hand on the hot path
(dnslib only for a question with a compression pointer or an extended label
type, which no ordinary client sends); answers are passed on byte for byte.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from dnslib import QTYPE
from dnslib.label import DNSBuffer

HEADER = struct.Struct("!HHHHHH")
FORMERR = 1
SERVFAIL = 2
NOTIMP = 4
QR = 0x8000
OPCODE_MASK = 0x7800
RD = 0x0100
RA = 0x0080
MAX_MESSAGE = 65535


class UpstreamFailure(Exception):
    """The upstream did not produce a usable answer; the client gets SERVFAIL."""


@dataclass(frozen=True)
class Question:
    """A query's header fields and its one question, as received."""

    txid: int
    flags: int
    name: str  # presentation form, lowercase, without trailing dot
    qtype: str  # "A", "AAAA", ... ("TYPE65280" for unknown types)
    raw: bytes  # the question section, byte for byte (echoed in answers)


_TYPE = struct.Struct("!H")
# Bytes a label may hold and still read as itself in presentation form, lowercased.
_PLAIN = b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_QTYPES: dict[int, str] = {}


def read_question(data: bytes) -> Question | bytes | None:
    """The question of a query; else the error reply to send (bytes), or None: send nothing."""
    if len(data) < HEADER.size:
        return None
    txid, flags, qdcount, _, _, _ = HEADER.unpack_from(data)
    if flags & QR:
        # Answering a response could start a reply loop with another responder.
        return None
    if flags & OPCODE_MASK:
        return error_reply(txid, flags, NOTIMP)
    if qdcount != 1:
        return error_reply(txid, flags, FORMERR)
    read = read_labels(data) or _read_labels_dnslib(data)
    if read is None:
        return error_reply(txid, flags, FORMERR)
    labels, end = read
    (qtype,) = _TYPE.unpack_from(data, end)
    plain = not b"".join(labels).translate(None, _PLAIN)  # every byte of every label
    name = b".".join(labels).decode("ascii").lower() if plain else name_text(labels)
    return Question(txid, flags, name, qtype_name(qtype), data[HEADER.size : end + 4])


def read_labels(data: bytes) -> tuple[list[bytes], int] | None:
    """The question's labels and where its type starts; None: not a plain, whole name."""
    labels: list[bytes] = []
    offset = HEADER.size
    size = len(data)
    while offset < size:
        length = data[offset]
        if length == 0:
            return (labels, offset + 1) if offset + 5 <= size else None
        if length > 63:  # a compression pointer or an extended label type
            return None
        labels.append(data[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return None


def _read_labels_dnslib(data: bytes) -> tuple[list[bytes], int] | None:
    try:
        buffer = DNSBuffer(data)
        buffer.offset = HEADER.size
        qname = buffer.decode_name()
        buffer.unpack("!HH")
    except Exception:  # noqa: BLE001 - whatever dnslib cannot read is a malformed query
        return None
    return list(qname.label), buffer.offset - 4


def qtype_name(qtype: int) -> str:
    name = _QTYPES.get(qtype)
    if name is None:
        name = _QTYPES[qtype] = str(QTYPE[qtype])
    return name


def name_text(labels: list[bytes]) -> str:
    # Presentation form, lowercased: a dot inside a label is escaped so that the
    # single label b"github.com" never reads as the name github.com.
    out = []
    for label in labels:
        text = label.decode("utf-8", errors="surrogateescape")
        escaped = "".join(
            f"\\{ch}"
            if ch in ".\\"
            else (f"\\{ord(ch):03d}" if ord(ch) <= 0x20 or ord(ch) == 0x7F else ch)
            for ch in text
        )
        out.append(escaped.lower())
    return ".".join(out)


def error_reply(txid: int, flags: int, rcode: int) -> bytes:
    # No question section: the request's may be the very thing that is malformed.
    return HEADER.pack(txid, reply_flags(flags, rcode), 0, 0, 0, 0)


def answer(txid: int, flags: int, question: bytes, rcode: int) -> bytes:
    # The question is echoed byte for byte so that resolvers checking the
    # 0x20 case randomisation of the name accept the answer.
    return HEADER.pack(txid, reply_flags(flags, rcode), 1, 0, 0, 0) + question


def reply_flags(flags: int, rcode: int) -> int:
    return QR | (flags & OPCODE_MASK) | (flags & RD) | RA | rcode


def check_reply(reply: bytes, txid: int) -> None:
    if len(reply) < HEADER.size:
        raise UpstreamFailure(f"short answer from upstream ({len(reply)} bytes)")
    rid, flags = struct.unpack_from("!HH", reply)
    if rid != txid:
        raise UpstreamFailure(f"upstream answered id {rid}, asked {txid}")
    if not flags & QR:
        raise UpstreamFailure("upstream sent a query, not an answer")


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamFailure("upstream timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise UpstreamFailure("upstream closed the connection mid-answer")
        data += chunk
    return data


def servfail(question: Question) -> bytes:
    return answer(question.txid, question.flags, question.raw, SERVFAIL)


def outage(question: Question, rcode: int | None) -> bytes | None:
    """A blocked query's answer; None: the outage is a query never answered."""
    if rcode is None:
        return None
    return answer(question.txid, question.flags, question.raw, rcode)
