"""A closed fence's DNS proxy serves the next fence in its network namespace (`parking`).

The next fence judges by its own policy and names its own processes on it, the one
that parked it sees nothing more, and what reached the port while nobody served it
is thrown away, not taken for the next fence's. A proxy that recorded an error is
stopped, never parked, and so is the proxy of a fence that adopted a service (a socket
the service connected during a run stays connected to its port); a lab that closes
takes its parked proxy with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from typing import TYPE_CHECKING

import pytest
from dnslib import DNSRecord
from helpers_net import AllowAll

from pytest_depfence import Fence, Policy
from pytest_depfence.cgroup import cgroup2_mount
from pytest_depfence.dnsproxy import DnsProxy, parking
from pytest_depfence.lab import Lab

if TYPE_CHECKING:
    from pytest_depfence import FenceResult

if os.geteuid() != 0:
    pytest.skip("fences need root (cgroups, eBPF)", allow_module_level=True)
if shutil.which("dig") is None:
    pytest.skip("these tests need dig (apt-get install dnsutils)", allow_module_level=True)

DIG = ["dig", "+time=2", "+tries=1", "+short"]


def dns_events(result: FenceResult) -> list[tuple[str | None, str | None]]:
    return [(e.domain, e.cmdline) for e in result.events if e.protocol in ("dns", "udp", "tcp")]


def query(name: str) -> bytes:
    return DNSRecord.question(name).pack()


def test_the_next_fence_judges_its_own_queries_on_the_parked_proxy(lab: Lab) -> None:
    with Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as first:
        blocked = first.run([*DIG, "github.com"], check=False)
        assert blocked.domains == ["github.com"]
        port = first._proxy.port if first._proxy is not None else None
        proxy = first._proxy
    runs_of_first = len(first.results)
    with Fence(Policy.no_egress("pypi.internal"), upstream=lab.upstream) as second:
        assert second._proxy is proxy and second._proxy is not None
        assert second._proxy.port == port
        allowed = second.run([*DIG, "github.com"])
        assert allowed.stdout.split() == [lab.address("github.com")]
        assert allowed.violations == []
        refused = second.run([*DIG, "pypi.internal"], check=False)
        assert refused.domains == ["pypi.internal"]
        (event,) = refused.violations
        assert event.cmdline is not None and "pypi.internal" in event.cmdline
    assert len(first.results) == runs_of_first
    assert first.results[-1].events == blocked.events


def test_what_reached_the_parked_proxy_is_thrown_away(lab: Lab) -> None:
    with Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as first:
        first.run(["true"])
        assert first._proxy is not None
        port = first._proxy.port
    # Nobody serves the port now: an unfenced process's query waits there, unread.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(query("stray-udp.github.com"), ("127.0.0.1", port))
    tcp = socket.create_connection(("127.0.0.1", port))
    try:
        message = query("stray-tcp.github.com")
        tcp.sendall(struct.pack("!H", len(message)) + message)
        with Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as second:
            assert second._proxy is not None and second._proxy.port == port
            result = second.run([*DIG, "pypi.internal"])
        names = [domain for domain, _ in dns_events(result)]
        assert names == ["pypi.internal"], result.events
        assert not any("stray" in (e.domain or "") for r in second.results for e in r.events)
    finally:
        tcp.close()


def test_a_proxy_that_recorded_an_error_is_stopped_not_parked(lab: Lab) -> None:
    host, port = lab.upstream.rsplit(":", 1)
    parking.release()
    proxy = parking.take((host, int(port)), AllowAll())
    proxy.errors.append(RuntimeError("a handler failed (stand-in)"))
    parking.park(proxy)
    assert proxy._stopped
    fresh = parking.take((host, int(port)), AllowAll())
    try:
        assert fresh is not proxy
    finally:
        fresh.stop()


def test_another_upstream_gets_a_proxy_of_its_own(lab: Lab) -> None:
    host, port = lab.upstream.rsplit(":", 1)
    parking.release()
    proxy = parking.take((host, int(port)), AllowAll())
    parking.park(proxy)
    other = parking.take((host, Lab.ALT_PORT), AllowAll())
    try:
        assert other is not proxy and other.port != proxy.port
    finally:
        other.stop()
        parking.release()
    assert proxy._stopped


def test_a_closing_lab_stops_the_proxy_parked_in_it() -> None:
    with Lab() as lab:
        with Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as fence:
            fence.run(["true"])
            proxy = fence._proxy
        assert isinstance(proxy, DnsProxy) and not proxy._stopped  # parked
    assert proxy._stopped


def test_a_parked_proxy_that_cannot_serve_again_gives_way_to_a_new_one(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = lab.upstream.rsplit(":", 1)
    parking.release()
    proxy = parking.take((host, int(port)), AllowAll())
    parking.park(proxy)

    def failing_resume(judge: object) -> DnsProxy:  # stands in for a resume that fails
        raise OSError("cannot serve again (stand-in)")

    monkeypatch.setattr(proxy, "resume", failing_resume)
    fresh = parking.take((host, int(port)), AllowAll())
    try:
        assert fresh is not proxy and not fresh._stopped
        assert proxy._stopped
    finally:
        fresh.stop()


def test_the_proxy_of_a_fence_that_adopted_a_service_is_not_parked(lab: Lab) -> None:
    service = cgroup2_mount() / f"depfence-test-parking-{os.getpid()}"
    service.mkdir()
    try:
        parking.release()
        adopting = Fence(
            Policy.no_egress("github.com"), upstream=lab.upstream, services=[str(service)]
        )
        with adopting:
            adopting.run(["true"])
            proxy = adopting._proxy
        assert proxy is not None and proxy._stopped
        with Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as later:
            assert later._proxy is not proxy
    finally:
        service.rmdir()
