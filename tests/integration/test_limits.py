"""CPU, memory and pids limits (`fence(memory=, cpus=, pids=)`), enforced by the kernel.

Each test runs the real thing a runaway deploy script does — allocate past the
limit, fork without end, spin — and asserts what the kernel did and what the
result says. The limits sit where this machine has the controllers: in the
fence cgroup on pure cgroup v2 (the VM lanes), in v1 cgroups the command joins
as well on a hybrid host (this one); `limit_file` reads them from the fenced
process's own /proc/PID/cgroup, whichever it is. After every test nothing of
the limits is left: no run directory in either hierarchy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_owner_death import exited, gone_by, owners, session_of, wait_line  # noqa: F401 - owners: a fixture

from pytest_depfence import Fence, Policy
from pytest_depfence.cgroup import PARENT, cgroup2_mount
from pytest_depfence.errors import LimitExceeded
from pytest_depfence.limits import v1_mounts

if TYPE_CHECKING:
    from conftest import Fifo

    from pytest_depfence.lab import Lab
    from pytest_depfence.service import Service

POLICY = Policy.no_egress("github.com")
#: Allocates 256 MiB, touching every page, then says it survived.
HOG = "x = bytearray(256 << 20); print('survived')"
#: Forks children (each sleeps) until a fork fails, then prints how many it made.
FORK_BOMB = """\
import os, time
made = 0
while made < 10000:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    made += 1
print(made, flush=True)
"""
#: Spins for one second of wall time; prints the CPU seconds it got.
SPIN = """\
import time
start, cpu = time.monotonic(), time.process_time()
while time.monotonic() - start < 1.0:
    pass
print(time.process_time() - cpu)
"""


@pytest.fixture
def limited(fences: Callable[..., Fence]) -> Iterator[Callable[..., Fence]]:
    """Open fences with limits (`limited(memory="64M")`); closed here at teardown, and
    then nothing of their limits may be left in either hierarchy."""
    opened: list[Fence] = []

    def make(**limits: Any) -> Fence:
        opened.append(fences(POLICY, label="limits", **limits))
        return opened[-1]

    yield make
    for fence in opened:
        fence.close()
    left = [p for root in hierarchies() for p in root.glob(f"{PARENT}/*/limits-*")]
    assert left == [], f"limit cgroups left behind: {left}"


def hierarchies() -> list[Path]:
    return [cgroup2_mount(), *set(v1_mounts().values())]


def limit_file(pid: int, v1_name: str, v2_name: str) -> Path:
    """A limit file of the cgroup that holds `pid` for its controller: the v1 one when the
    controller is a v1 hierarchy here, else the fence cgroup's v2 file."""
    controller = {"memory.limit_in_bytes": "memory", "cpu.cfs_quota_us": "cpu"}.get(v1_name, "pids")
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return v1_mounts()[controller] / path.lstrip("/") / v1_name
    v2 = next(line.split("::", 1)[1] for line in lines if line.startswith("0::"))
    return cgroup2_mount() / v2.lstrip("/") / v2_name


def test_a_script_past_its_memory_limit_is_oom_killed_and_named(
    limited: Callable[..., Fence],
) -> None:
    fence = limited(memory="64M")

    result = fence.run(["python3", "-c", HOG], check=False)

    assert result.returncode == -signal.SIGKILL
    assert "survived" not in result.stdout
    assert result.oom_killed and result.usage.oom_kills == 1
    ((pid, cmdline),) = result.usage.oom_victims
    assert pid > 0 and "python3 -c" in cmdline and "bytearray(256 << 20)" in cmdline
    assert result.usage.peak_memory is None or result.usage.peak_memory <= 64 << 20
    assert "depfence" not in Path("/proc/self/cgroup").read_text(), "the test itself is limited"
    with pytest.raises(LimitExceeded) as raised:
        fence.run(["python3", "-c", HOG])
    text = str(raised.value)
    assert "hit its memory limit (memory=64M): the kernel killed pid " in text
    assert "bytearray(256" in text and "(out of memory)" in text
    assert raised.value.returncode == -signal.SIGKILL


def test_a_child_oom_killed_fails_the_run_even_when_the_script_exits_0(
    limited: Callable[..., Fence],
) -> None:
    fence = limited(memory="64M")
    script = f"python3 -c {HOG!r}; echo script-went-on"

    result = fence.run(script, check=False)

    assert result.returncode == 0 and "script-went-on" in result.stdout
    assert result.oom_killed
    ((_, cmdline),) = result.usage.oom_victims  # python, not the shell that went on
    assert "python3 -c" in cmdline and "bytearray" in cmdline
    with pytest.raises(LimitExceeded, match=r"hit its memory limit \(memory=64M\)"):
        fence.run(script)


def test_fenced_services_have_the_limits_too(
    limited: Callable[..., Fence], fifo: Callable[[str], Fifo]
) -> None:
    fence = limited(memory="96M")

    service = started(fence, fifo("ready"))
    try:
        limit = limit_file(service.pid, "memory.limit_in_bytes", "memory.max")
        assert int(limit.read_text()) == 96 << 20, f"{limit}: the service's memory limit"
    finally:
        service.stop()


def started(fence: Fence, ready: Fifo) -> Service:
    """A fenced service that is in its cgroups (it said so through `ready`)."""
    service = fence.service(["/bin/sh", "-c", 'echo in > "$0"; exec sleep 60', str(ready)])
    assert ready.read_line() == "in"
    return service


def test_a_fork_bomb_is_stopped_by_the_pids_limit(limited: Callable[..., Fence]) -> None:
    fence = limited(pids=24)

    result = fence.run(["python3", "-c", FORK_BOMB], check=False, timeout=60)

    assert not result.timed_out, "the fork bomb was not stopped"
    made = int(result.stdout.split()[-1])
    assert 0 < made < 24, f"{made} forks under pids=24"
    assert result.usage.forks_refused >= 1
    assert not result.oom_killed
    with pytest.raises(LimitExceeded, match=r"hit its pids limit \(pids=24\): the kernel refused"):
        fence.run(["python3", "-c", FORK_BOMB], timeout=60)
    # Every sleeping child died with the run: the test's own processes can still fork.
    assert subprocess.run(["true"]).returncode == 0


def test_half_a_cpu_is_about_half_a_cpu(
    limited: Callable[..., Fence], fifo: Callable[[str], Fifo]
) -> None:
    fence = limited(cpus=0.5)
    service = started(fence, fifo("ready"))
    try:
        quota = limit_file(service.pid, "cpu.cfs_quota_us", "cpu.max").read_text().split()[0]
    finally:
        service.stop()

    result = fence.run(["python3", "-c", SPIN], check=True)

    assert int(quota) == 50_000
    share = float(result.stdout.split()[-1])
    # The cap is the kernel's promise; below it, a loaded machine may give the loop less.
    assert 0.02 < share < 0.65, f"a busy loop got {share:.2f} CPU-seconds of 1 s under cpus=0.5"
    assert result.usage.cpu_seconds is not None and result.usage.cpu_seconds >= share
    assert not result.usage.hit


def test_without_limits_the_run_reports_cpu_and_creates_nothing_else(
    limited: Callable[..., Fence],
) -> None:
    fence = limited()

    result = fence.run(["python3", "-c", SPIN.replace("1.0", "0.2")], check=True)

    assert result.usage.cpu_seconds is not None and result.usage.cpu_seconds > 0.1
    assert result.usage.peak_memory is None and not result.usage.hit
    assert fence.limits.controllers() == []


# --------------------------------------------------------------------------- owner death

OWNER = """\
import sys
import time
from pytest_depfence import Fence, Policy

upstream, ready = sys.argv[1:3]
with Fence(Policy.no_egress("github.com"), upstream=upstream, memory="64M", pids=64) as fence:
    fence.run(["/bin/sh", "-c", 'echo $$ > "$0"; exec sleep 1000', ready], check=False)
"""


def test_the_owners_death_leaves_no_limit_cgroup(
    lab: Lab,
    fifo: Callable[[str], Fifo],
    owners: Callable[..., Any],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    ready = fifo("ready")
    owner = owners(sys.executable, "-c", OWNER, lab.upstream, str(ready))
    script = int(wait_line(ready, owner, tmp_path))
    session = session_of(owner.pid)
    sessions = [root / PARENT / session.name for root in hierarchies()]
    assert int(limit_file(script, "memory.limit_in_bytes", "memory.max").read_text()) == 64 << 20
    pidfd = os.pidfd_open(script)
    try:
        owner.kill()
        assert exited(pidfd, within=10), "the fenced script outlived its owner"
    finally:
        os.close(pidfd)
    owner.wait(timeout=30)
    deadline = time.monotonic() + 10
    left = [s for s in sessions if gone_by(s, deadline) is None]
    assert left == [], f"left behind by the dead owner's guardian: {left}"
