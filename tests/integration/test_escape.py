"""No way out of the fence: no cgroup move, no raw sockets by default, no holding the run open.

- A fenced command runs in a cgroup namespace rooted at its fence cgroup, on a cgroup2
  hierarchy with nsdelegate: a root process writing its pid into a cgroup.procs
  outside the fence (named through the host's own mount) gets ENOENT from the kernel,
  stays fenced, and its next connect to github.com's address is refused and named.
  The fence also turns on favordynmods where the kernel has it, keeping nsdelegate.
- CAP_NET_RAW is gone from every capability set unless the test opts in
  (`fence(raw_sockets=True)`, `Fence(raw_sockets=True)`, `depfence run --raw-sockets`):
  ping, AF_PACKET and raw IP sockets fail with EPERM. test_backstop.py covers what
  happens to the raw packets of a fence that allows them.
- A process outside the fence that holds the command's output pipes cannot keep
  `run()` past its deadline: the readers get `OUTPUT_GRACE` seconds, then stop.

Lab addresses: github.com 10.77.1.1, mirror.internal 10.77.3.1.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers_cgroup import cgroup_of
from helpers_net import skip_or_fail

from pytest_depfence import Fence, Policy, confine, statmount
from pytest_depfence.cgroup import CgroupTree, cgroup2_mount
from pytest_depfence.output import OUTPUT_GRACE

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced runs need root (cgroups, eBPF)", allow_module_level=True)
if shutil.which("curl") is None:
    pytest.skip("these tests need curl (apt-get install curl)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
#: Seconds a run may take beyond its timeout and OUTPUT_GRACE: start, kill, reap, clean
#: up (under the VM lane's emulation a whole run takes about a second).
SLACK = {"timeout": 0.5, "exit": 2.0}
GITHUB, MIRROR = "10.77.1.1", "10.77.3.1"
CAP_NET_RAW = 13
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
#: iputils' ping when installed, else busybox's (scripts/bootstrap.sh installs busybox).
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]

CURL = ["curl", "-sS", "-m", "5", f"http://{GITHUB}/"]

# Tries to move itself into each cgroup directory given (printing the errno), reports
# its pid and waits for "go" on the FIFOs $PIDS and $GO, then becomes curl github.com.
ESCAPE = f"""\
import errno, os, sys
pid = str(os.getpid())
def view():
    return [line for line in open("/proc/self/cgroup").read().splitlines() if line[:3] == "0::"][0]
print(view())
for target in sys.argv[1:]:
    try:
        with open(os.path.join(target, "cgroup.procs"), "w") as procs:
            procs.write(pid)
        print("moved", target)
    except OSError as exc:
        print("refused", target, errno.errorcode[exc.errno])
print(view(), flush=True)
with open(os.environ["PIDS"], "w") as pids:
    pids.write(pid + "\\n")
with open(os.environ["GO"]) as go:
    go.readline()
os.execvp("curl", {CURL!r})
"""

# Opens a packet socket and a raw IP socket (sends nothing); prints each one's errno or null.
SOCKETS = """\
import json, socket
kinds = {
    "packet": (socket.AF_PACKET, socket.SOCK_RAW),
    "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP),
    "inet-packet": (socket.AF_INET, 10, 0x300),  # SOCK_PACKET: the kernel makes a packet socket
    "xdp": (44, socket.SOCK_RAW, 0),  # AF_XDP
}
outcome = {}
for name, args in kinds.items():
    try:
        socket.socket(*args).close()
        outcome[name] = None
    except OSError as exc:
        outcome[name] = exc.errno
print(json.dumps(outcome))
"""
DENIED = {"packet": 1, "raw": 1, "inet-packet": 1, "xdp": 1}  # EPERM
GRANTED = {"packet": None, "raw": None, "inet-packet": None, "xdp": None}


@pytest.fixture
def outside() -> Iterator[Path]:
    """A cgroup outside every fence (beside the depfence tree), removed afterwards."""
    path = cgroup2_mount() / f"depfence-escape-test-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():  # only if a move got through
            (cgroup2_mount() / "cgroup.procs").write_text(pid)
        path.rmdir()


@pytest.fixture
def sockets_script(tmp_path: Path) -> list[str]:
    script = tmp_path / "sockets.py"
    script.write_text(SOCKETS)
    return [sys.executable, str(script)]


def net_raw(status: str) -> dict[str, bool]:
    """Whether CAP_NET_RAW is in each capability set of a /proc/<pid>/status text."""
    sets = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    return {name: bool(int(sets[name], 16) >> CAP_NET_RAW & 1) for name in CAP_SETS}


# --------------------------------------------------------------------------- cgroup moves


@pytest.mark.no_egress("github.com")
def test_a_fenced_root_process_cannot_move_itself_out(
    entry: str,
    fenced: Fence,
    lab: Lab,
    outside: Path,
    fifo: Callable[[str], Fifo],
    tmp_path: Path,
) -> None:
    # The host's real cgroup2 mount: its root, the fence's parent, a cgroup beside the tree.
    targets = [cgroup2_mount(), CgroupTree().session, outside]
    pids, go = fifo("pids"), fifo("go")
    script = tmp_path / "escape.py"
    script.write_text(ESCAPE)
    lab.clear_http_log()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            fenced.run,
            [sys.executable, str(script), *map(str, targets)],
            env={**os.environ, "PIDS": str(pids), "GO": str(go)},
            check=False,
            timeout=30,
        )
        try:
            pid = int(pids.read_line())
            seen_from_outside = cgroup_of(pid)
        finally:
            go.write_line()
        result = future.result(timeout=60)

    lines = result.stdout.splitlines()
    assert lines == ["0::/", *(f"refused {t} ENOENT" for t in targets), "0::/"], result.stderr
    assert seen_from_outside.parent == CgroupTree().session
    assert (outside / "cgroup.procs").read_text() == ""

    # Still fenced: the connect to github.com's address is refused and named.
    assert result.returncode == 7, result.stderr  # curl: could not connect
    assert [path for where, _, path in lab.http_log() if where == GITHUB] == []
    refused = [e for e in result.violations if e.address == GITHUB]
    assert [(e.domain, e.blocked_at, e.pid, e.cmdline) for e in refused] == [
        ("github.com", "connect", pid, shlex.join(CURL))
    ]
    assert (fenced._tools.enter is None) == (entry == "sh + unshare")


def test_an_open_fence_leaves_nsdelegate_on_and_favordynmods_on_where_the_kernel_has_it(
    fenced: Fence,
) -> None:
    # favordynmods (6.0+) spares each run's migration into its cgroup an RCU grace period
    # (confine.py); a kernel without it refuses it, and the refused remount must not
    # have taken nsdelegate with it.
    mount = confine.read_cgroup2_mount()
    assert mount is not None and mount.nsdelegate, mount
    release = tuple(int(part) for part in os.uname().release.split(".")[:2])
    assert mount.favordynmods == (release >= (6, 0)), (os.uname().release, mount)


def test_the_mount_check_asks_the_kernel_for_the_one_mount_where_it_can(fenced: Fence) -> None:
    # statmount(2) says what mountinfo says of the cgroup2 mount (superblock options;
    # mountinfo adds rw/ro), in a few microseconds; from Linux 6.11 it must be able to.
    mount = confine.read_cgroup2_mount()
    assert mount is not None
    found = statmount.super_options(statmount.mount_id(mount.path) or 0)
    release = tuple(int(part) for part in os.uname().release.split(".")[:2])
    assert (found is not None) == (release >= (6, 11)), (os.uname().release, found)
    if found is not None:
        assert found == ("cgroup2", tuple(o for o in mount.super_options if o not in ("rw", "ro")))


def test_nsdelegate_taken_off_between_two_opens_is_turned_on_again(fenced: Fence) -> None:
    # The fast check (statmount) must see a remount made after the last full read.
    mount = confine.read_cgroup2_mount()
    assert mount is not None and mount.nsdelegate
    # mount(2) itself: util-linux's `mount -o remount` would keep the options it finds on.
    flags, _ = mount.remount_request()
    options = ",".join(o for o in mount.super_options if o not in ("rw", "nsdelegate"))
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.fsencode(mount.path)
    assert libc.mount(b"cgroup2", path, b"cgroup2", flags, options.encode()) == 0, os.strerror(
        ctypes.get_errno()
    )
    try:
        off = confine.read_cgroup2_mount()
        assert off is not None and not off.nsdelegate, off
        with Fence(Policy.no_egress("github.com"), upstream="%s:%d" % fenced.upstream):
            again = confine.read_cgroup2_mount()
            assert again is not None and again.nsdelegate, again
    finally:  # by mount(2) again, not by the code under test
        now = confine.read_cgroup2_mount()
        if now is not None and not now.nsdelegate:
            assert confine._remount(now, "nsdelegate") is None


# --------------------------------------------------------------------------- CAP_NET_RAW


@pytest.mark.no_egress("github.com")
def test_no_cap_net_raw_in_a_default_fence(
    entry: str, fenced: Fence, sockets_script: list[str]
) -> None:
    status = fenced.run(["cat", "/proc/self/status"], timeout=30)
    assert net_raw(status.stdout) == dict.fromkeys(CAP_SETS, False)
    assert "CapEff:\t0000000000000000" not in status.stdout  # only CAP_NET_RAW went

    sockets = fenced.run(sockets_script, timeout=30)
    assert json.loads(sockets.stdout) == DENIED

    pinged = fenced.run([*PING, "-c1", "-W1", MIRROR], check=False, timeout=30)
    assert pinged.returncode != 0
    assert " bytes from " not in pinged.stdout
    said = pinged.stderr.lower()
    assert "not permitted" in said or "permission denied" in said, pinged.stderr


@pytest.mark.no_egress("github.com")
@pytest.mark.fence(raw_sockets=True)
def test_the_marker_gives_raw_sockets_back(
    entry: str, fenced: Fence, sockets_script: list[str]
) -> None:
    status = fenced.run(["cat", "/proc/self/status"], timeout=30)
    assert net_raw(status.stdout)["CapEff"] and net_raw(status.stdout)["CapBnd"]

    assert json.loads(fenced.run(sockets_script, timeout=30).stdout) == GRANTED
    pinged = fenced.run([*PING, "-c1", "-W1", MIRROR], timeout=30)
    assert " bytes from " in pinged.stdout, pinged.stderr


def test_the_library_takes_raw_sockets(
    lab: Lab, clean_env: None, sockets_script: list[str]
) -> None:
    for raw_sockets, expected in ((False, DENIED), (True, GRANTED)):
        with Fence(
            Policy.no_egress("github.com"), upstream=lab.upstream, raw_sockets=raw_sockets
        ) as fence:
            result = fence.run(sockets_script, timeout=30)
        assert json.loads(result.stdout) == expected, raw_sockets


def test_depfence_run_takes_raw_sockets(
    lab: Lab, clean_env: None, sockets_script: list[str], pytestconfig: pytest.Config
) -> None:
    from pytest_depfence.errors import FenceUnavailable
    from pytest_depfence.kernel import preflight

    try:
        preflight()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)
    # One run: each compiles the programs again (minutes under the VM lane's emulation);
    # the flag's absence is plan()'s default, which tests/unit/test_confine.py checks.
    cli = [sys.executable, "-m", "pytest_depfence.cli", "run", "--upstream", lab.upstream, "-q"]
    done = subprocess.run(
        [*cli, "--raw-sockets", "--", *sockets_script],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == GRANTED


# --------------------------------------------------------------------------- the deadline


class Holder:
    """Opens, from outside the fence, the write ends of a fenced process's stdout and
    stderr (as an escaped process or a service would hold them); closes them on
    `release()`, or after `limit` seconds, so a regression fails instead of hanging."""

    def __init__(self, ready: Fifo, go: Fifo, limit: float = 20.0) -> None:
        self.fds: list[int] = []
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(ready, go, limit), daemon=True)
        self._thread.start()

    def _hold(self, ready: Fifo, go: Fifo, limit: float) -> None:
        try:
            pid = int(ready.read_line())
            self.fds = [os.open(f"/proc/{pid}/fd/{n}", os.O_WRONLY) for n in (1, 2)]
        finally:
            go.write_line()
        self._released.wait(limit)
        self.release()

    def release(self) -> None:
        self._released.set()
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def output_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("depfence-stdout", "depfence-stderr")]


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("ends", ["timeout", "exit"])
def test_pipes_held_outside_the_fence_do_not_hold_the_run(
    fenced: Fence, fifo: Callable[[str], Fifo], ends: str
) -> None:
    ready, go = fifo("ready"), fifo("go")
    last = "exec sleep 1000" if ends == "timeout" else "echo after"
    script = f'echo before; echo $$ > "$0"; read x < "$1"; {last}'
    holder = Holder(ready, go)
    try:
        start = time.monotonic()
        result = fenced.run(["sh", "-c", script, str(ready), str(go)], check=False, timeout=2)
        elapsed = time.monotonic() - start
        assert holder.fds, "the holder never opened the pipes"
    finally:
        holder.release()

    assert result.timed_out is (ends == "timeout")
    timeout = 2 if ends == "timeout" else 0
    # Without the grace, run() would wait for the holder: 20 s.
    assert elapsed < timeout + OUTPUT_GRACE + SLACK[ends], f"run() took {elapsed:.1f}s"
    assert result.stdout == ("before\n" if ends == "timeout" else "before\nafter\n")
    assert output_threads() == [], "an output thread is still running"
