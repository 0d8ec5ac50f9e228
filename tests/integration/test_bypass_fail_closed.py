"""DNS sent past the proxy is judged in the kernel, or dropped and reported: never let
through unjudged (bpf/bypass.c; issue 10, item 4).

Real packets from a fenced Python client (and dig) to the lab resolver's second port,
10.77.0.53:5300 / [fd77::53]:5300, which is never redirected to the proxy. Each case
is checked twice: the kernel's report (the run's events) and what reached the client
(no answer for a dropped query: a dropped datagram fails its sendto() with EPERM, a
dropped TCP segment is retransmitted until the client gives up).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_depfence.judge import OWNERLESS, UNJUDGED_QUERY
from pytest_depfence.kernel import abi

if TYPE_CHECKING:
    from pytest_depfence import EgressEvent, Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("the fence tests need root", allow_module_level=True)

V4, V6, PORT = "10.77.0.53", "fd77::53", 5300
NO_GITHUB = pytest.mark.no_egress("github.com")
#: The resolver's address allowed too: else egress_only refuses the connection itself.
ONLY_MIRROR = pytest.mark.egress_only("mirror.internal", V4)

# Sends each hex chunk as its own send() (UDP: datagrams; TCP: segments, TCP_NODELAY and a
# pause between; "gso": all in one send, cut by the kernel into datagrams the size of the
# first: UDP_SEGMENT), then waits for an answer; prints JSON {"answered": bool, "error": str}.
CLIENT = """\
import json, select, socket, sys, time
family, transport, host, port, *chunks = sys.argv[1:]
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
sock = socket.socket(fam, kind)
if transport == "gso":
    sock.setsockopt(socket.SOL_UDP, 103, len(bytes.fromhex(chunks[0])))  # UDP_SEGMENT
    chunks = ["".join(chunks)]
if family == "6dst":  # a destination-options header before UDP (needs CAP_NET_RAW)
    sock.close()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
error = ""
try:
    sock.connect((host, int(port)))
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for chunk in chunks:
        sock.send(bytes.fromhex(chunk))
        time.sleep(0.2)
    answered = bool(select.select([sock], [], [], 1.5)[0]) and bool(sock.recv(4096))
except OSError as exc:
    answered, error = False, type(exc).__name__
print(json.dumps({"answered": answered, "error": error}))
"""


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def question(name: str | bytes, qtype: int = 1) -> bytes:
    raw = wire(name) if isinstance(name, str) else name
    return raw + struct.pack("!HH", qtype, 1)


def query(*questions: bytes, txid: int = 0x4242) -> bytes:
    return struct.pack("!HHHHHH", txid, 0x0100, len(questions), 0, 0, 0) + b"".join(questions)


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def send(
    fenced: Fence, tmp_path: Path, chunks: list[bytes], *, transport: str = "udp", family: str = "4"
) -> tuple[FenceResult, dict[str, Any]]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    host = V4 if family == "4" else V6
    argv = [sys.executable, str(script), family, transport, host, str(PORT)]
    result = fenced.run([*argv, *(c.hex() for c in chunks)], check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    return result, json.loads(result.stdout.splitlines()[-1])


def gso_datagrams(first: bytes, last: bytes) -> list[bytes]:
    """Two messages as the datagrams of one UDP GSO send: every one but the last is the
    segment size (the first's, padded with zeros to fit the last)."""
    return [first + bytes(max(0, len(last) - len(first))), last]


def bypasses(result: FenceResult) -> list[EgressEvent]:
    return [e for e in result.events if e.address in (V4, V6) and e.qtype is not None]


def assert_dropped(result: FenceResult, got: dict[str, Any], rule_part: str) -> EgressEvent:
    assert not got["answered"], f"an answer reached the client; events: {result.events}"
    events = bypasses(result)
    assert events, f"the kernel reported nothing; events: {result.events}"
    for event in events:
        assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "packet", "dropped")
        assert event.forbidden and event.port == PORT
        assert event.rule is not None and rule_part in event.rule, event.rule
        assert event.pid is not None
    return events[0]


def unjudged(reason: abi.Unjudged) -> str:
    return UNJUDGED_QUERY.format(reason=abi.UNJUDGED_TEXTS[reason])


LONG_ALLOWED = ".".join(["a" * 49] * 4) + ".mirror.internal"  # wire form: 217 bytes
LONG_BLOCKED = ".".join(["a" * 49] * 4) + ".github.com"
MANY_ALLOWED = "x." * 40 + "mirror.internal"  # 42 labels
MANY_BLOCKED = "x." * 40 + "github.com"
POLICIES = pytest.mark.parametrize(
    "policy",
    [
        pytest.param("no_egress", marks=NO_GITHUB),
        pytest.param("egress_only", marks=ONLY_MIRROR),
    ],
)


# --------------------------------------------------------------------------- every question


@NO_GITHUB
def test_a_second_question_for_a_blocked_name_is_judged(fenced: Fence, tmp_path: Path) -> None:
    message = query(question("mirror.internal"), question("api.GitHub.com"))
    result, got = send(fenced, tmp_path, [message])
    event = assert_dropped(result, got, 'no_egress("github.com")')
    assert event.domain == "api.github.com"


@pytest.mark.parametrize(
    "family",
    [
        pytest.param("4", marks=NO_GITHUB, id="4-no_egress"),
        pytest.param("6", marks=NO_GITHUB, id="6-no_egress"),
        pytest.param("4", marks=ONLY_MIRROR, id="4-egress_only"),
    ],
)
def test_queries_sent_as_one_udp_gso_packet_are_dropped(
    fenced: Fence, tmp_path: Path, family: str
) -> None:
    """The kernel cuts a GSO packet into its datagrams after the fence's program: an
    allowed query first (padded to the datagram size), a forbidden one after it."""
    chunks = gso_datagrams(
        query(question("mirror.internal"), txid=1), query(question("api.github.com"), txid=2)
    )
    result, got = send(fenced, tmp_path, chunks, transport="gso", family=family)
    assert got["error"] == "PermissionError"
    assert_dropped(result, got, unjudged(abi.Unjudged.GSO))


@NO_GITHUB
def test_each_query_of_a_udp_gso_packet_to_the_proxy_is_named(
    fenced: Fence, tmp_path: Path
) -> None:
    """Sent to port 53 (redirected to the proxy), each datagram is a query the proxy
    judges; each names its sender, as any query does."""
    chunks = gso_datagrams(
        query(question("mirror.internal"), txid=1), query(question("api.github.com"), txid=2)
    )
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    argv = [sys.executable, str(script), "4", "gso", V4, "53", *(c.hex() for c in chunks)]
    result = fenced.run(argv, check=False, timeout=30)
    asked = {e.domain: e for e in result.events if e.blocked_at in ("dns", None) and e.domain}
    assert set(asked) >= {"mirror.internal", "api.github.com"}, result.events
    assert {asked[name].pid for name in ("mirror.internal", "api.github.com")} == {
        asked["mirror.internal"].pid
    }
    assert asked["api.github.com"].pid is not None and not asked["api.github.com"].unattributed


@NO_GITHUB
def test_more_questions_than_judged_is_dropped(fenced: Fence, tmp_path: Path) -> None:
    names = [f"q{i}.mirror.internal" for i in range(abi.DNS_QUESTIONS_MAX + 1)]
    result, got = send(fenced, tmp_path, [query(*(question(n) for n in names))])
    assert_dropped(result, got, unjudged(abi.Unjudged.TOO_MANY_QUESTIONS))


# Makes FILL sockets, each connected (so recorded as a socket's owner) and closed, then
# connects a UDP socket to the resolver's second port, makes COUNT more, then sends the
# query on that one; prints JSON {"pid", "answered", "error"}.
EVICTING_CLIENT = """\
import json, os, select, socket, sys
host, message = sys.argv[1], sys.argv[5]
port, fill, count = (int(a) for a in sys.argv[2:5])

def connect_and_close(n):
    for _ in range(n):
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.connect(("10.77.3.1", 9))
        other.close()

connect_and_close(fill)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, port))
connect_and_close(count)
error = ""
try:
    sock.send(bytes.fromhex(message))
    answered = bool(select.select([sock], [], [], 1.5)[0]) and bool(sock.recv(4096))
except OSError as exc:
    answered, error = False, type(exc).__name__
print(json.dumps({"pid": os.getpid(), "answered": answered, "error": error}))
"""


@NO_GITHUB
def test_a_socket_whose_owner_the_kernel_map_evicted_is_still_judged(
    fenced: Fence, tmp_path: Path
) -> None:
    # The socket-owner map (`sockets`) keeps a run's owners to its end; once it is full,
    # they spill into an LRU (`sockets_spill`), where more sockets than it holds evict the
    # first one's owner. Its DNS to a resolver past the proxy must be judged all the same.
    from pytest_depfence import kernel
    from pytest_depfence.kernel.toolkit import table_max_entries

    programs = kernel.load()
    fill = table_max_entries(programs.table("sockets"))
    count = table_max_entries(programs.table("sockets_spill")) + 8192
    script = tmp_path / "evict.py"
    script.write_text(EVICTING_CLIENT)
    message = query(question("github.com")).hex()
    argv = [sys.executable, str(script), V4, str(PORT), str(fill), str(count), message]
    result = fenced.run(argv, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])

    assert not got["answered"], f"an answer reached the client; events: {result.events}"
    dropped = [e for e in bypasses(result) if e.verdict == "blocked"]
    assert [(e.domain, e.blocked_at, e.port) for e in dropped] == [
        ("github.com", "packet", PORT)
    ], result.events
    # Named where the kernel names a datagram's sender (6.10+), else said to be unknown.
    assert (dropped[0].pid, dropped[0].unattributed) in ((got["pid"], None), (None, OWNERLESS))


# --------------------------------------------------------------------------- unjudgeable names


@pytest.mark.parametrize(
    ("qname", "reason"),
    [
        (b"\x03api\xc0\x0c", abi.Unjudged.POINTER),
        (wire(LONG_BLOCKED), abi.Unjudged.TOO_LONG),
        (wire(LONG_ALLOWED), abi.Unjudged.TOO_LONG),
        (wire(MANY_BLOCKED), abi.Unjudged.TOO_MANY_LABELS),
        (wire(MANY_ALLOWED), abi.Unjudged.TOO_MANY_LABELS),
        (wire("github.com")[:-3], abi.Unjudged.TRUNCATED),
    ],
    ids=["pointer", "long-blocked", "long-allowed", "labels-blocked", "labels-allowed", "cut"],
)
@POLICIES
def test_a_question_the_fence_cannot_judge_is_dropped(
    fenced: Fence, tmp_path: Path, qname: bytes, reason: abi.Unjudged, policy: str
) -> None:
    message = query(question(qname)) if reason != abi.Unjudged.TRUNCATED else query(qname)
    result, got = send(fenced, tmp_path, [message])
    assert_dropped(result, got, unjudged(reason))


# --------------------------------------------------------------------------- TCP


@NO_GITHUB
def test_tcp_length_prefix_sent_alone_is_never_passed_unjudged(
    fenced: Fence, tmp_path: Path
) -> None:
    message = query(question("github.com"))
    result, got = send(fenced, tmp_path, [framed(message)[:2], message], transport="tcp")
    assert not got["answered"]
    rules = {e.rule for e in bypasses(result)}
    assert rules, f"the kernel reported nothing; events: {result.events}"
    # Dropped as split, or judged when a retransmission joined prefix and message.
    for rule in rules:
        assert rule is not None
        assert rule == unjudged(abi.Unjudged.SPLIT) or rule.startswith('no_egress("github.com")')


@NO_GITHUB
def test_second_pipelined_tcp_query_is_judged(fenced: Fence, tmp_path: Path) -> None:
    segment = framed(query(question("mirror.internal"), txid=1)) + framed(
        query(question("github.com"), txid=2)
    )
    result, got = send(fenced, tmp_path, [segment], transport="tcp")
    event = assert_dropped(result, got, 'no_egress("github.com")')
    assert (event.domain, event.protocol) == ("github.com", "tcp")


@NO_GITHUB
@pytest.mark.parametrize(
    ("before", "junk"),
    [(1, "notify"), (3, "notify"), (abi.DNS_QUESTIONS_MAX, "notify"), (1, "short"), (3, "short")],
)
def test_a_tcp_query_after_messages_that_are_no_queries_is_judged(
    fenced: Fence, tmp_path: Path, before: int, junk: str
) -> None:
    """Whole messages that are not queries (NOTIFY: opcode 4; or shorter than a DNS
    header, which a lenient resolver skips) first in a segment do not make the segment
    something other than DNS; past as many as are looked at, what follows cannot be
    judged, and is dropped."""
    notify = struct.pack("!HHHHHH", 7, 0x2000, 1, 0, 0, 0) + question("mirror.internal")
    message = notify if junk == "notify" else bytes(5)
    segment = framed(message) * before + framed(query(question("github.com"), txid=2))
    result, got = send(fenced, tmp_path, [segment], transport="tcp")
    if before < abi.DNS_QUESTIONS_MAX:
        event = assert_dropped(result, got, 'no_egress("github.com")')
        assert (event.domain, event.protocol) == ("github.com", "tcp")
    else:
        assert_dropped(result, got, unjudged(abi.Unjudged.TOO_MANY_QUESTIONS))


@NO_GITHUB
def test_dig_over_tcp_still_works_for_an_allowed_name(fenced: Fence) -> None:
    argv = ["dig", f"@{V4}", "-p", str(PORT), "+time=1", "+tries=1", "+tcp", "mirror.internal"]
    result = fenced.run(argv, timeout=30)
    assert "10.77.3.1" in result.stdout
    assert not result.violations


# --------------------------------------------------------------------------- IPv6, audit, allowed


@NO_GITHUB
@pytest.mark.fence(raw_sockets=True)  # IPV6_DSTOPTS needs CAP_NET_RAW
def test_ipv6_destination_options_before_udp_are_walked(fenced: Fence, tmp_path: Path) -> None:
    result, got = send(fenced, tmp_path, [query(question("github.com"))], family="6dst")
    event = assert_dropped(result, got, 'no_egress("github.com")')
    assert (event.domain, event.address) == ("github.com", V6)

    allowed, got = send(fenced, tmp_path, [query(question("mirror.internal"))], family="6dst")
    assert got["answered"], allowed.events
    assert not bypasses(allowed)


@NO_GITHUB
@pytest.mark.fence(mode="audit")
def test_audit_mode_reports_an_unjudged_query_and_lets_it_go(fenced: Fence, tmp_path: Path) -> None:
    result, got = send(fenced, tmp_path, [query(question(b"\x03api\xc0\x0c"))])
    assert got["error"] == "", got  # sent: nothing dropped it
    events = bypasses(result)
    assert [(e.verdict, e.outage, e.rule) for e in events] == [
        ("allowed", None, unjudged(abi.Unjudged.POINTER))
    ]
    assert events[0].domain == "api"


@POLICIES
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_ordinary_allowed_query_past_the_proxy_passes(
    fenced: Fence, tmp_path: Path, policy: str, transport: str
) -> None:
    message = query(question("mirror.internal"))
    chunks = [framed(message) if transport == "tcp" else message]
    result, got = send(fenced, tmp_path, chunks, transport=transport)
    assert got["answered"], result.events
    assert not bypasses(result)


# argv: port, bytes. Sends that many random bytes over one TCP connection to 127.0.0.1.
BULK = """\
import os, socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    s.sendall(os.urandom(int(sys.argv[2])))
"""


@NO_GITHUB
def test_bulk_random_tcp_is_no_dns_to_judge(fenced: Fence, tmp_path: Path) -> None:
    """Random bytes in 64 KiB segments often read as a chain of length-prefixed
    "messages"; none of them is DNS, and none may be dropped as unjudged (they were:
    iperf3 through a fence fell to 1% of its speed)."""
    size = 16 << 20
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        received = []

        def sink() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received.append(len(chunk))

        thread = threading.Thread(target=sink)
        thread.start()
        script = tmp_path / "bulk.py"
        script.write_text(BULK)
        result = fenced.run(
            [sys.executable, str(script), str(server.getsockname()[1]), str(size)], timeout=120
        )
        thread.join(timeout=60)
    assert sum(received) == size
    assert not [e for e in result.events if e.qtype is not None or e.forbidden], result.events
