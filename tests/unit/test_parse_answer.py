"""`addresses.parse_answer` reads names by hand; it must judge every answer as the
dnslib-based reader it replaced did: the same names and addresses, or `UnreadableAnswer`.

The reference below is that reader, kept verbatim (DNSBuffer per byte). The
fuzz mutates real answers (CNAME chains, compression pointers, AAAA, odd labels)
with a fixed seed; `python tests/unit/test_parse_answer.py 100000` runs it by hand.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import sys

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.label import DNSBuffer

from pytest_depfence.addresses import Answer, IPAddress, UnreadableAnswer, as_address, parse_answer
from pytest_depfence.policy import normalize_name

_HEADER = struct.Struct("!6H")
_RR = struct.Struct("!HHIH")
_ADDRESS_SIZES = {QTYPE.A: 4, QTYPE.AAAA: 16}


def reference_parse(reply: bytes) -> Answer:
    """The parser before it read names by hand (pytest_depfence 9359353)."""
    try:
        return _reference(bytes(reply))
    except UnreadableAnswer:
        raise
    except Exception as exc:  # noqa: BLE001 - as the original
        raise UnreadableAnswer(f"unreadable DNS answer: {exc}") from exc


def _reference(reply: bytes) -> Answer:
    if len(reply) < _HEADER.size:
        raise UnreadableAnswer(f"a DNS answer of {len(reply)} bytes has no header")
    _, _, qdcount, ancount, _, _ = _HEADER.unpack_from(reply)
    if qdcount != 1:
        raise UnreadableAnswer(f"a DNS answer with {qdcount} questions")
    buffer = DNSBuffer(reply)
    buffer.offset = _HEADER.size
    names = [normalize_name(str(buffer.decode_name()))]
    buffer.unpack("!HH")
    addresses: list[IPAddress] = []
    for _ in range(ancount):
        buffer.decode_name()
        rtype, _, _, rdlength = buffer.unpack(_RR.format)
        start, end = buffer.offset, buffer.offset + rdlength
        if end > len(reply):
            raise UnreadableAnswer("a DNS answer record runs past the end of the message")
        if rtype == QTYPE.CNAME:
            target = normalize_name(str(buffer.decode_name()))
            if buffer.offset != end:
                raise UnreadableAnswer(f"a CNAME to {target} does not fill its rdata")
            if target not in names:
                names.append(target)
        elif _ADDRESS_SIZES.get(rtype) == rdlength:
            addresses.append(as_address(ipaddress.ip_address(reply[start:end])))
        buffer.offset = end
    return Answer(tuple(names), tuple(addresses))


def _seeds() -> list[bytes]:
    chain = DNSRecord.question("Www.GitHub.com", "A").reply()
    chain.add_answer(RR("Www.GitHub.com", QTYPE.CNAME, rdata=CNAME("github.com"), ttl=60))
    chain.add_answer(RR("github.com", QTYPE.CNAME, rdata=CNAME("lb.github.com"), ttl=60))
    chain.add_answer(RR("lb.github.com", QTYPE.A, rdata=A("10.77.1.1"), ttl=60))
    six = DNSRecord.question("api.github.com", "AAAA").reply()
    six.add_answer(RR("api.github.com", QTYPE.AAAA, rdata=AAAA("fd77::1:2"), ttl=60))
    six.add_answer(
        RR(
            "api.github.com",
            QTYPE.AAAA,
            rdata=AAAA(list(ipaddress.ip_address("::ffff:10.77.1.2").packed)),
            ttl=60,
        )
    )
    odd = DNSRecord.question("x.example", "A").reply()
    odd.add_answer(
        RR(
            "x.example",
            QTYPE.CNAME,
            rdata=CNAME(DNSLabel([b"a b", b"\xc3\xa9t\xc3\xa9", b"C"])),
            ttl=1,
        )
    )
    odd.add_answer(RR("x.example", QTYPE.TXT, rdata=TXT("hello"), ttl=1))
    odd.add_answer(RR("x.example", QTYPE.A, rdata=A("10.0.0.1"), ttl=1))
    empty = DNSRecord.question("nothing.test", "A").reply()
    return [r.pack() for r in (chain, six, odd, empty)]


def _mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and data:  # one byte anywhere
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:  # a byte that is a pointer or a length
            data[rng.randrange(len(data))] = rng.choice((0, 1, 3, 0x3F, 0x40, 0xBF, 0xC0, 0xFF))
        elif kind == 2:  # truncated
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 3 and data:  # a compression pointer to somewhere
            at = rng.randrange(len(data))
            data[at : at + 2] = bytes((0xC0 | rng.randrange(1), rng.randrange(len(data) + 4)))
        elif kind == 4 and len(data) > 8:  # a header count
            data[rng.choice((4, 5, 6, 7))] = rng.randrange(4)
        else:  # bytes inserted
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
    return bytes(data)


def _outcome(parse: object, packet: bytes) -> object:
    try:
        return parse(packet)  # type: ignore[operator]
    except UnreadableAnswer:
        return UnreadableAnswer


def fuzz(count: int, seed: int) -> list[bytes]:
    """The mutated answers on which the two readers differ."""
    rng = random.Random(seed)
    seeds = _seeds()
    differ = []
    for _ in range(count):
        packet = _mutate(rng, rng.choice(seeds))
        if _outcome(parse_answer, packet) != _outcome(reference_parse, packet):
            differ.append(packet)
    return differ


def test_mutated_answers_read_as_the_dnslib_reader_read_them() -> None:
    assert fuzz(3000, seed=11) == []


@pytest.mark.parametrize("packet", _seeds())
def test_well_formed_answers_read_as_before(packet: bytes) -> None:
    assert parse_answer(packet) == reference_parse(packet)


def test_names_are_normalized_and_unusual_bytes_rendered_as_dnslib_renders_them() -> None:
    answer = parse_answer(_seeds()[2])
    assert answer.names == ("x.example", "a\\032b.\\195\\169t\\195\\169.c")
    assert answer.addresses == (ipaddress.ip_address("10.0.0.1"),)


def test_a_v4_mapped_aaaa_is_its_ipv4_address() -> None:
    answer = parse_answer(_seeds()[1])
    assert answer.addresses == (
        ipaddress.ip_address("fd77::1:2"),
        ipaddress.ip_address("10.77.1.2"),
    )


def _question(name: bytes) -> bytes:
    return _HEADER.pack(1, 0x8180, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "name",
    [
        b"\xc0\x0c",  # a pointer to itself
        b"\xc0\x0e",  # forwards
        b"\x01a\xc0\x0c",  # a loop through a label
        b"\x02\xff\xfe\x00",  # not UTF-8
        b"\x05ab",  # a label past the end
        b"\xc0",  # half a pointer
    ],
)
def test_an_unreadable_name_is_unreadable(name: bytes) -> None:
    with pytest.raises(UnreadableAnswer):
        parse_answer(_question(name))
    with pytest.raises(UnreadableAnswer):
        reference_parse(_question(name))


def test_a_long_chain_of_pointers_is_unreadable() -> None:
    # The second record's owner: 200 pointers (in the first record's rdata) each to the
    # one before, the first to the question's root name. dnslib read it; no answer needs it.
    links = [12] + [28 + 2 * i for i in range(199)]
    chain = b"".join(struct.pack("!H", 0xC000 | at) for at in links)
    packet = _HEADER.pack(1, 0x8180, 1, 2, 0, 0) + b"\x00\x00\x01\x00\x01"
    packet += b"\x00" + _RR.pack(QTYPE.TXT, 1, 1, len(chain)) + chain
    packet += struct.pack("!H", 0xC000 | (28 + 2 * 199)) + _RR.pack(QTYPE.TXT, 1, 1, 0)
    assert reference_parse(packet) == Answer(("",), ())
    with pytest.raises(UnreadableAnswer):
        parse_answer(packet)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    found = fuzz(count, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"{count} mutated answers, {len(found)} read differently")
    for packet in found[:10]:
        print(packet.hex(), _outcome(parse_answer, packet), _outcome(reference_parse, packet))
    sys.exit(1 if found else 0)
