"""Permitted contacts are counted in the kernel, and no map keeps a finished run's entries.

bpf/sockaddr.c reports the first message of each (fence cgroup, process,
destination, hook) and only counts the rest (map `contacts`); the run reads and
deletes its counts at its end and puts them on its record of each contact
(`EgressEvent.connections`). So 300 connections from one client are one event
that says 300, and a local listener is still named for each process that
reached it. When a fence cgroup leaves the fence (a run's end, a service's
stop, the fence's close), what the kernel recorded of it goes too: socket
owners (`sockets`), DNS destinations (`redirected`), DNS flows (`dnsflows`),
counts (`contacts`), unix paths reached (`unix_reached`). Real clients (python
sockets, getent) in the lab; the fenced scripts wait on FIFOs while the maps are
looked at.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_depfence import Policy
from pytest_depfence.kernel import Programs, load

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)

#: Connects to ADDRESS:PORT COUNT times, closing each connection at once.
CLIENT = """
import socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    socket.create_connection((address, port), timeout=10).close()
"""


@pytest.fixture
def listener() -> Iterator[Callable[[str], int]]:
    """Start a TCP listener of this process (in the lab's namespace) at an address, which
    accepts and closes each connection; returns its port. Stopped at teardown."""
    started: list[tuple[socket.socket, threading.Thread]] = []
    stop = threading.Event()

    def serve(server: socket.socket) -> None:
        while not stop.is_set():
            conn, _ = server.accept()
            conn.close()

    def start(address: str) -> int:
        server = socket.create_server((address, 0), backlog=256)
        thread = threading.Thread(target=serve, args=(server,), daemon=True)
        thread.start()
        started.append((server, thread))
        return int(server.getsockname()[1])

    yield start
    stop.set()
    for server, thread in started:
        socket.create_connection(server.getsockname()[:2]).close()  # wakes accept()
        thread.join(10)
        server.close()


def test_connections_to_one_endpoint_are_one_event_that_counts_them(
    fences, lab: Lab, listener: Callable[[str], int]
) -> None:
    fence = fences(Policy.no_egress("github.com"))
    mirror = lab.address("mirror.internal")
    port = listener(mirror)
    result = fence.run([sys.executable, "-c", CLIENT, mirror, str(port), "300"])
    [contact] = [e for e in result.events if e.address == mirror]
    assert (contact.port, contact.protocol, contact.verdict) == (port, "tcp", "allowed")
    assert contact.connections == 300
    assert contact.cmdline is not None and "import socket" in contact.cmdline


def test_each_process_has_its_own_count(fences, lab: Lab, listener: Callable[[str], int]) -> None:
    fence = fences(Policy.no_egress("github.com"))
    mirror = lab.address("mirror.internal")
    client = f"{sys.executable} -c '{CLIENT}' {mirror} {listener(mirror)}"
    result = fence.run(["sh", "-c", f"{client} 7 & {client} 11; wait"])
    contacts = [e for e in result.events if e.address == mirror]
    assert sorted(e.connections or 0 for e in contacts) == [7, 11]
    assert len({e.pid for e in contacts}) == 2


def test_a_local_listener_is_named_once_with_the_count(
    fences, listener: Callable[[str], int]
) -> None:
    fence = fences(Policy.no_egress("github.com"))
    port = listener("127.0.0.1")
    result = fence.run([sys.executable, "-c", CLIENT, "127.0.0.1", str(port), "200"])
    [contact] = [e for e in result.events if e.is_local]
    assert contact.port == port and contact.connections == 200
    assert contact.listener is not None and f"pid {os.getpid()} " in contact.listener


def test_a_refused_connection_is_an_event_each_time(fences, lab: Lab) -> None:
    fence = fences(Policy.no_egress("github.com"))
    github = lab.address("github.com")
    result = fence.run([sys.executable, "-c", CLIENT, github, "443", "3"], check=False)
    refused = [e for e in result.violations if e.address == github]
    assert len(refused) == 1, "the client stops at the first refusal"
    assert refused[0].connections is None, "a violation is not counted, it is reported"


# --------------------------------------------------------------------------- the maps


def _fence_cgroups(programs: Programs) -> set[int]:
    return {key.value for key in programs.table("fences").keys()}


def _entries_of(programs: Programs, cgroups: set[int]) -> dict[str, int]:
    """How many entries each map holds for these fence cgroups (`redirected`: for their
    sockets, by cookie)."""
    sockets = [
        k.value
        for name in ("sockets", "sockets_spill")
        for k, o in programs.table(name).items()
        if o.cgid in cgroups
    ]
    redirected = [k for k in programs.table("redirected").keys() if k.value in set(sockets)]
    flows = [k for k, o in programs.table("dnsflows").items() if o.cgid in cgroups]
    contacts = [k for k in programs.table("contacts").keys() if k.cgid in cgroups]
    reached = [k for k in programs.table("unix_reached").keys() if k.cgid in cgroups]
    return {
        "sockets": len(sockets),
        "redirected": len(redirected),
        "dnsflows": len(flows),
        "contacts": len(contacts),
        "unix_reached": len(reached),
    }


#: Looks mirror.internal up (the proxy: `redirected`, `dnsflows`), connects to it
#: (`sockets`, `contacts`), sends a datagram to the unix socket $4 (`unix_reached`), says
#: so on $0 and waits on $1.
USES_THE_MAPS = (
    'getent hosts mirror.internal > /dev/null && {python} -c "$2" "$3" 80 2 '
    "&& {python} -c 'import socket, sys; "
    'socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", sys.argv[1])\' "$4" '
    '&& echo ready > "$0" && read x < "$1"'
)


@pytest.fixture
def mapper(fifo: Any, lab: Lab, tmp_path: Path) -> Iterator[tuple[list[str], Any, Any]]:
    """A script that leaves an entry in every map (`USES_THE_MAPS`), and its FIFOs: it
    says "ready" on the first, then waits for a line on the second."""
    if not shutil.which("getent"):
        pytest.skip("needs getent")
    ready, go = fifo("ready"), fifo("go")
    script = USES_THE_MAPS.format(python=sys.executable)
    log = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(log))
        address = lab.address("mirror.internal")
        yield ["sh", "-c", script, str(ready), str(go), CLIENT, address, str(log)], ready, go


def _entries_once_ready(
    programs: Programs, before: set[int], ready: Any
) -> tuple[set[int], dict[str, int]]:
    """The fence cgroups registered since `before`, and their entries, once the script is ready."""
    assert ready.read_line() == "ready"
    mine = _fence_cgroups(programs) - before
    assert len(mine) == 1
    return mine, _entries_of(programs, mine)


def test_no_map_keeps_a_finished_runs_entries(fences, mapper) -> None:
    programs = load()
    fence = fences(Policy.no_egress("github.com"))
    argv, ready, go = mapper
    before = _fence_cgroups(programs)
    seen: dict[str, int] = {}
    run = threading.Thread(target=lambda: seen.update(result=fence.run(argv).returncode))
    run.start()
    try:
        mine, during = _entries_once_ready(programs, before, ready)
    finally:
        go.write_line()
        run.join(60)
    assert seen == {"result": 0}
    assert all(during.values()), f"the run left no trace to clean: {during}"
    assert _entries_of(programs, mine) == dict.fromkeys(during, 0)


def test_a_stopped_services_entries_are_gone_at_fence_close(fences, mapper) -> None:
    programs = load()
    fence = fences(Policy.no_egress("github.com"))
    argv, ready, go = mapper
    before = _fence_cgroups(programs)
    fence.service(argv, name="mapper")
    mine, during = _entries_once_ready(programs, before, ready)
    go.write_line()
    fence.close()
    assert all(during.values()), f"the service left no trace to clean: {during}"
    assert _entries_of(programs, mine) == dict.fromkeys(during, 0)


def test_a_whole_map_is_read_and_deleted_in_batches(fences) -> None:
    """More entries than one lookup syscall takes (`batch.CHUNK`), one of them gone before
    the deletion (an LRU map may evict any): all read, the rest deleted. Cgroup id 0 is
    no cgroup's, so no program ever looks these up."""
    from pytest_depfence.kernel import batch

    table = load().table("contacts")
    keys = []
    for n in range(1, 2 * batch.CHUNK + 100):
        key = table.Key()
        key.cgid, key.pid, key.port, key.proto, key.where = 0, n, 80, 6, 1
        table[key] = table.Leaf(n)
        keys.append(key)
    try:
        read = {k.pid: v.value for k, v in batch.entries(table) if k.cgid == 0}
        assert read == {n: n for n in range(1, 2 * batch.CHUNK + 100)}
        del table[keys[7]]
        batch.delete(table, keys)
        assert [k for k, _ in batch.entries(table) if k.cgid == 0] == []
    finally:
        batch.delete(table, keys)


def test_a_map_of_large_values_is_read_a_bounded_chunk_at_a_time_and_whole(fences) -> None:
    """Process records (4.4 KB each) are read no more than `batch.CHUNK_BYTES` a syscall,
    and every one of them: here three chunks and more. The pids are above any pid_max,
    so no program ever looks them up."""
    from pytest_depfence.kernel import batch

    table = load().table("procs")
    per_call = batch.CHUNK_BYTES // (ctypes.sizeof(table.Key) + ctypes.sizeof(table.Leaf))
    assert 1 <= per_call < batch.CHUNK
    pids = range(0x7FFF0000, 0x7FFF0000 + 3 * per_call + 5)
    keys = [table.Key(pid) for pid in pids]
    for key in keys:
        table[key] = table.Leaf()
    try:
        assert {k.value for k, _ in batch.entries(table) if k.value in pids} == set(pids)
    finally:
        batch.delete(table, keys)
    assert [k for k, _ in batch.entries(table) if k.value in pids] == []


#: Makes a raw socket (`rawsocks`: sockcreate.c), says so on argv[1], waits on argv[2].
RAW_SOCKET_HELD = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
open(sys.argv[1], "w").write("ready\\n")
open(sys.argv[2]).readline()
"""


def test_no_raw_socket_owner_is_kept_after_the_run(fences, fifo) -> None:
    programs = load()
    fence = fences(Policy.no_egress("github.com"), raw_sockets=True)
    ready, go = fifo("ready"), fifo("go")
    before = _fence_cgroups(programs)
    argv = [sys.executable, "-c", RAW_SOCKET_HELD, str(ready), str(go)]
    run = threading.Thread(target=fence.run, args=(argv,))
    run.start()
    try:
        assert ready.read_line() == "ready"
        mine = _fence_cgroups(programs) - before
        raw = programs.table("rawsocks")
        assert [k for k, o in raw.items() if o.cgid in mine], "the raw socket has no owner"
    finally:
        go.write_line()
        run.join(60)
    assert not [k for k, o in raw.items() if o.cgid in mine]


def test_a_closed_fence_leaves_no_address_or_name_rule(fences) -> None:
    # Its name rules, its address rules as written, the addresses the upstream gave its
    # blocked names, and one more learned at a run: each fence forgets the keys it added.
    programs = load()
    fence = fences(Policy.no_egress("github.com", "*.githubusercontent.com", "10.77.9.0/24"))
    fence.run(["getent", "hosts", "github.com"], check=False)
    fence.run(["getent", "ahosts", "raw.githubusercontent.com"], check=False)
    other = fences(Policy.no_egress("github.com"))

    def rules_of(fence_id: int) -> tuple[int, int]:
        addrs = [k for k in programs.table("addrs").keys() if k.fence_id == fence_id]
        names = [k for k in programs.table("names").keys() if k.fence_id == fence_id]
        return len(addrs), len(names)

    addrs, names = rules_of(fence.id)
    assert addrs >= 3 and names == 2, (addrs, names)  # 10.77.9.0/24, github.com's v4 and v6
    before_other = rules_of(other.id)
    fence.close()
    assert rules_of(fence.id) == (0, 0)
    assert rules_of(other.id) == before_other != (0, 0)
