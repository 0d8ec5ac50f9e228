"""The process that really sent a packet: not the socket's owner, not the program it became.

Three ways a query used to be named after the wrong process:
- a child writing on a UDP socket its parent connected (the socket's owner is the
  parent): named by the child where cgroup_skb programs can read the current task
  (6.10+; bpf/egress.c), and the test skips elsewhere, saying so;
- a sender that execs the moment its query is out: named by the program that sent
  it, whatever its pid runs by the time userspace looks (bpf/procs.c keeps the
  record an exec replaces; `Programs.process(pid, at_ns)`);
- a raw socket (`fence(raw_sockets=True)`): its owner is recorded when it is made
  (bpf/sockcreate.c), so a refused ping and a DNS query built by hand are named by
  the program that sent them (test_backstop.py checks the rest of raw sockets).

Each sender prints its own pid; each test checks the exact pid and command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

from pytest_depfence import Policy, render, run
from pytest_depfence.kernel import load, progload, toolkit

if TYPE_CHECKING:
    from conftest import Fifo

    from pytest_depfence import EgressEvent, Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)

PY = sys.executable
# A DNS query for github.com/A with id 0x1234, as it goes on the wire.
GITHUB_A = "1234010000010000000000000667697468756203636f6d0000010001"
LAB_DNS = "10.77.0.53"
GITHUB = "10.77.1.1"
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def github_events(result: FenceResult) -> list[EgressEvent]:
    events = [e for e in result.events if e.domain == "github.com"]
    assert events, f"no github.com event; events: {result.events}"
    for event in events:
        assert event.unattributed is None, event.unattributed
        assert (event.verdict, event.forbidden) == ("blocked", True)
    return events


def skb_reads_current_task() -> bool:
    return progload.has_helper(toolkit.PROG_TYPE_CGROUP_SKB, toolkit.BPF_FUNC_GET_CURRENT_PID_TGID)


# --------------------------------------------------------------------------- a shared socket

# The child: writes the query on the socket it inherited (fd in argv[1]), reads the answer.
CHILD = """\
import os,socket,sys
print(os.getpid(),sys.argv[1],flush=True)
s=socket.socket(fileno=int(sys.argv[1]))
s.send(bytes.fromhex(sys.argv[2]));s.settimeout(5);s.recv(512)
"""
# The parent: connects a UDP socket to the lab resolver (the fence redirects it to its
# proxy; the parent is the socket's owner) and sends nothing on it itself.
PARENT = """\
import os,socket,subprocess,sys
print(os.getpid(),flush=True)
s=socket.socket(2,2);s.connect(('10.77.0.53',53));f=s.fileno()
subprocess.run([sys.executable,'-c',sys.argv[1],str(f),sys.argv[2]],pass_fds=[f],check=True)
"""


@pytest.mark.no_egress("github.com")
def test_a_child_writing_on_its_parents_connected_socket_is_named(fenced: Fence) -> None:
    if not skb_reads_current_task():
        pytest.skip(
            "this kernel's cgroup_skb programs cannot read the current task (6.10+): "
            "a datagram is named by its socket's owner, the parent"
        )
    argv = [PY, "-c", PARENT, CHILD, GITHUB_A]
    result = fenced.run(argv, timeout=30, check=False)

    assert result.returncode == 0, result.stderr
    parent, child, fd = (int(word) for word in result.stdout.split())
    [event] = github_events(result)
    assert event.blocked_at == "dns"
    assert (event.pid, event.cmdline) == (child, shlex.join([PY, "-c", CHILD, str(fd), GITHUB_A]))
    assert event.ancestry == ((parent, shlex.join(argv)),)
    assert event.by_socket is False  # the sender itself, not the socket's owner


# A TCP query: its segments may leave from softirq or from whichever process releases
# the socket, so the kernel names the socket's owner, and the report says so.
TCP_QUERY = (
    "import os,socket\nprint(os.getpid(),flush=True)\nq=bytes.fromhex('"
    f"{GITHUB_A}')\ns=socket.create_connection(('{LAB_DNS}',53))\n"
    "s.send(bytes([0,len(q)])+q);s.settimeout(5);s.recv(512)"
)


@pytest.mark.no_egress("github.com")
def test_a_tcp_query_is_named_by_its_sockets_owner(fenced: Fence) -> None:
    argv = [PY, "-c", TCP_QUERY]
    result = fenced.run(argv, timeout=30, check=False)

    assert result.returncode == 0, result.stderr
    [pid] = (int(line) for line in result.stdout.split())
    [event] = github_events(result)
    assert (event.pid, event.cmdline, event.by_socket) == (pid, shlex.join(argv), True)
    assert f"{render.SOCKET_OWNER}pid {pid}  {shlex.join(argv)}" in render.format_event(event)[1]


# --------------------------------------------------------------------------- exec after send

# What the sender becomes: says its pid and its argument (the sender's socket port),
# then waits for go.
AFTER_EXEC = 'echo "$$ $0" > "$1"; read x < "$2"'
# argv: ready FIFO, go FIFO, the resolver's port. Says ready, waits for go, sends the
# query for github.com to the lab resolver (port 53: redirected to the fence's proxy;
# another: judged in the kernel, dropped) and at once becomes `sh -c AFTER_EXEC`.
SEND_THEN_EXEC = """\
import os,socket,sys
ready,go,port=sys.argv[1],sys.argv[2],int(sys.argv[3])
open(ready,'w').write('ready\\n')
open(go).readline()
s=socket.socket(2,2)
try:s.sendto(bytes.fromhex(QUERY),(RESOLVER,port))
except OSError:pass
os.execv('/bin/sh',['sh','-c',AFTER,str(s.getsockname()[1]),ready,go])
"""


@pytest.mark.parametrize("port", [53, 5353], ids=["via-proxy", "past-proxy"])
def test_a_sender_that_execs_right_after_its_query_is_named_by_what_sent_it(
    fences: Callable[..., Fence], fifo: Callable[[str], Fifo], tmp_path: Path, port: int
) -> None:
    fence = fences(Policy.no_egress("github.com"))
    programs = load()
    script = tmp_path / "send_then_exec.py"
    script.write_text(
        f"QUERY={GITHUB_A!r}\nRESOLVER={LAB_DNS!r}\nAFTER={AFTER_EXEC!r}\n" + SEND_THEN_EXEC
    )
    ready, go = fifo("ready"), fifo("go")
    argv = [PY, str(script), str(ready), str(go), str(port)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(fence.run, argv, check=False, timeout=60)
        assert ready.read_line() == "ready"
        # Past the proxy, the query's event comes from the kernel's ring buffer: its
        # delivery (and the reading of the sender's record) is held until the sender has
        # exec'd, the case a record overwritten at exec got wrong.
        held = programs._events_lock if port != 53 else contextlib.nullcontext()
        try:
            with held:
                go.write_line()
                pid, client_port = (int(word) for word in ready.read_line().split())
                after = programs.process(pid)
                assert after is not None
                assert after.argv == ("sh", "-c", AFTER_EXEC, str(client_port), str(ready), str(go))
                if port == 53:
                    # However late the proxy's side looks, the flow entry says when the query
                    # left, and the record that held then is the sender's.
                    assert fence._proxy is not None
                    client = ("127.0.0.1", client_port)
                    owner = programs.flow_owner("udp", fence._proxy.port, client, 0x1234)
                    assert owner is not None and owner.pid == pid
                    then = programs.process(pid, owner.time_ns)
                    assert then is not None and then.argv == tuple(argv)
        finally:
            go.write_line()
        result = future.result()

    assert result.returncode == 0, result.stderr
    [event] = github_events(result)
    assert (event.pid, event.cmdline) == (pid, shlex.join(argv))
    assert event.blocked_at == ("dns" if port == 53 else "packet")
    assert event.by_socket is not skb_reads_current_task()


# --------------------------------------------------------------------------- raw sockets

# A DNS query for github.com built by hand, UDP header and all, on a raw IPPROTO_UDP
# socket to the lab resolver: no connect() nor UDP sendmsg() hook sees it.
RAW_DNS = (
    """\
import os,socket,struct
print(os.getpid(),flush=True)
q=bytes.fromhex('%s')
s=socket.socket(2,socket.SOCK_RAW,socket.IPPROTO_UDP)
try:s.sendto(struct.pack('!HHHH',40053,53,8+len(q),0)+q,('10.77.0.53',0))
except PermissionError:print('refused')
"""
    % GITHUB_A
)


@pytest.mark.no_egress("github.com")
@pytest.mark.fence(raw_sockets=True)
def test_a_dns_query_on_a_raw_socket_is_dropped_and_named(fenced: Fence, tmp_path: Path) -> None:
    # From a file: a `-c` argument longer than the kernel keeps (abi.ARGLEN) is completed
    # from /proc only while the process lives, and this one may be gone by then.
    script = tmp_path / "raw_dns.py"
    script.write_text(RAW_DNS)
    argv = [PY, str(script)]
    result = fenced.run(argv, timeout=30, check=False)

    assert result.returncode == 0, result.stderr
    pid, refused = result.stdout.split()
    assert refused == "refused"  # the kernel dropped it (EPERM): the resolver never saw it
    [event] = github_events(result)
    assert (event.blocked_at, event.outage, event.protocol) == ("packet", "dropped", "udp")
    assert (event.address, event.port, event.qtype) == (LAB_DNS, 53, "A")
    assert (event.pid, event.cmdline) == (int(pid), shlex.join(argv))


@pytest.mark.no_egress("github.com")
@pytest.mark.fence(raw_sockets=True)
def test_ping_to_a_blocked_address_is_named_as_ping(fenced: Fence) -> None:
    if not shutil.which(PING[0]):
        pytest.skip("this test needs ping (apt-get install iputils-ping)")
    ping = [*PING, "-4", "-c1", "-W1", GITHUB]
    result = fenced.run(
        ["/bin/sh", "-c", 'echo $$; exec "$@"', "sh", *ping], timeout=30, check=False
    )

    assert result.returncode != 0, result.stdout  # no reply came back
    pid = int(result.stdout.split()[0])
    [event] = [e for e in result.violations if e.address == GITHUB]
    assert (event.blocked_at, event.protocol, event.domain) == ("packet", "icmp", "github.com")
    assert (event.pid, event.cmdline, event.unattributed) == (pid, shlex.join(ping), None)


# --------------------------------------------------------------------------- one port, two sockets

# argv: 4 or 6, the port, ready FIFO, go FIFO. A socket of that IP version bound to the
# port (an IPv6-only one can share it with an IPv4 one) sends the query for github.com
# with id 0x1234 to the lab resolver's port 53, says "VERSION PID" and waits for go.
SAME_PORT = """\
import os, socket, sys
version, port, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if version == "6":
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", port))
    s.sendto(bytes.fromhex(QUERY), ("fd77::53", 53))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.sendto(bytes.fromhex(QUERY), (RESOLVER, 53))
with open(ready, "w") as out:
    out.write(f"{version} {os.getpid()}\\n")
open(go).readline()
"""


def test_two_sockets_on_one_port_and_one_dns_id_are_each_named(
    fences: Callable[..., Fence], fifo: Callable[[str], Fifo], tmp_path: Path
) -> None:
    """The proxy tells the two apart by the listener each reaches (IPv4 or IPv6); so
    must the kernel's flow map, or the later query names the sender of the earlier."""
    fence = fences(Policy.no_egress("github.com"))
    programs = load()
    script = tmp_path / "same_port.py"
    script.write_text(f"QUERY={GITHUB_A!r}\nRESOLVER={LAB_DNS!r}\n" + SAME_PORT)
    ready, go = fifo("ready"), fifo("go")
    port = 40053
    both = f"{PY} {script} 4 {port} {ready} {go} & {PY} {script} 6 {port} {ready} {go}; wait"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(fence.run, ["sh", "-c", both], check=False, timeout=60)
        try:
            pids = dict(ready.read_line().split() for _ in range(2))
            assert fence._proxy is not None
            for version, host in (("4", "127.0.0.1"), ("6", "::1")):
                owner = programs.flow_owner("udp", fence._proxy.port, (host, port), 0x1234)
                assert owner is not None and owner.pid == int(pids[version]), version
        finally:
            go.write_line()
            go.write_line()
        result = future.result()
    assert sorted(e.pid for e in github_events(result)) == sorted(int(p) for p in pids.values())


# argv: the lab resolver. One UDP socket, connected: the process asks github.com with id
# 0x4242, forks, and the child asks mirror.internal on the same socket with the same id.
# Prints "PARENT CHILD".
SHARED = """\
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
s.send(bytes.fromhex(QUERY))
child = os.fork()
if child == 0:
    s.send(bytes.fromhex(QUERY)[:12] + bytes.fromhex(MIRROR))
    os._exit(0)
os.waitpid(child, 0)
print(os.getpid(), child)
"""
#: mirror.internal/A's question, as it goes on the wire.
MIRROR_QUESTION = "066d6972726f7208696e7465726e616c0000010001"


def ask_twice(
    fences: Callable[..., Fence], tmp_path: Path, code: str
) -> tuple[FenceResult, dict[str, EgressEvent]]:
    """Runs `code` (it asks github.com, then mirror.internal with the same id) fenced:
    the result, and the event of each name."""
    fence = fences(Policy.no_egress("github.com"))
    script = tmp_path / "asker.py"
    script.write_text(f"QUERY={GITHUB_A!r}\nMIRROR={MIRROR_QUESTION!r}\n" + code)
    result = fence.run([PY, str(script), LAB_DNS], check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    asked = {e.domain: e for e in result.events if e.domain in ("github.com", "mirror.internal")}
    assert set(asked) == {"github.com", "mirror.internal"}, result.events
    return result, asked


@pytest.mark.skipif(
    not skb_reads_current_task(), reason="before 6.10 a datagram names its socket's owner"
)
def test_two_processes_asking_with_one_socket_and_one_id_name_neither_wrongly(
    fences: Callable[..., Fence], tmp_path: Path
) -> None:
    result, asked = ask_twice(fences, tmp_path, SHARED)
    parent, child = (int(pid) for pid in result.stdout.split())
    assert asked["github.com"].pid in (parent, None)
    # The child's query came second: its flow entry says two processes used the key.
    assert asked["mirror.internal"].pid is None
    assert asked["mirror.internal"].unattributed == run.CLASH


# argv: the lab resolver. One connected UDP socket: asks github.com with id 0x4242, then
# execs a program that asks mirror.internal on that socket with the same id.
SEND_EXEC_SEND = """\
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
s.send(bytes.fromhex(QUERY))
os.set_inheritable(s.fileno(), True)
then = "import socket, sys; socket.socket(fileno=int(sys.argv[1])).send(bytes.fromhex(sys.argv[2]))"
os.execv(sys.executable, [sys.executable, "-c", then, str(s.fileno()),
                          QUERY[:24] + MIRROR])
"""


def test_a_query_and_one_with_its_id_after_an_exec_never_name_the_later_program(
    fences: Callable[..., Fence], tmp_path: Path
) -> None:
    result, asked = ask_twice(fences, tmp_path, SEND_EXEC_SEND)
    assert asked["github.com"].cmdline in (f"{PY} {tmp_path / 'asker.py'} {LAB_DNS}", None)
    assert asked["mirror.internal"].unattributed == run.CLASH
