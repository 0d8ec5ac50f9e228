"""Issue 10, item 5: what the fence could not judge never reaches a client, and an
upstream that never answers neither loses a violation nor holds up the run's end.

Each test starts its own tiny upstream on 127.0.0.1 inside the lab (a UDP socket
that answers with hand-built bytes, or never answers) and hands it to the fence
as its upstream; the clients are real (dig, getent) and ask the lab resolver's
address, which the fence redirects to its proxy.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from dnslib import QTYPE, DNSRecord
from helpers_net import DIG

from pytest_depfence import Fence, Policy
from pytest_depfence.cgroup import CgroupTree
from pytest_depfence.judge import UNJUDGED

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
_missing = [t for t in ("dig", "getent") if not shutil.which(t)]
if _missing:
    pytest.skip(
        f"these tests need {', '.join(_missing)} (apt-get install dnsutils libc-bin)",
        allow_module_level=True,
    )

FAKE_GITHUB = bytes([10, 77, 1, 1])


def _rr(rtype: int, rdata: bytes) -> bytes:
    return b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata


def cname_then_bad_a(query: bytes) -> bytes:
    """CNAME into github.com, an A record whose rdata is 6 bytes, then a good A:
    dnslib gives up on the whole answer (a bad last record it would tolerate)."""
    head = bytes(DNSRecord.parse(query).reply().pack())
    target = b"\x06github\x03com\x00"
    return (
        head[:6]
        + struct.pack("!H", 3)
        + head[8:]
        + _rr(QTYPE.CNAME, target)
        + _rr(QTYPE.A, FAKE_GITHUB + b"\0\0")
        + _rr(QTYPE.A, FAKE_GITHUB)
    )


def garbage(query: bytes) -> bytes:
    """The query's id, a response header claiming one question, then noise."""
    return query[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0) + b"\x3f" + b"x" * 5


class FakeUpstream:
    """A UDP DNS server on 127.0.0.1 answering every query with `answer(query)`
    (None: never answering)."""

    def __init__(self, answer: Callable[[bytes], bytes] | None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.answer = answer
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.asked += 1
            if self.answer is not None:
                self.sock.sendto(self.answer(data), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake_upstream(lab: Lab, clean_env: None) -> Iterator[Callable[..., FakeUpstream]]:
    made: list[FakeUpstream] = []

    def make(answer: Callable[[bytes], bytes] | None) -> FakeUpstream:
        made.append(FakeUpstream(answer))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def open_fence(pytestconfig: pytest.Config, policy: Policy, upstream: str) -> Fence:
    from helpers_net import skip_or_fail

    from pytest_depfence.errors import FenceUnavailable

    try:
        return Fence(policy, upstream=upstream, label="unjudged").open()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)


def test_a_bad_record_cannot_hide_a_cname_into_github(
    fake_upstream: Callable[..., FakeUpstream], pytestconfig: pytest.Config
) -> None:
    upstream = fake_upstream(cname_then_bad_a)
    with open_fence(pytestconfig, Policy.no_egress("github.com"), upstream.address) as fence:
        dig = fence.run([*DIG, "downloads.mirror.internal"], check=False)
        getent = fence.run(["getent", "ahostsv4", "downloads.mirror.internal"], check=False)
    assert "status: NXDOMAIN" in dig.stdout, dig.stdout
    assert "10.77.1.1" not in dig.stdout
    assert getent.returncode != 0 and "10.77.1.1" not in getent.stdout
    for result in (dig, getent):
        assert result.violations, result.events
        for event in result.violations:
            assert event.domain == "downloads.mirror.internal"
            assert event.rule is not None and event.rule.endswith("via CNAME github.com")


def test_an_answer_nobody_can_read_is_servfail_and_on_record(
    fake_upstream: Callable[..., FakeUpstream], pytestconfig: pytest.Config
) -> None:
    upstream = fake_upstream(garbage)
    with open_fence(pytestconfig, Policy.no_egress("github.com"), upstream.address) as fence:
        result = fence.run([*DIG, "downloads.mirror.internal"], check=False)
    assert "status: SERVFAIL" in result.stdout, result.stdout
    [event] = [e for e in result.events if e.domain == "downloads.mirror.internal"]
    assert (event.verdict, event.blocked_at, event.outage, event.rule) == (
        "blocked",
        "dns",
        "servfail",
        UNJUDGED,
    )
    assert result.violations == []  # no_egress: visible, not a violation (see Judge.answer)


BURST = "for i in $(seq 20); do getent hosts n$i.example & done; getent hosts github.com; wait"


def test_a_silent_upstream_loses_no_violation_and_holds_up_nothing(
    fake_upstream: Callable[..., FakeUpstream], pytestconfig: pytest.Config
) -> None:
    upstream = fake_upstream(None)
    timeout = 3.0
    with open_fence(pytestconfig, Policy.no_egress("github.com"), upstream.address) as fence:
        started = time.monotonic()
        result = fence.run(BURST, timeout=timeout, check=False)
        elapsed = time.monotonic() - started
    assert elapsed < timeout + 2, f"run() took {elapsed:.1f}s"
    assert [e.domain for e in result.violations if e.domain == "github.com"], result.events
    assert upstream.asked > 0
    session = CgroupTree().session
    left = [p for p in session.iterdir() if p.is_dir()] if session.exists() else []
    assert left == []
