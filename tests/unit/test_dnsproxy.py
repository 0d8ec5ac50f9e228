"""The DNS proxy against a real authoritative upstream (dnslib) and real clients.

No root needed: everything listens on loopback high ports.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from pytest_depfence.dnsproxy import DnsProxy, Query
from pytest_depfence.outages import OUTAGES
from pytest_depfence.policy import Policy

# What a client waits before concluding that no answer is coming.
SILENCE = 0.3
ZONE = "example.test"


# -- the upstream -------------------------------------------------------------


class Zone(BaseResolver):  # type: ignore[misc]
    """An authoritative server for example.test (and a github.com that must never be asked)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.release_slow = threading.Event()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            self.asked.append((name, handler.protocol))
        reply = request.reply()
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        if name == f"www.{ZONE}" and qtype == "A":
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("192.0.2.10"), ttl=4321))
        elif name == f"www.{ZONE}" and qtype == "AAAA":
            reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA("2001:db8::10"), ttl=8765))
        elif name == f"alias.{ZONE}":
            reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(f"target.{ZONE}"), ttl=111))
            reply.add_answer(RR(f"target.{ZONE}", QTYPE.A, rdata=A("192.0.2.20"), ttl=222))
        elif name == f"big.{ZONE}":
            for i in range(20):
                reply.add_answer(RR(qname, QTYPE.TXT, rdata=TXT(f"{i:02d}" + "x" * 60), ttl=99))
        elif name == f"slow.{ZONE}":
            self.release_slow.wait(5)
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("192.0.2.30"), ttl=30))
        elif name.endswith("github.com"):
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("140.82.112.3"), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            soa = SOA(f"ns.{ZONE}", f"hostmaster.{ZONE}", (2024010101, 3600, 600, 86400, 333))
            reply.add_auth(RR(ZONE, QTYPE.SOA, rdata=soa, ttl=333))
        return reply

    def names_asked(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.asked]


class SmallUdpHandler(DNSHandler):  # type: ignore[misc]
    # Classic 512-byte UDP limit, so big.example.test comes back with TC set.
    udplen = 512


@dataclass
class Upstream:
    zone: Zone
    port: int
    servers: list[DNSServer]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def _start_upstream(zone: Zone) -> Upstream:
    quiet = DNSLogger(logf=lambda _msg: None)
    for _ in range(20):
        udp = DNSServer(zone, address="127.0.0.1", port=0, logger=quiet, handler=SmallUdpHandler)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=quiet)
        except OSError:
            udp.server.server_close()
            continue
        udp.start_thread()
        tcp.start_thread()
        return Upstream(zone, port, [udp, tcp])
    raise RuntimeError("no free port for the upstream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = _start_upstream(Zone())
    yield up
    up.zone.release_slow.set()
    for server in up.servers:
        server.stop()
        server.server.server_close()


# -- the proxy under test -------------------------------------------------------


@dataclass
class Seen:
    """What the observer was told, in order. It is told after the client's reply: a test
    looks once `drain()` has returned."""

    queries: list[tuple[Query, Any]] = field(default_factory=list)

    def __call__(self, query: Query, decision: Any) -> None:
        self.queries.append((query, decision))

    @property
    def names(self) -> list[str]:
        return [q.name for q, _ in self.queries]


ProxyFactory = Callable[..., "tuple[DnsProxy, Seen]"]


@dataclass(frozen=True)
class StubVerdict:
    blocked: bool
    rcode: int | None
    rule: Any


class StubJudge:
    """Stands in for the fence's judge (`judge.Judge` behind `run.ProxyJudge`): decides
    by name with `decide`, answers blocked names with `outage`'s rcode, keeps an allowed
    query's verdict after the answer, notes each query it is told the sender of in
    `senders`, and tells `observer` every query."""

    def __init__(
        self,
        decide: Callable[[str], Any],
        observer: Callable[[Query, Any], None],
        outage: str,
    ) -> None:
        self.decide = decide
        self.observer = observer
        self.rcode = OUTAGES[outage].rcode
        self.senders: list[Query] = []

    def query(self, query: Query) -> StubVerdict:
        decision = self.decide(query.name)
        return StubVerdict(bool(decision.blocked), self.rcode, decision.rule)

    def sender(self, query: Query) -> None:
        self.senders.append(query)

    def answer(self, query: Query, reply: bytes, verdict: StubVerdict) -> StubVerdict:
        return verdict

    def observe(self, query: Query, verdict: StubVerdict) -> None:
        self.observer(query, verdict)


def stub_proxy(
    lab_upstream: Upstream,
    *,
    decide: Callable[[str], Any] | None = None,
    observer: Callable[[Query, Any], None] | None = None,
    outage: str = "nxdomain",
    **kwargs: Any,
) -> DnsProxy:
    judge = StubJudge(
        decide or Policy.no_egress("github.com").check_name, observer or Seen(), outage
    )
    kwargs.setdefault("upstream", lab_upstream.address)
    return DnsProxy(judge=judge, **kwargs)


@pytest.fixture
def make_proxy(upstream: Upstream) -> Iterator[ProxyFactory]:
    proxies: list[DnsProxy] = []

    def make(**kwargs: Any) -> tuple[DnsProxy, Seen]:
        seen = Seen()
        kwargs.setdefault("observer", seen)
        proxy = stub_proxy(upstream, **kwargs)
        proxies.append(proxy)
        return proxy.start(), seen

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy: ProxyFactory) -> tuple[DnsProxy, Seen]:
    return make_proxy()


# -- clients --------------------------------------------------------------------


def question(name: str, qtype: str = "A", *, txid: int = 0x1234, rd: bool = True) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = txid
    record.header.rd = int(rd)
    return bytes(record.pack())


def ask_udp(port: int, packet: bytes, host: str = "127.0.0.1", timeout: float = 2.0) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (host, port))
        return sock.recv(65535)


def ask_tcp(port: int, packet: bytes, host: str = "127.0.0.1", timeout: float = 2.0) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(struct.pack("!H", len(packet)) + packet)
        return read_framed(sock)


def read_framed(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    return recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed before the whole answer arrived"
        data += chunk
    return data


def ask(transport: str, port: int, packet: bytes, host: str = "127.0.0.1") -> bytes:
    return (ask_tcp if transport == "tcp" else ask_udp)(port, packet, host)


def assert_no_udp_answer(port: int, packet: bytes) -> None:
    with pytest.raises(socket.timeout):
        ask_udp(port, packet, timeout=SILENCE)


def rcode(reply: bytes) -> int:
    return int(struct.unpack("!H", reply[2:4])[0]) & 0xF


def flags(reply: bytes) -> int:
    return int(struct.unpack("!H", reply[2:4])[0])


def txid(reply: bytes) -> int:
    return int(struct.unpack("!H", reply[:2])[0])


# -- forwarding ---------------------------------------------------------------------


def _check_www_a(reply: DNSRecord) -> None:
    assert [(str(rr.rdata), rr.ttl) for rr in reply.rr] == [("192.0.2.10", 4321)]


def _check_www_aaaa(reply: DNSRecord) -> None:
    assert [(str(rr.rdata), rr.ttl) for rr in reply.rr] == [("2001:db8::10", 8765)]


def _check_cname_chain(reply: DNSRecord) -> None:
    assert [(QTYPE[rr.rtype], str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        ("CNAME", f"target.{ZONE}.", 111),
        ("A", "192.0.2.20", 222),
    ]


def _check_nxdomain(reply: DNSRecord) -> None:
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert [(QTYPE[rr.rtype], rr.ttl) for rr in reply.auth] == [("SOA", 333)]


def _check_truncated(reply: DNSRecord) -> None:
    assert reply.header.tc == 1
    assert reply.rr == []


def _check_big(reply: DNSRecord) -> None:
    assert reply.header.tc == 0
    assert len(reply.rr) == 20


FORWARDED = [
    pytest.param("udp", f"www.{ZONE}", "A", _check_www_a, id="udp-A"),
    pytest.param("tcp", f"www.{ZONE}", "A", _check_www_a, id="tcp-A"),
    pytest.param("udp", f"www.{ZONE}", "AAAA", _check_www_aaaa, id="udp-AAAA"),
    pytest.param("tcp", f"www.{ZONE}", "AAAA", _check_www_aaaa, id="tcp-AAAA"),
    pytest.param("udp", f"alias.{ZONE}", "A", _check_cname_chain, id="udp-cname-chain"),
    pytest.param("tcp", f"alias.{ZONE}", "A", _check_cname_chain, id="tcp-cname-chain"),
    pytest.param("udp", f"nope.{ZONE}", "A", _check_nxdomain, id="udp-nxdomain-soa"),
    pytest.param("tcp", f"nope.{ZONE}", "A", _check_nxdomain, id="tcp-nxdomain-soa"),
    pytest.param("udp", f"big.{ZONE}", "TXT", _check_truncated, id="udp-tc"),
    pytest.param("tcp", f"big.{ZONE}", "TXT", _check_big, id="tcp-big"),
]


@pytest.mark.parametrize(("transport", "name", "qtype", "check"), FORWARDED)
def test_forwarded_answer_is_byte_identical_to_the_upstream(
    upstream: Upstream,
    proxy: tuple[DnsProxy, Seen],
    transport: str,
    name: str,
    qtype: str,
    check: Callable[[DNSRecord], None],
) -> None:
    dns, seen = proxy
    packet = question(name, qtype, txid=0xBEEF)
    asked_before = len(upstream.zone.asked)
    direct = ask(transport, upstream.port, packet)
    via_proxy = ask(transport, dns.port, packet)
    assert via_proxy == direct
    check(DNSRecord.parse(via_proxy))
    # Forwarded over the client's own transport.
    assert upstream.zone.asked[asked_before:] == [(name, transport)] * 2
    dns.drain()
    assert [(q.name, q.qtype, q.transport) for q, _ in seen.queries] == [(name, qtype, transport)]


def test_dnslib_client_gets_the_answer_over_udp_and_tcp(
    upstream: Upstream, proxy: tuple[DnsProxy, Seen]
) -> None:
    dns, _ = proxy
    record = DNSRecord.question(f"alias.{ZONE}")
    for tcp in (False, True):
        direct = record.send("127.0.0.1", upstream.port, tcp=tcp, timeout=2)
        assert record.send("127.0.0.1", dns.port, tcp=tcp, timeout=2) == direct


def test_truncated_udp_answer_then_tcp_retry_like_a_resolver(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, seen = proxy
    packet = question(f"big.{ZONE}", "TXT", txid=77)
    assert DNSRecord.parse(ask_udp(dns.port, packet)).header.tc == 1
    full = DNSRecord.parse(ask_tcp(dns.port, packet))
    assert full.header.tc == 0
    assert sorted(str(rr.rdata)[1:3] for rr in full.rr) == [f"{i:02d}" for i in range(20)]
    dns.drain()
    assert [q.transport for q, _ in seen.queries] == ["udp", "tcp"]


def test_two_queries_on_one_tcp_connection(
    upstream: Upstream, proxy: tuple[DnsProxy, Seen]
) -> None:
    dns, seen = proxy
    first = question(f"www.{ZONE}", "A", txid=1)
    second = question(f"www.{ZONE}", "AAAA", txid=2)
    expected = [ask_tcp(upstream.port, first), ask_tcp(upstream.port, second)]
    with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as sock:
        # Both sent before reading anything: a pipelining client.
        sock.sendall(b"".join(struct.pack("!H", len(p)) + p for p in (first, second)))
        answers = [read_framed(sock), read_framed(sock)]
        # ...and a third after the answers, on the same connection.
        third = question(f"alias.{ZONE}", txid=3)
        sock.sendall(struct.pack("!H", len(third)) + third)
        answers.append(read_framed(sock))
    assert answers[:2] == expected
    _check_cname_chain(DNSRecord.parse(answers[2]))
    # Pipelined queries are forwarded side by side and each observed as its answer
    # comes (issue 10): replies keep the queries' order, observations need not.
    dns.drain()
    assert sorted(q.txid for q, _ in seen.queries) == [1, 2, 3]
    assert len({q.client for q, _ in seen.queries}) == 1


def test_slow_upstream_answer_does_not_stall_other_udp_queries(
    upstream: Upstream, proxy: tuple[DnsProxy, Seen]
) -> None:
    dns, _ = proxy
    upstream.zone.release_slow.clear()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as slow:
            slow.settimeout(3)
            slow.sendto(question(f"slow.{ZONE}", txid=9), ("127.0.0.1", dns.port))
            # Answered while slow.example.test is still held at the upstream.
            _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"), timeout=1)))
            assert not upstream.zone.release_slow.is_set()
            upstream.zone.release_slow.set()
            assert txid(slow.recv(65535)) == 9
    finally:
        upstream.zone.release_slow.set()


def answer_a(query: bytes, address: str) -> bytes:
    """An upstream's answer to `query`: one A record, `address`."""
    record = DNSRecord.parse(query)
    reply = record.reply()
    reply.add_answer(RR(record.q.qname, QTYPE.A, rdata=A(address), ttl=5))
    return bytes(reply.pack())


def test_many_outstanding_udp_queries_share_one_upstream_socket(make_proxy: ProxyFactory) -> None:
    # 60 clients at once, all with the same txid: each gets its own answer with its id,
    # and the upstream saw one source port (one persistent socket), under distinct ids.
    seen_by_upstream: list[tuple[int, bytes]] = []

    def answer(query: bytes) -> bytes:
        octet = int(str(DNSRecord.parse(query).q.qname).split(".")[0][1:])
        return answer_a(query, f"192.0.2.{octet}")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
        up.bind(("127.0.0.1", 0))
        up.settimeout(5)
        dns, seen = make_proxy(upstream=up.getsockname(), upstream_timeout=5.0)
        clients = []
        for i in range(60):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            sock.sendto(question(f"h{i}.{ZONE}", txid=0x4242), ("127.0.0.1", dns.port))
            clients.append(sock)
        queries = []
        for _ in clients:
            data, addr = up.recvfrom(65535)
            seen_by_upstream.append((addr[1], data[:2]))
            queries.append((data, addr))
        for data, addr in reversed(queries):  # answered out of order
            up.sendto(answer(data), addr)
        replies = [DNSRecord.parse(sock.recv(65535)) for sock in clients]
        for sock in clients:
            sock.close()
    assert len({port for port, _ in seen_by_upstream}) == 1
    assert len({upstream_id for _, upstream_id in seen_by_upstream}) == 60
    assert [r.header.id for r in replies] == [0x4242] * 60
    assert [str(r.q.qname) for r in replies] == [f"h{i}.{ZONE}." for i in range(60)]
    assert [str(r.rr[0].rdata) for r in replies] == [f"192.0.2.{i}" for i in range(60)]
    dns.drain()
    assert sorted(seen.names) == sorted(f"h{i}.{ZONE}" for i in range(60))


def test_answers_left_in_the_upstream_socket_after_the_last_awaited_one_are_dropped(
    make_proxy: ProxyFactory,
) -> None:
    # The upstream answers each query twice, and then sends a datagram of an id never
    # asked: the proxy stops reading once nothing is awaited, so these wait in its socket
    # for the next round. Each later query still gets its own answer, once.
    def answer(query: bytes, octet: int) -> bytes:
        return answer_a(query, f"192.0.2.{octet}")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
        up.bind(("127.0.0.1", 0))
        up.settimeout(5)
        dns, seen = make_proxy(upstream=up.getsockname(), upstream_timeout=5.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for i in range(3):
                client.sendto(question(f"h{i}.{ZONE}", txid=0x100 + i), ("127.0.0.1", dns.port))
                data, addr = up.recvfrom(65535)
                up.sendto(answer(data, i), addr)
                reply = DNSRecord.parse(client.recv(65535))
                up.sendto(answer(data, 200 + i), addr)  # the same id again: late
                up.sendto(b"\xbe\xef" + answer(data, 250)[2:], addr)  # an id never asked
                assert (reply.header.id, str(reply.rr[0].rdata)) == (0x100 + i, f"192.0.2.{i}")
            with pytest.raises(socket.timeout):
                client.settimeout(SILENCE)
                client.recv(65535)  # no second reply to any of them
    dns.drain()
    assert sorted(seen.names) == [f"h{i}.{ZONE}" for i in range(3)]


def test_an_answer_echoing_the_name_in_another_case_is_matched(make_proxy: ProxyFactory) -> None:
    def swapped_case(query: bytes) -> bytes:
        record = DNSRecord.parse(query)
        reply = record.reply()
        reply.add_answer(RR(record.q.qname, QTYPE.A, rdata=A("192.0.2.99"), ttl=5))
        packed = bytearray(reply.pack())
        end = 12 + len(query) - 12 - 4
        packed[12:end] = bytes(packed[12:end]).swapcase()
        return bytes(packed)

    sock, thread = _bad_upstream(swapped_case)
    try:
        dns, _ = make_proxy(upstream=sock.getsockname(), upstream_timeout=5.0)
        reply = DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}", txid=0x0303)))
        thread.join(5)
    finally:
        sock.close()
    assert reply.header.id == 0x0303
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.99"]


def test_udp_queries_start_no_threads(upstream: Upstream, proxy: tuple[DnsProxy, Seen]) -> None:
    dns, _ = proxy
    before = {t.name for t in _dns_threads()}
    for i in range(20):
        _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}", txid=i))))
        assert rcode(ask_udp(dns.port, question("github.com"))) == RCODE.NXDOMAIN
    assert {t.name for t in _dns_threads()} == before == {"depfence-dns-loop"}


# -- blocked names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("outage", "expected"),
    [("nxdomain", RCODE.NXDOMAIN), ("servfail", RCODE.SERVFAIL), ("refused", RCODE.REFUSED)],
)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_blocked_name_gets_the_outage_answer(
    upstream: Upstream, make_proxy: ProxyFactory, outage: str, expected: int, transport: str
) -> None:
    dns, seen = make_proxy(outage=outage)
    packet = question("API.GitHub.COM.", "AAAA", txid=0xD00D)
    reply = ask(transport, dns.port, packet)
    assert txid(reply) == 0xD00D
    assert rcode(reply) == expected
    assert flags(reply) & 0x8000  # QR
    assert flags(reply) & 0x0080  # RA
    assert flags(reply) & 0x0100  # RD copied from the question
    # Question echoed byte for byte (case included), nothing else.
    assert reply[4:12] == struct.pack("!HHHH", 1, 0, 0, 0)
    assert reply[12:] == packet[12:]
    assert "api.github.com" not in upstream.zone.names_asked()
    dns.drain()
    [(query, decision)] = seen.queries
    assert query.name == "api.github.com"
    assert decision.blocked is True
    assert decision.rule.pattern == "github.com"


def test_blocked_answer_copies_a_cleared_rd_bit(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, _ = proxy
    reply = ask_udp(dns.port, question("github.com", rd=False))
    assert rcode(reply) == RCODE.NXDOMAIN
    assert not flags(reply) & 0x0100
    assert flags(reply) & 0x0080


def test_labels_that_only_look_like_the_blocked_name_are_forwarded(
    upstream: Upstream, proxy: tuple[DnsProxy, Seen]
) -> None:
    dns, seen = proxy
    for name in ("notgithub.com", "github.com.evil.test"):
        assert rcode(ask_udp(dns.port, question(name))) in (RCODE.NOERROR, RCODE.NXDOMAIN)
        assert name in upstream.zone.names_asked()
    dns.drain()
    assert [d.blocked for _, d in seen.queries] == [False, False]


def test_timeout_outage_never_answers_but_is_observed(
    upstream: Upstream, make_proxy: ProxyFactory
) -> None:
    dns, seen = make_proxy(outage="timeout")
    assert_no_udp_answer(dns.port, question("github.com"))
    with socket.create_connection(("127.0.0.1", dns.port), timeout=SILENCE) as sock:
        packet = question("api.github.com", txid=5)
        sock.sendall(struct.pack("!H", len(packet)) + packet)
        with pytest.raises(socket.timeout):
            sock.recv(2)
        # The connection still serves the next, allowed query.
        sock.settimeout(2)
        allowed = question(f"www.{ZONE}", txid=6)
        sock.sendall(struct.pack("!H", len(allowed)) + allowed)
        assert txid(read_framed(sock)) == 6
    dns.drain()
    assert seen.names == ["github.com", "api.github.com", f"www.{ZONE}"]
    assert "github.com" not in upstream.zone.names_asked()


# -- upstream failures ------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    # Bound then closed: nothing listens there (UDP answers ICMP, TCP answers RST).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_upstream_down_is_servfail_at_once(
    make_proxy: ProxyFactory, closed_port: int, transport: str
) -> None:
    dns, seen = make_proxy(upstream=("127.0.0.1", closed_port), upstream_timeout=5.0)
    started = time.monotonic()
    reply = ask(transport, dns.port, question(f"www.{ZONE}", txid=404))
    elapsed = time.monotonic() - started
    assert (txid(reply), rcode(reply)) == (404, RCODE.SERVFAIL)
    assert elapsed < 0.5, f"SERVFAIL took {elapsed:.3f}s; a refused upstream must not wait"
    dns.drain()
    assert seen.names == [f"www.{ZONE}"]


def test_a_batch_of_queries_to_a_down_upstream_is_all_servfail_and_observed_once(
    make_proxy: ProxyFactory, closed_port: int
) -> None:
    # Read in batches, forwarded back to back: sends the refused upstream fails (its ICMP
    # error comes back on a later send) and queries it fails all at once (on a read) each
    # get SERVFAIL, without waiting for the upstream timeout (longer than the clients').
    dns, seen = make_proxy(upstream=("127.0.0.1", closed_port), upstream_timeout=60.0)
    clients = []
    for i in range(40):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(10)
        clients.append(sock)
    try:
        for i, sock in enumerate(clients):
            sock.sendto(question(f"h{i}.{ZONE}", txid=i), ("127.0.0.1", dns.port))
        replies = [sock.recv(65535) for sock in clients]
    finally:
        for sock in clients:
            sock.close()
    assert [(txid(r), rcode(r)) for r in replies] == [(i, RCODE.SERVFAIL) for i in range(40)]
    dns.drain()
    assert sorted(seen.names) == sorted(f"h{i}.{ZONE}" for i in range(40))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_silent_upstream_is_servfail_after_upstream_timeout(
    make_proxy: ProxyFactory, transport: str
) -> None:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as silent:
        silent.bind(("127.0.0.1", 0))
        if transport == "tcp":
            silent.listen(8)  # the handshake completes, nothing is ever read or sent
        dns, _ = make_proxy(upstream=silent.getsockname(), upstream_timeout=0.3)
        started = time.monotonic()
        reply = ask(transport, dns.port, question(f"www.{ZONE}", txid=504))
        elapsed = time.monotonic() - started
    assert (txid(reply), rcode(reply)) == (504, RCODE.SERVFAIL)
    assert 0.25 <= elapsed < 1.5


def _bad_upstream(answer: Callable[[bytes], bytes]) -> tuple[socket.socket, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve() -> None:
        data, addr = sock.recvfrom(65535)
        sock.sendto(answer(data), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def test_a_query_echoed_back_is_servfail_at_once(make_proxy: ProxyFactory) -> None:
    # The right id and question, but a query, not an answer: this query's upstream failed.
    sock, thread = _bad_upstream(lambda q: q)
    try:
        dns, _ = make_proxy(upstream=sock.getsockname(), upstream_timeout=5.0)
        started = time.monotonic()
        reply = ask_udp(dns.port, question(f"www.{ZONE}", txid=0x0102))
        assert time.monotonic() - started < 1.0
        thread.join(5)
        assert not thread.is_alive()
    finally:
        sock.close()
    assert (txid(reply), rcode(reply)) == (0x0102, RCODE.SERVFAIL)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda q: bytes([q[0] ^ 0xFF]) + q[1:2] + b"\x81\x80" + q[4:], id="wrong-id"),
        pytest.param(lambda q: q[:2] + b"\x81\x80" + q[4:12] + b"\x03xyz" + q[12:], id="wrong-q"),
        pytest.param(lambda q: b"\x00\x01\x02", id="short-garbage"),
    ],
)
def test_an_answer_matching_no_query_is_never_passed_on(
    make_proxy: ProxyFactory, answer: Callable[[bytes], bytes]
) -> None:
    # Answers share one upstream socket, matched by id and question: what matches no
    # query waiting is dropped, and the query gets SERVFAIL at the upstream timeout.
    sock, thread = _bad_upstream(answer)
    try:
        dns, seen = make_proxy(upstream=sock.getsockname(), upstream_timeout=0.3)
        reply = ask_udp(dns.port, question(f"www.{ZONE}", txid=0x0102))
        thread.join(5)
        assert not thread.is_alive()
    finally:
        sock.close()
    assert (txid(reply), rcode(reply)) == (0x0102, RCODE.SERVFAIL)
    assert reply[4:6] == b"\x00\x01"  # the question echoed, no answer records
    dns.drain()
    assert seen.names == [f"www.{ZONE}"]
    assert dns.errors == []


# -- malformed queries --------------------------------------------------------------


def _two_questions() -> bytes:
    record = DNSRecord.question(f"www.{ZONE}")
    record.add_question(*DNSRecord.question("github.com").questions)
    record.header.id = 0x2222
    return bytes(record.pack())


MALFORMED = [
    # qdcount 1 but the name runs off the end of the packet.
    pytest.param(
        struct.pack("!6H", 0x1111, 0x0100, 1, 0, 0, 0) + b"\x05abc", 0x1111, id="truncated"
    ),
    pytest.param(_two_questions(), 0x2222, id="qdcount-2"),
    pytest.param(struct.pack("!6H", 0x3333, 0x0100, 0, 0, 0, 0), 0x3333, id="qdcount-0"),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(("packet", "expected_id"), MALFORMED)
def test_malformed_query_gets_formerr_and_is_not_observed(
    upstream: Upstream,
    proxy: tuple[DnsProxy, Seen],
    transport: str,
    packet: bytes,
    expected_id: int,
) -> None:
    dns, seen = proxy
    asked_before = len(upstream.zone.asked)
    reply = ask(transport, dns.port, packet)
    assert len(reply) == 12
    assert (txid(reply), rcode(reply)) == (expected_id, RCODE.FORMERR)
    assert flags(reply) & 0x8000
    dns.drain()
    assert seen.queries == []
    assert len(upstream.zone.asked) == asked_before
    # Still serving.
    _check_www_a(DNSRecord.parse(ask(transport, dns.port, question(f"www.{ZONE}"))))


def test_short_garbage_is_dropped_and_the_proxy_keeps_answering(
    proxy: tuple[DnsProxy, Seen],
) -> None:
    dns, seen = proxy
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SILENCE)
        sock.sendto(b"\x01\x02\x03", ("127.0.0.1", dns.port))
        sock.sendto(b"", ("127.0.0.1", dns.port))
        with pytest.raises(socket.timeout):
            sock.recv(65535)
        sock.settimeout(2)
        sock.sendto(question(f"www.{ZONE}", txid=8), ("127.0.0.1", dns.port))
        assert txid(sock.recv(65535)) == 8
    with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as sock:
        sock.sendall(struct.pack("!H", 3) + b"\x01\x02\x03")
        good = question(f"www.{ZONE}", txid=9)
        sock.sendall(struct.pack("!H", len(good)) + good)
        # The first answer on the connection is the good query's: the garbage got none.
        assert txid(read_framed(sock)) == 9
    dns.drain()
    assert [q.txid for q, _ in seen.queries] == [8, 9]
    assert dns.errors == []


def test_response_packets_are_ignored_and_other_opcodes_get_notimp(
    proxy: tuple[DnsProxy, Seen],
) -> None:
    dns, seen = proxy
    answer = bytearray(question(f"www.{ZONE}", txid=10))
    answer[2] |= 0x80  # QR: someone sent us an answer
    assert_no_udp_answer(dns.port, bytes(answer))
    notify = bytearray(question(f"www.{ZONE}", txid=11))
    notify[2] = (notify[2] & 0x87) | (4 << 3)  # opcode NOTIFY
    reply = ask_udp(dns.port, bytes(notify))
    assert (txid(reply), rcode(reply)) == (11, RCODE.NOTIMP)
    assert (flags(reply) >> 11) & 0xF == 4
    dns.drain()
    assert seen.queries == []


# -- the observer ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["WwW.Example.TEST.", "github.com"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_the_sender_is_asked_for_before_the_reply_and_the_observer_told_by_drain(
    make_proxy: ProxyFactory, transport: str, name: str
) -> None:
    dns, seen = make_proxy()
    judge = dns._judge
    assert isinstance(judge, StubJudge)
    packet = question(name, "AAAA", txid=4242)
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2)
            sock.sendto(packet, ("127.0.0.1", dns.port))
            reply = sock.recv(65535)
            client = sock.getsockname()
    else:
        with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as sock:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            reply = read_framed(sock)
            client = sock.getsockname()
    expected = Query(
        name=name.lower().rstrip("."),
        qtype="AAAA",
        transport=transport,  # type: ignore[arg-type]
        client=("127.0.0.1", client[1]),
        listen_port=dns.port,
        txid=4242,
    )
    # No drain(): whose query it was is known before the client has its answer (it could
    # ask again on the same flow right after); the observation may come later.
    assert judge.senders == [expected]
    dns.drain()
    [(query, decision)] = seen.queries
    assert query == expected
    assert query.received_ns > 0
    if name == "github.com":
        assert rcode(reply) == RCODE.NXDOMAIN
        assert decision.blocked is True
    else:
        _check_www_aaaa(DNSRecord.parse(reply))
        assert decision.blocked is False


def test_unknown_qtype_is_named_like_rfc3597(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, seen = proxy
    packet = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\x03www\x07example\x04test\x00"
    packet += struct.pack("!HH", 65280, 1)
    assert txid(ask_udp(dns.port, packet)) == 7
    dns.drain()
    assert [(q.name, q.qtype) for q, _ in seen.queries] == [(f"www.{ZONE}", "TYPE65280")]


def test_observer_exception_is_recorded_and_the_query_still_answered(
    make_proxy: ProxyFactory,
) -> None:
    calls: list[str] = []

    def exploding(query: Query, decision: Any) -> None:
        calls.append(query.name)
        raise RuntimeError(f"observer exploded on {query.name}")

    dns, _ = make_proxy(observer=exploding)
    dns.raise_errors()  # nothing yet
    _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))
    assert rcode(ask_tcp(dns.port, question("github.com"))) == RCODE.NXDOMAIN
    dns.drain()
    assert calls == [f"www.{ZONE}", "github.com"]
    assert len(dns.errors) == 2
    with pytest.raises(RuntimeError, match=f"observer exploded on www.{ZONE}"):
        dns.raise_errors()


def test_decide_exception_is_recorded_and_answered_servfail(make_proxy: ProxyFactory) -> None:
    def broken(name: str) -> Any:
        raise KeyError(name)

    dns, seen = make_proxy(decide=broken)
    reply = ask_udp(dns.port, question(f"www.{ZONE}", txid=31))
    assert (txid(reply), rcode(reply)) == (31, RCODE.SERVFAIL)
    assert seen.queries == []
    with pytest.raises(KeyError, match="www.example.test"):
        dns.raise_errors()


# -- drain ---------------------------------------------------------------------------


def test_drain_waits_for_queries_of_clients_that_already_exited(make_proxy: ProxyFactory) -> None:
    seen = Seen()

    def slow_observer(query: Query, decision: Any) -> None:
        # Attribution reads /proc and may be slow; drain() has to wait for it.
        time.sleep(0.01)
        seen(query, decision)

    dns, _ = make_proxy(observer=slow_observer)
    sent = []
    for i in range(40):
        name = f"gone{i}.{ZONE}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(question(name, txid=i), ("127.0.0.1", dns.port))
        sent.append(name)
    for i in range(3):
        name = f"gone-tcp{i}.{ZONE}"
        packet = question(name, txid=100 + i)
        with socket.create_connection(("127.0.0.1", dns.port)) as sock:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
        sent.append(name)
    dns.drain()
    assert sorted(seen.names) == sorted(sent)
    assert dns.errors == []


def test_drain_handles_a_query_on_an_open_idle_tcp_connection(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, seen = proxy
    with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as idle:
        with socket.create_connection(("127.0.0.1", dns.port), timeout=2) as busy:
            packet = question(f"www.{ZONE}", txid=55)
            busy.sendall(struct.pack("!H", len(packet)) + packet)
            # A partial frame must not make drain wait for the rest.
            busy.sendall(b"\x00")
            started = time.monotonic()
            dns.drain(timeout=3)
            assert time.monotonic() - started < 2
            assert [q.txid for q, _ in seen.queries] == [55]
            assert txid(read_framed(busy)) == 55
        idle.sendall(struct.pack("!H", len(packet)) + packet)
        assert txid(read_framed(idle)) == 55


def test_drain_times_out_while_a_query_is_still_being_handled(make_proxy: ProxyFactory) -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(query: Query, decision: Any) -> None:
        entered.set()
        release.wait(5)

    dns, _ = make_proxy(observer=stuck)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(question(f"www.{ZONE}", txid=66), ("127.0.0.1", dns.port))
        assert entered.wait(5)
        with pytest.raises(TimeoutError, match="1 UDP queries"):
            dns.drain(timeout=0.2)
        release.set()
        dns.drain()
        assert txid(sock.recv(65535)) == 66


def test_drain_never_waits_for_a_silent_upstream(make_proxy: ProxyFactory) -> None:
    # Issue 10: 20 queries held by a silent upstream used to fill the pool, so the
    # blocked github.com behind them was never observed and drain() timed out.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dns, seen = make_proxy(upstream=silent.getsockname(), upstream_timeout=0.5)
        sent = [f"n{i}.{ZONE}" for i in range(20)] + ["github.com"]
        for i, name in enumerate(sent):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(question(name, txid=i), ("127.0.0.1", dns.port))
        tcp_packet = question(f"tcp.{ZONE}", txid=99)
        with socket.create_connection(("127.0.0.1", dns.port)) as sock:
            sock.sendall(struct.pack("!H", len(tcp_packet)) + tcp_packet)
            started = time.monotonic()
            dns.drain(timeout=2)
            assert time.monotonic() - started < 0.4
        # Every query observed once, by drain() when its answer was still due...
        assert sorted(seen.names) == sorted([*sent, f"tcp.{ZONE}"])
        assert [d.blocked for q, d in seen.queries if q.name == "github.com"] == [True]
        # ...and not again when the upstream timed out.
        time.sleep(1.2)
        assert sorted(seen.names) == sorted([*sent, f"tcp.{ZONE}"])
        assert dns.errors == []


# -- IPv6, binding, lifecycle -----------------------------------------------------------


def test_ipv6_listeners_share_the_port(upstream: Upstream, proxy: tuple[DnsProxy, Seen]) -> None:
    dns, seen = proxy
    if not dns.has_ipv6:
        pytest.skip("IPv6 loopback (::1) is not available here")
    packet = question(f"www.{ZONE}", "AAAA", txid=0x6666)
    for transport in ("udp", "tcp"):
        assert ask(transport, dns.port, packet, host="::1") == ask(transport, upstream.port, packet)
    assert rcode(ask_udp(dns.port, question("github.com"), host="::1")) == RCODE.NXDOMAIN
    dns.drain()
    assert [(q.client[0], q.transport, q.listen_port) for q, _ in seen.queries] == [
        ("::1", "udp", dns.port),
        ("::1", "tcp", dns.port),
        ("::1", "udp", dns.port),
    ]


def _listening(port: int) -> set[tuple[str, str]]:
    """(protocol, local address) of every socket bound to ``port``, from /proc/net."""
    found = set()
    for proto in ("udp", "tcp", "udp6", "tcp6"):
        try:
            with open(f"/proc/net/{proto}") as table:
                rows = table.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            hex_addr, hex_port = local.split(":")
            if int(hex_port, 16) != port or (proto.startswith("tcp") and state != "0A"):
                continue
            raw = bytes.fromhex(hex_addr)
            # /proc/net prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
            found.add((proto.rstrip("6"), socket.inet_ntop(family, raw)))
    return found


def test_binds_loopback_only_on_one_port(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, _ = proxy
    expected = {("udp", "127.0.0.1"), ("tcp", "127.0.0.1")}
    if dns.has_ipv6:
        expected |= {("udp", "::1"), ("tcp", "::1")}
    assert _listening(dns.port) == expected


def test_host6_none_means_ipv4_only(make_proxy: ProxyFactory) -> None:
    dns, _ = make_proxy(host6=None)
    assert dns.has_ipv6 is False
    assert _listening(dns.port) == {("udp", "127.0.0.1"), ("tcp", "127.0.0.1")}
    _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))


def _dns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("depfence-dns")]


def _proxy_threads() -> list[threading.Thread]:
    """The threads of proxies: all but the loop that serves every proxy of the process."""
    return [t for t in _dns_threads() if t.name != "depfence-dns-loop"]


def test_one_loop_thread_serves_every_proxy_and_stays_for_the_next(upstream: Upstream) -> None:
    with stub_proxy(upstream) as first, stub_proxy(upstream) as second:
        loops = [t for t in _dns_threads() if t.name == "depfence-dns-loop"]
        assert len(loops) == 1
        for dns in (first, second):
            _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))
        port = first.port
    assert _listening(port) == set()
    with stub_proxy(upstream) as third:
        _check_www_a(DNSRecord.parse(ask_udp(third.port, question(f"www.{ZONE}"))))
        assert [t for t in _dns_threads() if t.name == "depfence-dns-loop"] == loops
    assert loops[0].is_alive()


def test_the_loop_spins_after_a_query_and_then_sleeps(upstream: Upstream) -> None:
    # The loop polls on without sleeping for loop.SPIN (100 µs) after a round with events;
    # a spin that never ended would burn this window's CPU in full.
    from pytest_depfence.dnsproxy.loop import SPIN

    window = 0.5
    with stub_proxy(upstream) as dns:
        _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))
        (loop,) = [t for t in _dns_threads() if t.name == "depfence-dns-loop"]
        assert loop.ident is not None
        clock = time.pthread_getcpuclockid(loop.ident)
        before = time.clock_gettime(clock)
        time.sleep(window)  # the window observed, not a wait for anything
        used = time.clock_gettime(clock) - before
    assert SPIN < 0.001
    assert used < window / 10, f"the loop used {used:.3f} s of CPU in {window} s without a query"


def test_the_loop_records_a_handlers_error_with_its_proxy_and_serves_on() -> None:
    # Two stand-ins for proxies (loop.Served) on the process's loop, each a socketpair:
    # the first one's handler raises, the second one's still runs, then neither does.
    from pytest_depfence.dnsproxy.loop import LOOP

    class Stub:
        def __init__(self, fails: bool) -> None:
            self.fails, self.errors, self.read = fails, [], threading.Event()
            self.ends = socket.socketpair()
            self.ends[0].setblocking(False)

        def handle(self) -> None:
            self.ends[0].recv(64)
            self.read.set()
            if self.fails:
                raise ValueError("injected")

        def _record(self, exc: BaseException) -> None:
            self.errors.append(exc)

        def _next_timeout(self, now: float) -> float | None:
            return None

        def _expire(self, now: float) -> None:
            pass

    failing, working = Stub(True), Stub(False)
    try:
        for stub in (failing, working):
            LOOP.add(stub, {stub.ends[0].fileno(): stub.handle})
        failing.ends[1].send(b"x")
        assert failing.read.wait(10)  # a bound, not a timing
        working.ends[1].send(b"x")
        assert working.read.wait(10)
        assert [str(e) for e in failing.errors] == ["injected"] and working.errors == []
    finally:
        for stub in (failing, working):
            LOOP.remove(stub)
            for end in stub.ends:
                end.close()
    assert all(owner not in (failing, working) for owner, _ in LOOP._handlers.values())


def test_a_start_that_fails_leaves_nothing_open(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_depfence.dnsproxy import proxy as proxy_module

    class Refusing:
        def add(self, *args: object) -> None:
            raise OSError("injected: the loop takes no more")

        def remove(self, *args: object) -> None:
            pass

    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(proxy_module, "LOOP", Refusing())
    dns = stub_proxy(upstream)
    with pytest.raises(OSError, match="injected"):
        dns.start()
    assert dns.port and _listening(dns.port) == set()
    assert set(os.listdir("/proc/self/fd")) == fds
    assert _proxy_threads() == []


# The fork is the point (a child of a threaded process); the child runs only this
# module's code, then os._exit.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_a_proxy_runs_serves_its_own(upstream: Upstream) -> None:
    # The child has no loop thread (only the forking thread is copied): its first proxy
    # must start one, not wait on the parent's, whose lock it may even have copied held.
    with stub_proxy(upstream) as dns:
        _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                with stub_proxy(upstream) as own:
                    reply = DNSRecord.parse(ask_udp(own.port, question(f"www.{ZONE}")))
                    status = 0 if reply.header.rcode == RCODE.NOERROR and reply.rr else 2
            finally:
                os._exit(status)
        deadline = time.monotonic() + 30  # a bound for a child that hangs, not a timing
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
        _check_www_a(DNSRecord.parse(ask_udp(dns.port, question(f"www.{ZONE}"))))


def test_stop_closes_everything_and_is_idempotent(upstream: Upstream) -> None:
    assert _proxy_threads() == []
    dns = stub_proxy(upstream)
    dns.stop()  # before start: nothing to do
    dns = stub_proxy(upstream)
    with dns:
        port = dns.port
        ask_udp(port, question(f"www.{ZONE}"))  # starts pool threads
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        packet = question(f"www.{ZONE}")
        client.sendall(struct.pack("!H", len(packet)) + packet)
        read_framed(client)
        assert _proxy_threads() != []
    try:
        # The idle client connection was closed by stop().
        assert client.recv(1) == b""
    finally:
        client.close()
    dns.stop()
    assert _proxy_threads() == []
    assert _listening(port) == set()
    dns.drain()  # after stop: returns at once


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_stop_never_waits_for_a_silent_upstream(upstream: Upstream, transport: str) -> None:
    # An upstream that holds a query for an hour: stop() cuts it short (the proxy
    # stops with its fence; the upstream's fate is no part of teardown).
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as silent:
        silent.bind(("127.0.0.1", 0))
        if transport == "tcp":
            silent.listen(8)
        dns = stub_proxy(upstream, upstream=silent.getsockname(), upstream_timeout=3600.0)
        dns.start()
        client = socket.socket(socket.AF_INET, kind)
        held: socket.socket | None = None
        try:
            packet = question(f"www.{ZONE}", txid=7)
            if transport == "udp":
                client.sendto(packet, ("127.0.0.1", dns.port))
                silent.recvfrom(65535)  # the query reached the upstream, which says nothing
            else:
                client.connect(("127.0.0.1", dns.port))
                client.sendall(struct.pack("!H", len(packet)) + packet)
                held, _ = silent.accept()
                held.recv(65535)
            stopper = threading.Thread(target=dns.stop)
            stopper.start()
            stopper.join(30)  # a bound far below the upstream's hour, not a timing
            assert not stopper.is_alive()
            assert _proxy_threads() == []
        finally:
            client.close()
            if held is not None:
                held.close()


def test_start_twice_is_an_error(proxy: tuple[DnsProxy, Seen]) -> None:
    dns, _ = proxy
    with pytest.raises(RuntimeError, match="twice"):
        dns.start()
