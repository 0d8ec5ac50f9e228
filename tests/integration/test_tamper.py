"""A fenced root process cannot take its own fence apart (pytest_depfence/seccomp.py).

Without the filter, measured: detaching the fence's bpf_links (what `bpftool link
detach` does: each link's descriptor by its id, then BPF_LINK_DETACH), or killing the
guardian and the owner, let the script's next connection to github.com through with
no event. Here a real fenced command tries both, as root, and the fence holds.

Lab addresses: github.com 10.77.1.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_depfence import seccomp

if TYPE_CHECKING:
    from pytest_depfence import Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("fenced runs need root (cgroups, eBPF)", allow_module_level=True)

NO_GITHUB = pytest.mark.no_egress("github.com")

# Every bpf_link on the machine by id (BPF_LINK_GET_NEXT_ID is allowed), then the
# descriptor of each (BPF_LINK_GET_FD_BY_ID): prints {"links": N, "refused": M, "got": K}.
LINKS = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
def bpf(cmd, value):
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = value
    fd = libc.syscall(BPF, cmd, attr, 128)
    return fd, ctypes.get_errno(), ctypes.c_uint32.from_buffer(attr, 4).value
links = refused = got = 0
start = 0
while True:
    rc, err, nxt = bpf(31, start)  # BPF_LINK_GET_NEXT_ID: the next id in attr+4
    if rc < 0:
        break
    links, start = links + 1, nxt
    fd, err, _ = bpf(30, nxt)  # BPF_LINK_GET_FD_BY_ID
    if fd >= 0:
        got += 1
        os.close(fd)
    elif err == errno.EPERM:
        refused += 1
print(json.dumps({"links": links, "refused": refused, "got": got}))
"""


@pytest.mark.skipif(os.uname().machine not in seccomp.ARCHES, reason="no filter here")
@NO_GITHUB
def test_a_fenced_root_process_cannot_reach_the_fences_links(entry: str, fenced: Fence) -> None:
    result = fenced.run([sys.executable, "-c", LINKS], check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["links"] > 0, "no bpf_link at all: the fence's own must be there"
    assert (seen["got"], seen["refused"]) == (0, seen["links"])
    again = fenced.run(["curl", "-sS", "-m", "5", "http://10.77.1.1/"], check=False)
    assert again.returncode != 0 and again.violations


@pytest.mark.skipif(os.uname().machine not in seccomp.ARCHES, reason="no filter here")
@NO_GITHUB
def test_a_fenced_root_process_cannot_kill_its_owner_nor_its_guardian(
    entry: str, fenced: Fence
) -> None:
    from pytest_depfence.fence import _session_tree

    fenced.run(["true"])  # the guardian holds the links from the first run on
    guardian = _session_tree().guardian_pid()
    assert guardian is not None
    # Signal 0: the kernel checks the right to signal and sends nothing, so should the
    # filter ever fail, this test fails instead of killing the machine's processes.
    script = f'kill -0 {guardian} {os.getpid()}; echo "kill: $?"; kill -0 -1; echo "all: $?"'
    result = fenced.run(["sh", "-c", script], check=False, timeout=60)
    assert "kill: 1" in result.stdout and "all: 1" in result.stdout, result.stderr
    assert "Operation not permitted" in result.stderr


NFT = shutil.which("nft")
#: A NAT rule of the namespace: what a connect to mirror.internal's address reaches is
#: github.com's (the kernel rewrites the packet after the connect hook judged it).
DNAT = [
    "add table ip depfence_tamper",
    "add chain ip depfence_tamper out { type nat hook output priority -100 ; }",
    "add rule ip depfence_tamper out ip daddr 10.77.3.1 tcp dport 80 dnat to 10.77.1.1:80",
]


def _run_behind(fence: Fence, rules: list[str], command: str) -> FenceResult:
    """`fence.run` of `command` after the fenced shell added the NAT `rules`; the rules'
    table is deleted after."""
    script = "; ".join(f"nft '{rule}'" for rule in rules)
    try:
        return fence.run(["sh", "-c", f"{script} && {command}"], check=False, timeout=60)
    finally:
        subprocess.run([str(NFT), "delete", "table", "ip", "depfence_tamper"], check=False)


@pytest.mark.skipif(NFT is None, reason="needs nft (apt-get install nftables)")
@pytest.mark.filterwarnings("ignore::pytest_depfence.errors.EgressAuditWarning")
@pytest.mark.parametrize(
    ("settings", "reached"),
    [({}, False), ({"outage": "blackhole"}, False), ({"mode": "audit"}, True)],
    ids=["block", "blackhole", "audit"],
)
def test_a_nat_rule_does_not_take_a_connection_past_the_fence(
    fences: Any, settings: dict[str, str], reached: bool
) -> None:
    """In every mode: blocked (or, with blackhole, dropped) and named at the packet, or
    in audit mode let through and on record there. The connect judged an allowed address,
    so nothing else would say where the connection went."""
    from pytest_depfence import Policy

    fence = fences(Policy.no_egress("github.com"), **settings)
    result = _run_behind(fence, DNAT, "curl -sS -m 3 http://10.77.3.1/")
    assert ("lab:github.com" in result.stdout) is reached
    events = [e for e in result.violations if e.address == "10.77.1.1"]
    assert len(events) == 1, result.events  # once: the connect judged an allowed address
    (event,) = events
    assert (event.forbidden, event.domain, event.port) == (True, "github.com", 80)
    assert (event.verdict, event.blocked_at) == (
        ("allowed", None) if reached else ("blocked", "packet")
    )
    assert event.cmdline is not None and event.cmdline.startswith("curl")


#: Datagrams on a socket connected to mirror.internal's address, which a NAT rule (as in
#: DNAT, for UDP) sends to github.com's: prints each send's result, "ok" or its errno name.
DATAGRAMS = r"""
import errno, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("10.77.3.1", 9))
for _ in range(3):
    try:
        s.send(b"x")
        print("ok")
    except OSError as exc:
        print(errno.errorcode[exc.errno])
"""


@pytest.mark.skipif(NFT is None, reason="needs nft (apt-get install nftables)")
def test_a_nat_rule_does_not_take_a_datagram_past_the_fence(fences: Any) -> None:
    """Every datagram is judged again at the packet (only a TCP SYN to the very address
    its connect judged is not: bpf/egress.c judged_already): each one NAT sends elsewhere
    is dropped and named there."""
    from pytest_depfence import Policy

    fence = fences(Policy.no_egress("github.com"))
    rules = [*DNAT[:2], DNAT[2].replace("tcp dport 80", "udp dport 9").replace(":80", ":9")]
    result = _run_behind(fence, rules, f"{sys.executable} -c '{DATAGRAMS}'")
    assert result.stdout.split() == ["EPERM"] * 3, result.stderr
    events = [e for e in result.violations if e.address == "10.77.1.1"]
    assert events, result.events
    assert {(e.domain, e.port, e.verdict, e.blocked_at) for e in events} == {
        ("github.com", 9, "blocked", "packet")
    }


# Opens the memory of each pid given, as a root script rewriting the owner's policy would,
# then its own: prints "PID ok" or "PID ERRNO-NAME".
MEMORY = r"""
import errno, os, sys
for pid in [*sys.argv[1:], str(os.getpid())]:
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))
        print(pid, "ok")
    except OSError as exc:
        print(pid, errno.errorcode[exc.errno])
"""


@NO_GITHUB
def test_a_fenced_root_process_cannot_open_the_memory_of_its_owner_nor_guardian(
    entry: str, fenced: Fence
) -> None:
    from pytest_depfence.fence import _session_tree

    fenced.run(["true"])  # the guardian holds the links from the first run on
    guardian = _session_tree().guardian_pid()
    assert guardian is not None
    result = fenced.run([sys.executable, "-c", MEMORY, str(os.getpid()), str(guardian)])
    said = dict(line.split() for line in result.stdout.splitlines())
    assert said.pop(str(os.getpid())) == "EACCES" and said.pop(str(guardian)) == "EACCES"
    assert list(said.values()) == ["ok"]  # its own memory is its own to open
