"""Who listens at a local destination, found with real sockets and processes.

No root needed but for the tests that make a network namespace (they skip
otherwise). A fake /proc tree stands in where the kernel cannot be made to
show something (a socket held by pid 1, a socket nobody holds).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_depfence import local
from pytest_depfence.local import LocalListener, LocalPeers, unit_of

LOOPBACK4 = ipaddress.ip_address("127.0.0.1")
LOOPBACK6 = ipaddress.ip_address("::1")
CHILD_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', 0))\n"
    "s.listen()\n"
    "print(s.getsockname()[1], flush=True)\n"
    "sys.stdin.read()\n"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")


@pytest.fixture
def peers() -> LocalPeers:
    return LocalPeers()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; each closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def listening(opened: list[socket.socket], family: int, address: str, **opts: int) -> int:
    """A TCP socket listening on (address, 0); its port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    opened.append(sock)
    for option, value in opts.items():
        sock.setsockopt(*_option(option), value)
    sock.bind((address, 0))
    sock.listen()
    return int(sock.getsockname()[1])


def _option(name: str) -> tuple[int, int]:
    level = socket.IPPROTO_IPV6 if name == "IPV6_V6ONLY" else socket.SOL_SOCKET
    return level, getattr(socket, name)


def ipv6_loopback() -> bool:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return False
    return True


def own_cmdline() -> str:
    raw = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    return shlex.join(arg.decode(errors="replace") for arg in raw)


def own_cgroup() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


# --- TCP ----------------------------------------------------------------------------------


def test_a_loopback_listener_here_is_this_process(peers, sockets) -> None:
    port = listening(sockets, socket.AF_INET, "127.0.0.1")

    found = peers.listener("tcp", LOOPBACK4, port)

    assert found is not None
    assert found.pid == os.getpid()
    assert found.cmdline == own_cmdline()
    assert found.cgroup == own_cgroup()
    assert found.inode == inode_of(sockets[0])
    # Warm: the cached holder is checked, not searched for again.
    assert peers.listener("tcp", "127.0.0.1", port) == found


@pytest.mark.skipif(not ipv6_loopback(), reason="no ::1 here")
def test_an_ipv6_loopback_listener(peers, sockets) -> None:
    port = listening(sockets, socket.AF_INET6, "::1")

    found = peers.listener("tcp", LOOPBACK6, port)

    assert found is not None and found.pid == os.getpid()
    assert peers.listener("tcp", LOOPBACK4, port) is None


def test_a_v4_wildcard_takes_every_v4_address_but_not_v6(peers, sockets) -> None:
    port = listening(sockets, socket.AF_INET, "0.0.0.0")

    for address in ("127.0.0.1", "127.0.0.5", "::ffff:127.0.0.1"):
        found = peers.listener("tcp", address, port)
        assert found is not None and found.inode == inode_of(sockets[0]), address
    assert peers.listener("tcp", LOOPBACK6, port) is None


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 here")
def test_a_dual_stack_v6_wildcard_takes_v4_too(peers, sockets) -> None:
    port = listening(sockets, socket.AF_INET6, "::", IPV6_V6ONLY=0)

    for address in ("::1", "127.0.0.1"):
        found = peers.listener("tcp", address, port)
        assert found is not None and found.inode == inode_of(sockets[0]), address


def test_the_socket_bound_to_the_address_wins_over_the_wildcard(peers, sockets) -> None:
    wildcard_port = listening(sockets, socket.AF_INET, "0.0.0.0", SO_REUSEPORT=1)
    exact = socket.socket()
    sockets.append(exact)
    exact.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    exact.bind(("127.0.0.1", wildcard_port))
    exact.listen()

    found = peers.listener("tcp", LOOPBACK4, wildcard_port)

    assert found is not None and found.inode == inode_of(exact)


def test_the_unspecified_destination_is_looked_up_as_loopback(peers, sockets) -> None:
    # Linux connects 0.0.0.0 to 127.0.0.1: `curl http://0.0.0.0:3128` reaches a local proxy.
    port = listening(sockets, socket.AF_INET, "127.0.0.1")

    found = peers.listener("tcp", "0.0.0.0", port)

    assert found is not None and found.pid == os.getpid()


def test_a_bound_port_that_does_not_listen_has_no_listener(peers, sockets) -> None:
    sock = socket.socket()
    sockets.append(sock)
    sock.bind(("127.0.0.1", 0))

    assert peers.listener("tcp", LOOPBACK4, sock.getsockname()[1]) is None


def test_without_sock_diag_the_tcp_tables_answer(peers, sockets, monkeypatch) -> None:
    def refused() -> Iterator[tuple[object, int, int]]:
        raise OSError(errno.EPROTONOSUPPORT, "no sock_diag")

    monkeypatch.setattr(local, "_tcp_listeners", refused)
    port = listening(sockets, socket.AF_INET, "127.0.0.1")

    found = peers.listener("tcp", LOOPBACK4, port)

    assert found is not None and found.inode == inode_of(sockets[0])


def test_bad_arguments_say_what_is_wrong(peers) -> None:
    with pytest.raises(ValueError, match="needs a port"):
        peers.listener("tcp", LOOPBACK4)
    with pytest.raises(ValueError, match="none of tcp, udp, unix"):
        peers.listener("sctp", LOOPBACK4, 1)


# --- UDP and unix -------------------------------------------------------------------------


def test_a_bound_udp_socket(peers, sockets) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(sock)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    found = peers.listener("udp", LOOPBACK4, port)

    assert found is not None and found.pid == os.getpid() and found.inode == inode_of(sock)
    assert peers.listener("tcp", LOOPBACK4, port) is None


def test_a_unix_stream_listener_by_its_path_and_through_a_symlink(peers, sockets, tmp_path):
    path = tmp_path / "api.sock"
    sock = socket.socket(socket.AF_UNIX)
    sockets.append(sock)
    sock.bind(str(path))
    sock.listen()
    (tmp_path / "link").symlink_to(tmp_path)

    for asked in (str(path), str(tmp_path / "link" / "api.sock")):
        found = peers.listener("unix", asked)
        assert found is not None and found.pid == os.getpid() and found.inode == inode_of(sock)


def test_an_accepted_connection_is_not_a_second_listener(peers, sockets, tmp_path) -> None:
    path = str(tmp_path / "api.sock")
    server = socket.socket(socket.AF_UNIX)
    sockets.append(server)
    server.bind(path)
    server.listen()
    client = socket.socket(socket.AF_UNIX)
    sockets.append(client)
    client.connect(path)
    accepted, _ = server.accept()
    sockets.append(accepted)  # /proc/net/unix shows it with the listener's path

    found = peers.listener("unix", path)

    assert found is not None and found.inode == inode_of(server)


def test_an_abstract_unix_listener_and_a_bound_datagram_socket(peers, sockets, tmp_path):
    name = f"depfence-test-{os.getpid()}"
    stream = socket.socket(socket.AF_UNIX)
    sockets.append(stream)
    stream.bind(f"\0{name}")
    stream.listen()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sockets.append(dgram)
    dgram.bind(str(tmp_path / "log.sock"))

    abstract = peers.listener("unix", f"@{name}")
    datagram = peers.listener("unix", str(tmp_path / "log.sock"))

    assert abstract is not None and abstract.inode == inode_of(stream)
    assert datagram is not None and datagram.inode == inode_of(dgram)


def test_a_path_nobody_listens_on(peers, sockets, tmp_path) -> None:
    bound_only = socket.socket(socket.AF_UNIX)
    sockets.append(bound_only)
    bound_only.bind(str(tmp_path / "not-listening.sock"))

    assert peers.listener("unix", str(tmp_path / "nothing.sock")) is None
    assert peers.listener("unix", str(tmp_path / "not-listening.sock")) is None
    assert peers.listener("unix", "@depfence-nobody-here") is None


# --- another process ----------------------------------------------------------------------


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A child process listening on 127.0.0.1; it exits when its stdin closes."""
    argv = [sys.executable, "-c", CHILD_LISTENER]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # the child we started, by its Popen
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_a_listener_in_another_process(peers, child) -> None:
    proc, port = child
    expected = shlex.join([sys.executable, "-c", CHILD_LISTENER])

    found = peers.listener("tcp", LOOPBACK4, port)
    from_candidates = LocalPeers().listener("tcp", LOOPBACK4, port, candidates=[proc.pid])

    assert found is not None and from_candidates is not None
    assert (found.pid, found.cmdline) == (proc.pid, expected)
    assert from_candidates == found


# --- a fake /proc: what the kernel cannot be made to show ---------------------------------

UDP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"


def udp6_row(address: str, port: int, inode: int) -> str:
    """A /proc/net/udp6 row: the address as four 32-bit words in host byte order."""
    packed = ipaddress.IPv6Address(address).packed
    words = [packed[i : i + 4] for i in range(0, 16, 4)]
    host = "".join((w[::-1] if sys.byteorder == "little" else w).hex().upper() for w in words)
    zero = "0" * 32
    return (
        f"   0: {host}:{port:04X} {zero}:0000 07 00000000:00000000 00:00000000 00000000"
        f"     0        0 {inode} 2 0000000000000000 0\n"
    )


def fake_process(proc: Path, pid: int, argv: list[str], cgroup: str, fds: dict[str, str]):
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / str(pid) / "cgroup").write_text(f"0::{cgroup}\n")
    for fd, target in fds.items():
        (proc / str(pid) / "fd" / fd).symlink_to(target)


@pytest.fixture
def fake_proc(tmp_path) -> Path:
    """Pid 1 (systemd) and pid 812 (squid) hold one UDP socket on fd00::2 port 3128."""
    proc = tmp_path / "proc"
    net = proc / "thread-self" / "net"
    net.mkdir(parents=True)
    (net / "udp").write_text(UDP_HEADER)
    (net / "udp6").write_text(UDP_HEADER + udp6_row("fd00::2", 3128, 4242))
    fake_process(proc, 1, ["/sbin/init"], "/init.scope", {"40": "socket:[4242]"})
    fake_process(
        proc,
        812,
        ["squid", "-f", "/etc/squid/squid.conf"],
        "/system.slice/squid.service",
        {"0": "/dev/null", "7": "socket:[4242]"},
    )
    return proc


def test_the_service_is_named_not_systemd_holding_its_socket(fake_proc) -> None:
    found = LocalPeers(str(fake_proc)).listener("udp", "fd00::2", 3128)

    assert found == LocalListener(
        812, "squid -f /etc/squid/squid.conf", "/system.slice/squid.service", "squid.service", 4242
    )
    assert found.describe() == "pid 812 squid -f /etc/squid/squid.conf (unit squid.service)"


def test_a_holder_that_let_go_is_looked_up_again(fake_proc) -> None:
    peers = LocalPeers(str(fake_proc))
    assert peers.listener("udp", "fd00::2", 3128).pid == 812  # type: ignore[union-attr]

    (fake_proc / "812" / "fd" / "7").unlink()

    found = peers.listener("udp", "fd00::2", 3128)
    assert found is not None and (found.pid, found.unit) == (1, "init.scope")


def test_a_socket_no_process_holds(fake_proc) -> None:
    (fake_proc / "812" / "fd" / "7").unlink()
    (fake_proc / "1" / "fd" / "40").unlink()

    found = LocalPeers(str(fake_proc)).listener("udp", "fd00::2", 3128)

    assert found == LocalListener(None, None, None, None, 4242)
    assert found.describe() == "socket inode 4242, no process holds it"


# --- which destinations are local ---------------------------------------------------------


def non_lo_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses of interfaces other than lo, as pyroute2 (not the module) sees them."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return [
            ipaddress.ip_address(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
            for msg in ipr.get_addr()
            if names.get(msg["index"]) != "lo"
        ]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.5", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_local(peers, address) -> None:
    assert peers.is_local(ipaddress.ip_address(address))


def test_the_unspecified_address_is_local(peers) -> None:
    assert peers.is_local(ipaddress.ip_address("0.0.0.0"))
    assert peers.is_local(ipaddress.ip_address("::"))


def test_lab_and_documentation_addresses_are_not_local_here(peers) -> None:
    for text in ("10.77.1.1", "fd77::1", "192.0.2.200", "2001:db8::200"):
        address = ipaddress.ip_address(text)
        if address in non_lo_addresses():
            pytest.skip(f"{address} is on an interface of this machine")
        assert not peers.is_local(address), text


def test_an_address_of_an_interface_is_local(peers) -> None:
    addresses = [a for a in non_lo_addresses() if not a.is_link_local]
    if not addresses:
        pytest.skip("no interface but lo has an address here")
    for address in addresses:
        assert peers.is_local(address), address


NETNS_CHECK = """
import ipaddress, json, socket
from pyroute2 import IPRoute
from pytest_depfence.local import LocalPeers

def add(ipr, ifname, address, prefixlen):
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=index, state="up")
    ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=0x02)  # NODAD

peers = LocalPeers()
is_local = lambda text: peers.is_local(ipaddress.ip_address(text))
with IPRoute() as ipr:
    add(ipr, "lo", "10.77.1.1", 24)
    add(ipr, "lo", "fd77::1", 64)
    ipr.link("add", ifname="v0", kind="veth", peer="v1")
    add(ipr, "v0", "10.88.0.1", 24)
    before = is_local("10.88.0.1"), is_local("10.77.1.1"), is_local("fd77::1")
    add(ipr, "v0", "10.88.0.2", 24)  # after the cache was filled: a miss reloads it
    after = is_local("10.88.0.2"), is_local("10.88.0.3"), is_local("127.0.0.1")
print(json.dumps([before, after]))
"""


@needs_root
def test_lab_addresses_on_lo_are_not_local_but_a_new_veth_address_is() -> None:
    argv = ["unshare", "--net", "--", sys.executable, "-c", NETNS_CHECK]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if "veth" in proc.stderr and proc.returncode:
        pytest.skip(f"no veth here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr

    before, after = json.loads(proc.stdout)

    assert before == [True, False, False]
    assert after == [True, False, True]


@needs_root
def test_tables_are_read_in_the_calling_threads_namespace(sockets) -> None:
    # The lab enters its namespace per thread; /proc/net would show the main thread's.
    port = listening(sockets, socket.AF_INET, "127.0.0.1", SO_REUSEADDR=1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(udp)
    udp.bind(("127.0.0.1", 0))
    seen: list[object] = []

    def in_a_fresh_namespace() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            seen.append(OSError(ctypes.get_errno(), "unshare"))
            return
        peers = LocalPeers()
        seen.append(peers.listener("tcp", LOOPBACK4, port))
        seen.append(peers.listener("udp", LOOPBACK4, udp.getsockname()[1]))

    thread = threading.Thread(target=in_a_fresh_namespace)
    thread.start()
    thread.join()

    assert seen == [None, None]
    assert LocalPeers().listener("udp", LOOPBACK4, udp.getsockname()[1]) is not None


# --- text -----------------------------------------------------------------------------------


def test_describe_names_the_unit_else_the_cgroup() -> None:
    squid = LocalListener(
        812, "squid -f /etc/squid/squid.conf", "/system.slice/squid.service", "squid.service", 9
    )
    assert squid.describe() == "pid 812 squid -f /etc/squid/squid.conf (unit squid.service)"
    plain = LocalListener(40, "python3 -m http.server", "/x/y", None, 9)
    assert plain.describe() == "pid 40 python3 -m http.server (cgroup /x/y)"
    bare = LocalListener(40, None, None, None, 9)
    assert bare.describe() == "pid 40"
    assert LocalListener(None, None, None, None, 9).describe() == (
        "socket inode 9, no process holds it"
    )


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("/system.slice/docker.service", "docker.service"),
        ("/user.slice/user-0.slice/session-3.scope", "session-3.scope"),
        ("/system.slice/docker.socket", "docker.socket"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope", "app-x.scope"),
        ("/depfence/x", None),
        ("/", None),
    ],
)
def test_unit_of_a_cgroup_path(cgroup, unit) -> None:
    assert unit_of(cgroup) == unit
