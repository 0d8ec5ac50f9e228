"""`addresses.resolve` (a fence's blocked names, resolved when it opens) asks the upstream
once per TTL in a process, not once per fence.

The upstream is a real dnslib server on a loopback high port (no root needed);
the clock is `addresses`' own `time.monotonic`, moved forward by the test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from pytest_depfence import addresses


class Counting(BaseResolver):  # type: ignore[misc]
    """blocked.test has an address (TTL 60); gone.test does not exist; asks are counted."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        with self.lock:
            self.asked.append(f"{request.q.qname} {QTYPE[request.q.qtype]}")
        reply = request.reply()
        if str(request.q.qname) == "blocked.test." and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
        elif str(request.q.qname) == "gone.test.":
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@pytest.fixture
def upstream() -> Iterator[tuple[Counting, tuple[str, int]]]:
    zone = Counting()
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger("-request,-reply"))
    server.start_thread()
    addresses._resolved.clear()
    try:
        yield zone, ("127.0.0.1", server.server.server_address[1])
    finally:
        server.stop()
        addresses._resolved.clear()


def test_an_answer_is_reused_until_its_ttl_runs_out(upstream, monkeypatch) -> None:
    zone, server = upstream
    now = [1000.0]
    monkeypatch.setattr(addresses.time, "monotonic", lambda: now[0])

    first = addresses.resolve("blocked.test", server)
    again = addresses.resolve("blocked.test", server)
    now[0] += 61
    later = addresses.resolve("blocked.test", server)

    assert [str(a) for a in first.addresses] == ["192.0.2.7"]
    assert again == first == later
    assert zone.asked == ["blocked.test. A", "blocked.test. AAAA"] * 2  # not for `again`


def test_an_answer_without_a_ttl_is_asked_again(upstream) -> None:
    zone, server = upstream

    for _ in range(2):
        assert addresses.resolve("gone.test", server).addresses == ()

    assert zone.asked == ["gone.test. A", "gone.test. AAAA"] * 2
