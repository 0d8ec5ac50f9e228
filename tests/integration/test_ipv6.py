"""DNS over IPv6 under a fence: caught like IPv4, and replies come back from the address asked.

The lab resolver also listens on fd77::53. A fenced client asking it is sent
to the proxy's ::1 socket (connect6/sendmsg6), and recvmsg6 must put the
resolver's address back as the reply's source, or a client that checks it
(dig does) drops the answer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_depfence import Fence
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
if shutil.which("dig") is None:
    pytest.skip("these tests need dig (apt-get install dnsutils)", allow_module_level=True)

PY = sys.executable
DIG = ["dig", "+time=2", "+tries=1"]


def assert_answered_by_the_v6_resolver(dig_stdout: str, protocol: str) -> None:
    """dig's SERVER line; BIND 9.18+ adds the protocol, "(UDP)"/"(TCP)", 9.16 (Debian 11)
    does not."""
    found = re.search(r"^;; SERVER: fd77::53#53\(fd77::53\)(?: \((\w+)\))?$", dig_stdout, re.M)
    assert found, dig_stdout
    assert found[1] in (None, protocol.upper()), dig_stdout


def answer_section(dig_output: str) -> list[tuple[str, str, str]]:
    """(owner, type, data) of each record in dig's ANSWER SECTION."""
    lines = dig_output.splitlines()
    if ";; ANSWER SECTION:" not in lines:
        return []
    records = []
    for line in lines[lines.index(";; ANSWER SECTION:") + 1 :]:
        if not line.strip():
            break
        fields = line.split()
        records.append((fields[0], fields[3], fields[4]))
    return records


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize(
    ("argv", "protocol"),
    [
        ([*DIG, "@fd77::53", "AAAA", "github.com"], "udp"),
        ([*DIG, "-6", "@fd77::53", "+tcp", "AAAA", "github.com"], "tcp"),
    ],
    ids=["udp6", "tcp6"],
)
def test_aaaa_query_to_the_v6_resolver_is_caught(
    fenced: Fence, argv: list[str], protocol: str
) -> None:
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    assert "status: NXDOMAIN" in result.stdout
    assert_answered_by_the_v6_resolver(result.stdout, protocol)
    assert len(result.violations) == 1
    event = result.violations[0]
    assert (event.domain, event.qtype, event.protocol) == ("github.com", "AAAA", protocol)
    assert (event.verdict, event.blocked_at) == ("blocked", "dns")
    assert event.cmdline == shlex.join(argv)
    assert event.unattributed is None


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_allowed_aaaa_comes_back_from_the_v6_resolver(
    fenced: Fence, lab: Lab, transport: str
) -> None:
    argv = [*DIG, "-6", transport, "@fd77::53", "AAAA", "mirror.internal"]
    result = fenced.run(argv, timeout=30)

    output = result.stdout + result.stderr
    assert "unexpected source" not in output
    assert answer_section(result.stdout) == [
        ("mirror.internal.", "AAAA", lab.address("mirror.internal", 6))
    ]
    protocol = "tcp" if transport == "+tcp" else "udp"
    assert_answered_by_the_v6_resolver(result.stdout, protocol)
    assert [(e.domain, e.verdict, e.protocol, e.cmdline) for e in result.events] == [
        ("mirror.internal", "allowed", protocol, shlex.join(argv))
    ]


@pytest.mark.no_egress("github.com")
def test_a_query_over_v6_gets_the_v4_address(fenced: Fence, lab: Lab) -> None:
    argv = [*DIG, "@fd77::53", "A", "mirror.internal"]
    result = fenced.run(argv, timeout=30)

    assert answer_section(result.stdout) == [
        ("mirror.internal.", "A", lab.address("mirror.internal"))
    ]
    assert "unexpected source" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- reply source

# Unconnected UDP (sendto/recvfrom): the client sees exactly what recvmsg6 left as source.
RECVFROM = """\
import json, socket, sys
family = socket.AF_INET6
resolver = sys.argv[1]
wire = b"\\x06mirror\\x08internal\\x00\\x00\\x1c\\x00\\x01"
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(bytes.fromhex("abcd01000001000000000000") + wire, (resolver, 53))
data, source = sock.recvfrom(4096)
print(json.dumps({"source": list(source[:2]), "txid": data[:2].hex()}))
"""


@pytest.mark.no_egress("github.com")
def test_unconnected_v6_reply_source_is_the_resolver(fenced: Fence, tmp_path: Path) -> None:
    client = tmp_path / "recvfrom.py"
    client.write_text(RECVFROM)
    result = fenced.run([PY, str(client), "fd77::53"], timeout=30)

    assert json.loads(result.stdout) == {"source": ["fd77::53", 53], "txid": "abcd"}
    assert [(e.domain, e.qtype, e.verdict) for e in result.events] == [
        ("mirror.internal", "AAAA", "allowed")
    ]


@pytest.mark.no_egress("github.com")
def test_dual_stack_socket_reply_source_is_the_v4_mapped_resolver(
    fenced: Fence, tmp_path: Path
) -> None:
    client = tmp_path / "recvfrom.py"
    client.write_text(RECVFROM)
    result = fenced.run([PY, str(client), "::ffff:10.77.0.53"], timeout=30)

    assert [(e.domain, e.verdict) for e in result.events] == [("mirror.internal", "allowed")]
    assert json.loads(result.stdout) == {"source": ["::ffff:10.77.0.53", 53], "txid": "abcd"}
