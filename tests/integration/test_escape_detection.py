"""A fenced process moved out of its fence is an event, a violation, and killed.

bpf/escape.c sees every cgroup move (cgroup:cgroup_attach_task), whoever makes it:

- a fenced shell that writes its own pid into the root cgroup's cgroup.procs and
  then curls github.com never gets a 200: either the move is refused (a fence whose
  command runs in a cgroup namespace), or the kernel kills the shell in that write
  and the run names it; the same after nsenter into this test's cgroup namespace
  (as root may do from a fence's own: /proc/1/ns/cgroup, which a container may not
  let us open);
- a fenced `sleep 1000` moved to the root cgroup by this test process (outside the
  fence) is dead within a second, and the run names it, its parent and this process,
  in block mode (EgressViolation) and in audit mode (recorded) alike;
- a child that a fenced process starts in the root cgroup with
  clone3(CLONE_INTO_CGROUP) is killed before it runs (x86-64) and named, or the
  clone is refused (the cgroup namespace): never a 200 either;
- a move within the fence (the script into a sub-cgroup it made, or its child into
  another one) is no event, and nothing is killed;
- a fenced process that takes CAP_NET_RAW back through a user namespace
  (`unshare -Urn`) and makes a packet or raw IP socket (whose frames pass below
  every hook of the fence) is killed on its way back from socket(), before it can
  use it, and named, in block and audit mode; with raw_sockets=True it is not.

Lab address: github.com 10.77.1.1.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_depfence.cgroup import PARENT, cgroup2_mount
from pytest_depfence.errors import EgressViolation
from pytest_depfence.judge import MOVED_ITSELF, RAW_SOCKET_TAKEN, STARTED_BY

if TYPE_CHECKING:
    from pytest_depfence import EgressEvent, Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("fenced runs need root (cgroups, eBPF)", allow_module_level=True)
if shutil.which("curl") is None:
    pytest.skip("these tests need curl (apt-get install curl)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
GITHUB = "10.77.1.1"
NO_GITHUB = pytest.mark.no_egress("github.com")
CURL_ARGV = ["curl", "-s", "-m2", "-o", "/dev/null", "-w", "%{http_code}", f"http://{GITHUB}/"]
CURL = f'curl -s -m2 -o /dev/null -w "%{{http_code}}" http://{GITHUB}/'


def own_cgroup_sh() -> str:
    """Shell: sets $own to the directory of the shell's cgroup (found by its pid in the
    fence tree: inside a cgroup namespace /proc/self/cgroup reads `0::/`)."""
    procs = f"$(find {cgroup2_mount() / PARENT} -name cgroup.procs)"
    return f'own=$(grep -lx "$$" {procs} | sed "s,/cgroup.procs$,,")\n'


def escapes(events: tuple[EgressEvent, ...] | list[EgressEvent]) -> list[EgressEvent]:
    return [e for e in events if e.is_escape]


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, reading
        return True


def dead_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_exec(pid: int, argv: list[str], seconds: float = 10.0) -> None:
    """Until `pid` runs `argv`: `$!` names the child before it has exec'd."""
    deadline = time.monotonic() + seconds
    want = "\0".join(argv).encode() + b"\0"
    while True:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read() == want:
                return
        assert time.monotonic() < deadline, f"pid {pid} never ran {argv}"
        time.sleep(0.01)


def kill_if_alive(pid: int) -> None:
    """A process this test made must not outlive it, whatever the fence did."""
    if pid and not gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it died on its own in between


# --------------------------------------------------------------------------- moved by itself


NSENTER = pytest.mark.skipif(
    shutil.which("nsenter") is None or shutil.which("setpriv") is None,
    reason="needs util-linux nsenter and setpriv",
)


@pytest.fixture
def outside_without_capabilities() -> Iterator[int]:
    """A root process outside the fence with no capability at all: a fenced command (no
    CAP_SYS_PTRACE) may open its namespaces, as it may not the owner's or init's."""
    proc = subprocess.Popen(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "sleep", "1000"])
    try:
        wait_exec(proc.pid, ["sleep", "1000"])
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@NO_GITHUB
@pytest.mark.parametrize(
    "way", ["plain", pytest.param("outer", marks=NSENTER)],
    ids=["plain", "from-the-outer-cgroup-namespace"],
)  # fmt: skip
def test_a_process_moving_itself_out_never_reaches_github(
    fenced: Fence, way: str, request: pytest.FixtureRequest
) -> None:
    how = "sh -c"
    if way == "outer":
        pid = request.getfixturevalue("outside_without_capabilities")
        how = f"nsenter --cgroup=/proc/{pid}/ns/cgroup sh -c"
    move = f"echo $$ > {cgroup2_mount()}/cgroup.procs; {CURL}"
    result = fenced.run(f"{how} '{move}'", check=False, timeout=30)

    assert "200" not in result.stdout, "the shell left the fence and reached github.com"
    moved = escapes(result.events)
    if not moved:  # refused: the fence's cgroup namespace; curl ran fenced and was refused
        assert result.stderr, "the shell says the move failed"
        assert any(e.address == GITHUB for e in result.violations), result.violations
        return
    (event,) = moved
    assert event in result.violations
    assert (event.address, event.rule, event.moved_by) == ("/", MOVED_ITSELF, None)
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "cgroup", "killed")
    assert event.cmdline is not None and "cgroup.procs" in event.cmdline, event
    # Killed in its write to cgroup.procs: curl never ran.
    assert result.stdout == "", result


@NSENTER
@NO_GITHUB
def test_a_fenced_process_may_not_enter_the_owners_cgroup_namespace(fenced: Fence) -> None:
    """The owner (and init) hold capabilities a fenced command lacks (CAP_SYS_PTRACE):
    their namespaces are closed to it, the first step of leaving the fence's. (6.x
    refuses the open, Permission denied; 5.10 lets it open and refuses the setns.)"""
    result = fenced.run(
        f"nsenter --cgroup=/proc/{os.getpid()}/ns/cgroup sh -c 'echo entered'", check=False
    )
    assert result.returncode != 0 and "entered" not in result.stdout
    assert "nsenter:" in result.stderr, result.stderr


# --------------------------------------------------------------------------- born outside

# clone3(CLONE_INTO_CGROUP) into the cgroup directory argv[1]; the child execs argv[2:]
# and the parent prints its pid. Refused: says why and execs argv[2:] itself (fenced).
CLONE_INTO = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
# struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal (SIGCHLD), stack,
# stack_size, tls, set_tid, set_tid_size, cgroup
args = (ctypes.c_uint64 * 11)(0x200000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, fd)
pid = libc.syscall(435, args, ctypes.sizeof(args))
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
if pid < 0:
    print("refused:", os.strerror(ctypes.get_errno()), file=sys.stderr, flush=True)
    os.execvp(sys.argv[2], sys.argv[2:])
os.waitpid(pid, 0)
print(pid)
"""


@pytest.mark.skipif(
    platform.machine() != "x86_64", reason="a child born outside is caught on x86-64 only"
)
@NO_GITHUB
def test_a_child_started_outside_the_fence_never_reaches_github(
    fenced: Fence, tmp_path: Path
) -> None:
    script = tmp_path / "clone_into.py"
    script.write_text(CLONE_INTO)
    root = cgroup2_mount()
    argv = [sys.executable, str(script), str(root), *CURL_ARGV]
    result = fenced.run(argv, check=False, timeout=30)

    assert "200" not in result.stdout, "a child started outside the fence reached github.com"
    born = escapes(result.events)
    if not born:  # refused: the fence's cgroup namespace; curl ran fenced and was refused
        assert "refused:" in result.stderr, result
        assert any(e.address == GITHUB for e in result.violations), result.violations
        return
    (event,) = born
    child, parent = int(result.stdout), event.moved_by
    assert (event.pid, event.address) == (child, f"id:{os.stat(root).st_ino}")
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "cgroup", "killed")
    assert event.rule is not None and event.rule.startswith(
        STARTED_BY.format(mover=f"pid {parent} {sys.executable} {script}")
    )
    assert event.cmdline is not None and str(script) in event.cmdline  # it never ran curl
    assert event in result.violations


# --------------------------------------------------------------------------- moved by another


def run_in_background(
    fenced: Fence, script: str | list[str], check: bool, timeout: float = 30
) -> Any:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fenced.run, script, check=check, timeout=timeout)
    pool.shutdown(wait=False)
    return future


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("block", marks=pytest.mark.fence(mode="block")),
        pytest.param("audit", marks=pytest.mark.fence(mode="audit")),
    ],
)
@NO_GITHUB
def test_a_process_moved_out_by_another_is_killed_at_once_and_named(
    fenced: Fence, fifo: Any, mode: str
) -> None:
    ready, go = fifo("ready"), fifo("go")
    future = run_in_background(fenced, f"sleep 1000 & echo $! > {ready}; read x < {go}", check=True)
    pid = 0
    try:
        pid = int(ready.read_line())
        wait_exec(pid, ["sleep", "1000"])
        (cgroup2_mount() / "cgroup.procs").write_text(str(pid))
        assert dead_within(pid, 1.0), "the sleep moved out of the fence is still running"
    finally:
        go.write_line()
        kill_if_alive(pid)

    if mode == "block":
        with pytest.raises(EgressViolation) as raised:
            future.result()
        violations = raised.value.violations
        assert "cgroup /" in str(raised.value) and "sleep 1000" in str(raised.value)
    else:
        violations = future.result().violations
    (event,) = escapes(violations)
    assert (event.pid, event.cmdline, event.address) == (pid, "sleep 1000", "/")
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "cgroup", "killed")
    assert event.moved_by == os.getpid()
    assert event.rule is not None and f"by pid {os.getpid()} " in event.rule
    assert [cmdline for _, cmdline in event.ancestry][:1] == [
        f"/bin/sh -c 'sleep 1000 & echo $! > {ready}; read x < {go}'"
    ]


# A fenced process escape.c must still know as one when it is moved: one whose main thread
# has exited while another runs on (a process until its last thread exits), and one that
# started before more processes than the kernel keeps records of (`live` is not an LRU).
# Each writes its pid to $1.
STILL_FENCED = {
    "main-thread-exited": (
        'python3 -c "import ctypes, os, sys, threading, time; '
        "threading.Thread(target=time.sleep, args=(1000,)).start(); "
        "open(sys.argv[1], 'w').write(f'{os.getpid()}\\\\n'); "
        'ctypes.CDLL(None).pthread_exit(None)" "$1" &'
    ),
    # A subshell each (a fork of dash): 1.2 s here, about 20 s under the VM lane's TCG.
    "after-5000-processes": (
        'sleep 1000 & s=$!; i=0; while [ $i -lt 5000 ]; do (:); i=$((i+1)); done; echo $s > "$1";'
    ),
}


@pytest.mark.parametrize("how", list(STILL_FENCED))
@NO_GITHUB
def test_a_process_moved_out_is_known_as_fenced_however_it_lives(
    fenced: Fence, fifo: Any, how: str
) -> None:
    ready, go = fifo("ready"), fifo("go")
    script = f'{STILL_FENCED[how]} read x < "$2"'
    future = run_in_background(
        fenced, ["sh", "-c", script, "sh", str(ready), str(go)], check=False, timeout=300
    )
    pid = 0
    try:
        pid = int(ready.read_line(timeout=300))
        (cgroup2_mount() / "cgroup.procs").write_text(str(pid))
        assert dead_within(pid, 1.0), f"pid {pid} ({how}) moved out of the fence is still running"
    finally:
        go.write_line()
        kill_if_alive(pid)
    (event,) = escapes(future.result().violations)
    assert (event.pid, event.outage, event.moved_by) == (pid, "killed", os.getpid())


# --------------------------------------------------------------------------- within the fence


@NO_GITHUB
def test_a_move_within_the_fence_is_no_event(fenced: Fence, fifo: Any) -> None:
    from pytest_depfence.kernel import load

    ready, go = fifo("ready"), fifo("go")
    script = (
        "set -e\n"
        + own_cgroup_sh()
        + f"""\
mkdir "$own/sub" "$own/sub2"
echo $$ > "$own/sub/cgroup.procs"
sleep 1000 &
child=$!
echo $child > "$own/sub2/cgroup.procs"
echo $child > {ready}
read x < {go}
kill -0 $child && echo alive
kill $child
"""
    )
    future = run_in_background(fenced, script, check=True)
    pid = 0
    try:
        pid = int(ready.read_line())
        wait_exec(pid, ["sleep", "1000"])
        load().consume_events()  # whatever the kernel reported of that move is handled now
        assert not gone(pid), "a process moved within its fence was killed"
    finally:
        go.write_line()  # the script checks its child is alive, then ends it
    try:
        result: FenceResult = future.result()
    finally:
        kill_if_alive(pid)  # only after the script is done with it

    assert (result.returncode, result.stdout) == (0, "alive\n"), result
    assert escapes(result.events) == []


# --------------------------------------------------------------------------- raw sockets back

# Makes the socket argv[1] names, then says so: the fence must kill it before it can.
RAW_SOCKET = """\
import socket, sys
kinds = {
    "packet": (socket.AF_PACKET, socket.SOCK_RAW),
    "raw": (socket.AF_INET, socket.SOCK_RAW, 17),
    "inet-packet": (socket.AF_INET, 10, 0x300),  # SOCK_PACKET, ETH_P_ALL: a packet socket
    "xdp": (44, socket.SOCK_RAW, 0),  # AF_XDP
    "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0),
}
s = socket.socket(*kinds[sys.argv[1]])
print("made", sys.argv[1], flush=True)
"""
USERNS = ["unshare", "--user", "--map-root-user", "--net"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.parametrize(
    ("kind", "made", "mode"),
    [
        ("packet", "AF_PACKET/SOCK_RAW", "block"),
        ("raw", "AF_INET/SOCK_RAW", "block"),
        ("inet-packet", "AF_INET/SOCK_PACKET", "block"),
        ("xdp", "AF_XDP/SOCK_RAW", "block"),
        ("packet", "AF_PACKET/SOCK_RAW", "audit"),
    ],
)
def test_a_raw_socket_taken_back_through_a_user_namespace_is_killed_and_named(
    fences: Any, kind: str, made: str, mode: str
) -> None:
    from pytest_depfence import Policy

    fence = fences(Policy.no_egress("github.com"), mode=mode)
    argv = [*USERNS, sys.executable, "-c", RAW_SOCKET, kind]
    result = fence.run(argv, check=False, timeout=30)

    assert "made" not in result.stdout, "a fenced process kept a raw socket"
    assert result.returncode == -signal.SIGKILL, result
    (event,) = escapes(result.events)
    assert (event.protocol, event.address, event.blocked_at) == ("socket", made, "socket")
    assert (event.verdict, event.outage, event.moved_by) == ("blocked", "killed", None)
    assert event.rule == RAW_SOCKET_TAKEN.format(socket=made)
    assert event.cmdline is not None and event.cmdline.startswith(sys.executable + " -c ")
    assert event in result.violations


@NO_GITHUB
def test_a_netlink_raw_socket_is_no_raw_socket(fenced: Fence) -> None:
    """SOCK_RAW of AF_NETLINK needs no CAP_NET_RAW (curl opens one): it is not killed."""
    result = fenced.run([sys.executable, "-c", RAW_SOCKET, "netlink"], timeout=30)
    assert "made netlink" in result.stdout
    assert not escapes(result.events)
    curl = fenced.run(["curl", "-sS", "-m5", "-o", "/dev/null", "http://mirror.internal/"])
    assert curl.returncode == 0 and not escapes(curl.events)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_fence_that_allows_raw_sockets_lets_a_user_namespace_make_them(fences: Any) -> None:
    from pytest_depfence import Policy

    fence = fences(Policy.no_egress("github.com"), raw_sockets=True)
    for kind in ("packet", "raw"):
        result = fence.run([*USERNS, sys.executable, "-c", RAW_SOCKET, kind], timeout=30)
        assert f"made {kind}" in result.stdout
        assert not escapes(result.events)
