"""The packet backstop: raw and ICMP sockets, which the connect-time hooks never see.

A fenced command has no CAP_NET_RAW unless the test opts in (`fence(raw_sockets=True)`,
test_escape.py checks the default); every test here opts in, to test what happens to
raw sockets a fence allows. A raw or ICMP socket sends without connect() or a UDP
sendmsg(), so the sock_addr programs never judge it; its owner is recorded when it is
made (bpf/sockcreate.c). egress.c judges each of its packets by destination: a refused
one is dropped and reported with the process that sent it (`blocked_at == "packet"`),
an allowed one passes (test_sender.py: a raw socket's DNS, and ping's pid).
The socket may live in a sub-cgroup the script made inside its own fence
cgroup; its packets are judged all the same (egress.c walks the packet's
cgroup up to the fence). Lab addresses: github.com 10.77.1.1 / fd77::1:1,
mirror.internal 10.77.3.1 / fd77::3:1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest
from helpers_cgroup import OWN_CGROUP_SH

if TYPE_CHECKING:
    from pytest_depfence import EgressEvent, Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)

#: iputils' ping when installed, else busybox's (scripts/bootstrap.sh installs busybox).
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
if not shutil.which(PING[0]):
    pytest.skip("these tests need ping (apt-get install iputils-ping)", allow_module_level=True)

NO_GITHUB = pytest.mark.no_egress("github.com")
RAW = pytest.mark.fence(raw_sockets=True)
GITHUB = {4: "10.77.1.1", 6: "fd77::1:1"}
MIRROR = {4: "10.77.3.1", 6: "fd77::3:1"}
PROTOCOL = {4: "icmp", 6: "icmpv6"}
Place = Callable[[list[str]], list[str]]

# One ICMP echo request from a raw socket; prints JSON: the send's errno (or null) and
# whether an echo reply from that address came back within a second.
RAW_CLIENT = """\
import json, socket, struct, sys, time
address, family = sys.argv[1], int(sys.argv[2])
if family == 4:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    kind, reply_kind = 8, 0
else:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    kind, reply_kind = 128, 129  # the kernel fills in an ICMPv6 checksum
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
body = struct.pack("!HH", 0x4446, 1) + b"depfence"
packet = struct.pack("!BBH", kind, 0, 0) + body
if family == 4:
    packet = struct.pack("!BBH", kind, 0, checksum(packet)) + body
error, replied = None, False
try:
    sock.sendto(packet, (address, 0))
except OSError as exc:
    error = exc.errno
deadline = time.monotonic() + 1.0
sock.settimeout(0.2)
while error is None and not replied and time.monotonic() < deadline:
    try:
        data, source = sock.recvfrom(2048)
    except socket.timeout:
        continue
    icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
    replied = source[0] == address and icmp[0] == reply_kind and icmp[4:6] == b"DF"
print(json.dumps({"error": error, "replied": replied}))
"""

# Runs "$@" from a new cgroup made inside the script's own (fence) cgroup; the fence's
# cgroup namespace shows it as /sub.
IN_SUB_CGROUP = (
    "set -e\n"
    + OWN_CGROUP_SH
    + """\
mkdir "$own/sub"
echo $$ > "$own/sub/cgroup.procs"
test "$(sed -n 's/^0:://p' /proc/self/cgroup)" = /sub
echo "moved to $own/sub"
exec "$@"
"""
)


def raw_client(tmp_path: Path, address: str, family: int) -> list[str]:
    script = tmp_path / "rawclient.py"
    script.write_text(RAW_CLIENT)
    return [sys.executable, str(script), address, str(family)]


def ping(address: str, family: int) -> list[str]:
    return [*PING, f"-{family}", "-c1", "-W1", address]


def in_sub_cgroup(argv: list[str]) -> list[str]:
    return ["/bin/sh", "-c", IN_SUB_CGROUP, "in-sub-cgroup", *argv]


def dropped_packets(
    result: FenceResult, address: str, family: int, sender: list[str]
) -> list[EgressEvent]:
    """The packet-level refusals of `address`, each checked for what the kernel can know:
    the program that sent them (`sender`, its argv; it runs by `exec "$@"` in a sub-cgroup)."""
    events = [e for e in result.violations if e.address == address]
    assert events, f"no refused packet to {address}; events: {result.events}"
    for event in events:
        assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "packet", "refused")
        assert (event.protocol, event.forbidden) == (PROTOCOL[family], True)
        assert (event.cmdline, event.unattributed) == (shlex.join(sender), None)
        assert event.pid is not None
        assert event.domain == "github.com"
    return events


@pytest.fixture(params=[False, True], ids=["fence-cgroup", "sub-cgroup"])
def place(request: pytest.FixtureRequest) -> Place:
    """Where the sending process runs: the fence's cgroup, or a sub-cgroup it made."""
    return in_sub_cgroup if request.param else list


@RAW
@NO_GITHUB
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_ping_to_a_blocked_address_is_dropped_and_reported(
    fenced: Fence, family: int, place: Place
) -> None:
    sender = ping(GITHUB[family], family)
    result = fenced.run(place(sender), check=False, timeout=30)

    assert result.returncode != 0, result.stdout  # no reply came back
    assert " bytes from " not in result.stdout
    dropped_packets(result, GITHUB[family], family, sender)


@RAW
@NO_GITHUB
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_raw_socket_to_a_blocked_address_is_dropped_and_reported(
    fenced: Fence, tmp_path: Path, family: int, place: Place
) -> None:
    sender = raw_client(tmp_path, GITHUB[family], family)
    result = fenced.run(place(sender), check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["replied"] is False, "the echo request reached github.com's address"
    events = dropped_packets(result, GITHUB[family], family, sender)
    assert len(events) == 1  # one report per destination and run


@RAW
@NO_GITHUB
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_ping_and_raw_socket_to_an_allowed_address_pass(
    fenced: Fence, tmp_path: Path, family: int, place: Place
) -> None:
    pinged = fenced.run(place(ping(MIRROR[family], family)), timeout=30)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    assert " bytes from " in pinged.stdout

    raw = fenced.run(
        place(raw_client(tmp_path, MIRROR[family], family)),
        timeout=30,
    )
    assert json.loads(raw.stdout.splitlines()[-1]) == {"error": None, "replied": True}
    assert raw.violations == [] and pinged.violations == []


@RAW
@pytest.mark.egress_only("mirror.internal")
def test_egress_only_drops_a_ping_to_an_unlisted_address(fenced: Fence) -> None:
    result = fenced.run(in_sub_cgroup(ping(GITHUB[4], 4)), check=False, timeout=30)

    assert result.returncode != 0
    events = [e for e in result.violations if e.address == GITHUB[4]]
    assert events, f"no refused packet to {GITHUB[4]}; events: {result.events}"
    assert {(e.blocked_at, e.protocol, e.cmdline) for e in events} == {
        ("packet", "icmp", shlex.join(ping(GITHUB[4], 4)))
    }


@pytest.mark.fence(mode="audit", raw_sockets=True)
@pytest.mark.filterwarnings("ignore::pytest_depfence.errors.EgressAuditWarning")
@NO_GITHUB
def test_audit_mode_lets_the_packet_go_and_records_it(fenced: Fence, tmp_path: Path) -> None:
    result = fenced.run(in_sub_cgroup(raw_client(tmp_path, GITHUB[4], 4)), timeout=30)

    assert json.loads(result.stdout.splitlines()[-1]) == {"error": None, "replied": True}
    events = [e for e in result.events if e.address == GITHUB[4]]
    sender = shlex.join(raw_client(tmp_path, GITHUB[4], 4))
    assert [(e.verdict, e.forbidden, e.protocol, e.cmdline) for e in events] == [
        ("allowed", True, "icmp", sender)
    ]
