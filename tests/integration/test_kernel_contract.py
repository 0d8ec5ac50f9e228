"""The C<->Python contract, checked against the programs really loaded in this process.

kernel/abi.py mirrors the C by hand in three ways, each checked here on the
real thing: the ring-buffer event structs (against bcc's view of the C types,
through depfence.c's `abi_check` map, and against the size of every event the
kernel actually sent), the maps' fields and sizes Python relies on, and the
name hash of bypass.c (rules are hashed in Python, queries in the kernel: a
query sent past the proxy is dropped and reported by name exactly when both
hash its suffix alike). Queries go to the lab resolver's second port,
10.77.0.53:5300, which is never redirected to the proxy.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers_net import skip_or_fail

from pytest_depfence.cgroup import PARENT, cgroup2_mount
from pytest_depfence.kernel import abi, toolkit

if TYPE_CHECKING:
    from pytest_depfence import Fence, FenceResult
    from pytest_depfence.kernel import Programs

if os.geteuid() != 0:
    pytest.skip("loading the programs needs root", allow_module_level=True)

RESOLVER = ("10.77.0.53", 5300)

#: Rule names, each chosen to stress one part of the hash: case, label count,
#: label length, total length. Their wire lengths are checked below.
LABEL63 = "l" * 62 + "z"
MANY = ".".join(f"n{i}" for i in range(abi.DNS_LABELS_MAX - 3)) + ".many.test"
LONGEST = "x" * 63 + "." + "y" * 57 + ".test"  # wire form: exactly DNS_NAME_MAX bytes
ALMOST = "x" * 62 + "." + "y" * 57 + ".test"  # one byte shorter
RULES = ["github.com", "*.wild.test", f"{LABEL63}.example.test", MANY, LONGEST, ALMOST]

#: Query (as sent, mixed case) -> the reported domain when blocked, None when it passes.
QUERIES: dict[str, str | None] = {
    "GitHub.COM": "github.com",
    "API.github.Com": "api.github.com",
    "Deep.X.Wild.TEST": "deep.x.wild.test",
    f"{LABEL63.upper()}.Example.Test": f"{LABEL63}.example.test",
    f"Below.{LABEL63}.example.test": f"below.{LABEL63}.example.test",
    MANY.upper(): MANY,
    LONGEST.upper(): LONGEST,
    ALMOST.title(): ALMOST,
    # Near misses: another byte, a label boundary elsewhere, a shorter suffix.
    "wild.test": None,  # *.wild.test: below it only
    "notgithub.com": None,
    "github.com.evil.test": None,
    f"{LABEL63[:-1]}y.example.test": None,
    MANY.split(".", 1)[1]: None,
    "x" * 63 + "." + "y" * 56 + "Z.test": None,
}

# Sends every name given as an A query to HOST PORT over UDP at once, then waits a
# second for answers; prints JSON: name -> the answer's rcode, or null for no answer
# (a datagram the egress program drops fails its sendto() with EPERM).
QUERY_CLIENT = """\
import json, select, socket, struct, sys, time
host, port, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def query(txid, name):
    wire = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\\0"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)
socks = {}
for txid, name in enumerate(names, 1):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(query(txid, name), (host, port))
    except PermissionError:  # dropped on the way out: the kernel says so at once
        continue
    socks[sock] = name
answers = dict.fromkeys(names)
deadline = time.monotonic() + 1.0
while socks and time.monotonic() < deadline:
    ready, _, _ = select.select(list(socks), [], [], max(0.0, deadline - time.monotonic()))
    for sock in ready:
        answers[socks.pop(sock)] = sock.recv(4096)[3] & 0x0F
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def programs(pytestconfig: pytest.Config) -> Programs:
    from pytest_depfence.errors import FenceUnavailable
    from pytest_depfence.kernel import load

    try:
        return load()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)


def c_type(programs: Programs, table: str, part: str) -> Any:
    return getattr(programs.table(table), part)


# --------------------------------------------------------------------------- structs and maps


@pytest.mark.parametrize("ring", list(abi.RINGS))
def test_ring_buffer_struct_matches_the_c(programs: Programs, ring: str) -> None:
    field, ours = abi.RINGS[ring]
    check = c_type(programs, "abi_check", "Leaf")
    theirs = dict(check._fields_)[field]
    assert abi.layout_mismatches(ours, theirs) == []
    assert ctypes.sizeof(ours) == ctypes.sizeof(theirs)


def test_both_events_start_with_the_head_in_c_too(programs: Programs) -> None:
    check = dict(c_type(programs, "abi_check", "Leaf")._fields_)
    for event in ("conn", "bypass"):
        assert check[event].head.offset == 0
        head = dict(check[event]._fields_)["head"]
        assert abi.layout_mismatches(abi.EventHead, head) == [], event


@pytest.mark.parametrize(
    ("table", "key_fields", "leaf_fields"),
    [
        ("fences", (), ("fence_id", "proxy_port", "refuser_port", "flags", "outage")),
        ("addrs", ("prefixlen", "fence_id", "ip6"), ("verdict",)),
        ("names", ("fence_id", "hash"), ("kind",)),
        ("dnsflows", ("proxy_port", "client_port", "txid", "proto"), ("pid", "tid", "cgid")),
        ("procs", (), ("ppid", "flags", "cgid", "argc", "args")),
    ],
)
def test_maps_have_the_fields_python_uses(
    programs: Programs, table: str, key_fields: tuple[str, ...], leaf_fields: tuple[str, ...]
) -> None:
    for part, fields in (("Key", key_fields), ("Leaf", leaf_fields)):
        kind = c_type(programs, table, part)
        missing = [f for f in fields if not hasattr(kind, f)]
        assert missing == [], f"{table}.{part} lacks {missing}"


def test_sizes_passed_as_defines_reached_the_c(programs: Programs) -> None:
    procs = programs.table("procs")
    assert toolkit.table_max_entries(procs) == abi.MAX_PROCS
    assert procs.Leaf.args.size == abi.ARGC * abi.ARGLEN
    assert c_type(programs, "names", "Key").hash.size == 8
    assert c_type(programs, "addrs", "Key").ip6.size == 16
    bypass = dict(c_type(programs, "abi_check", "Leaf")._fields_)["bypass"]
    assert bypass.name.size == abi.DNS_NAME_MAX
    escape = dict(c_type(programs, "abi_check", "Leaf")._fields_)["escape"]
    assert escape.path.size == abi.CGROUP_PATH_MAX


# --------------------------------------------------------------------------- the name hash


def test_the_rule_names_sit_where_they_should() -> None:
    assert len(abi.to_wire(LONGEST)) == abi.DNS_NAME_MAX
    assert len(abi.to_wire(ALMOST)) == abi.DNS_NAME_MAX - 1
    assert len(MANY.split(".")) == abi.DNS_LABELS_MAX - 1  # the most bypass.c walks
    assert len(LABEL63) == 63


def run_queries(fenced: Fence, tmp_path: Path, names: list[str]) -> tuple[FenceResult, Any]:
    script = tmp_path / "queries.py"
    script.write_text(QUERY_CLIENT)
    argv = [sys.executable, str(script), *RESOLVER[:1], str(RESOLVER[1]), *names]
    result = fenced.run(argv, check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    return result, json.loads(result.stdout.splitlines()[-1])


@pytest.mark.no_egress(*RULES)
def test_name_hash_matches_the_c_on_real_queries(
    fenced: Fence, tmp_path: Path, programs: Programs
) -> None:
    result, answers = run_queries(fenced, tmp_path, list(QUERIES))

    stored = {key.hash for key in programs.table("names").keys()}
    rule_names = [rule.removeprefix("*.") for rule in RULES]
    assert {abi.name_hash(name) for name in rule_names} <= stored

    blocked = {e.domain: e for e in result.violations if e.blocked_at == "packet"}
    for query, domain in QUERIES.items():
        if domain is None:
            assert answers[query] is not None, f"{query} got no answer"
            assert query.lower() not in blocked
        else:
            assert answers[query] is None, f"{query} was answered: the kernel let it pass"
            event = blocked.get(domain)
            assert event is not None, f"{query} not reported; violations: {result.violations}"
            assert (event.address, event.port, event.protocol) == (*RESOLVER, "udp")
            assert (event.qtype, event.verdict) == ("A", "blocked")
    assert set(blocked) == {d for d in QUERIES.values() if d}


@pytest.mark.no_egress(*RULES)
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"], ids=["udp", "tcp"])
def test_dig_past_the_proxy_is_judged_by_the_same_hash(fenced: Fence, transport: str) -> None:
    if not shutil.which("dig"):
        pytest.skip("needs dig (apt-get install dnsutils)")
    dig = ["dig", f"@{RESOLVER[0]}", "-p", str(RESOLVER[1]), "+time=1", "+tries=1", transport]
    blocked = fenced.run([*dig, LONGEST.swapcase()], check=False, timeout=30)
    assert blocked.returncode == 9, blocked.stdout  # no answer
    assert [(e.domain, e.blocked_at) for e in blocked.violations] == [(LONGEST, "packet")]

    near = "x" * 63 + "." + "y" * 56 + "q.TEST"
    passed = fenced.run([*dig, near], timeout=30)
    assert "status: NXDOMAIN" in passed.stdout
    assert passed.violations == []


# --------------------------------------------------------------------------- received events


@pytest.mark.no_egress("github.com")
def test_every_event_the_kernel_sent_has_the_size_of_its_struct(
    fenced: Fence, tmp_path: Path, programs: Programs
) -> None:
    # A mount (unshare -m makes / private: a view event), a bypass query (a bypass
    # event, and its datagram's first contact: a conn event), a child moved by its
    # parent into a sub-cgroup of the fence (an escape event, found inside the fence),
    # a connect to a unix socket that listens (a unix event).
    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    run_queries(fenced, tmp_path, ["github.com"])
    fenced.run(["unshare", "-m", "true"], timeout=30)
    path = str(tmp_path / "contract.sock")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(path)
        listening.listen()
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
        fenced.run([sys.executable, "-c", connect], timeout=30)
    procs = f"$(find {cgroup2_mount() / PARENT} -name cgroup.procs)"
    fenced.run(
        f'set -e; own=$(grep -lx "$$" {procs} | sed "s,/cgroup.procs$,,"); mkdir "$own/sub"; '
        'sleep 1000 & echo $! > "$own/sub/cgroup.procs"; kill $!',
        timeout=30,
    )

    for ring, (_, struct) in abi.RINGS.items():
        assert programs.event_sizes[ring] == {ctypes.sizeof(struct)}, ring
