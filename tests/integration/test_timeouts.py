"""A script hanging on an unreachable dependency is killed at its timeout; the report says why.

The hang is real: outage "blackhole" lets github.com resolve and then drops
every packet to it, so `curl` without a timeout of its own waits in connect()
for minutes. The run's timeout must kill everything in the run's cgroup, say
it timed out, and still name the blocked egress attempt that caused the hang
and the command line behind it.

The script reports its pids through a FIFO (`fifo` fixture); the test opens a
pidfd for each while they run, so "it is dead afterwards" cannot be fooled by a
reused pid, and reads the run's cgroup from outside (inside the fence's cgroup
namespace it is `/`).
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from helpers_cgroup import cgroup_of

from pytest_depfence import EgressViolation
from pytest_depfence.render import TIMED_OUT

if TYPE_CHECKING:
    from pytest_depfence import Fence

if os.geteuid() != 0:
    pytest.skip("fenced runs need root (cgroups, eBPF)", allow_module_level=True)
if shutil.which("curl") is None:
    pytest.skip("these tests need curl (apt-get install curl)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
TIMEOUT = 1.0
SLACK = 2.0  # seconds a run may take beyond its timeout to kill, reap and clean up
CURL = ["curl", "-sS", "http://github.com/"]  # no -m: it would wait for minutes
GITHUB = ("10.77.1.1", "fd77::1:1")

# Reports the shell's pid, starts the hanging curl in the background, reports its
# pid, and waits for it.
HANGS = f'echo "$$" > "$0"; {shlex.join(CURL)} & echo "$!" > "$0"; wait'


def exited(pidfd: int, within: float = 5.0) -> bool:
    """Whether the pidfd's process has exited (a pidfd polls readable from then on)."""
    return bool(select.select([pidfd], [], [], within)[0])


@pytest.mark.no_egress("github.com")
@pytest.mark.fence(outage="blackhole")
def test_hanging_dependency_is_killed_at_the_timeout(
    fenced: Fence, fifo: Callable[[str], Fifo]
) -> None:
    pids = fifo("pids")
    argv = ["sh", "-c", HANGS, str(pids)]
    pidfds: dict[int, int] = {}
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            start = time.monotonic()
            future = pool.submit(fenced.run, argv, check=False, timeout=TIMEOUT)
            shell = pids.read_line()
            cgroup = cgroup_of(int(shell))
            curl = int(pids.read_line())
            for pid in (int(shell), curl):
                pidfds[pid] = os.pidfd_open(pid)
                assert not exited(pidfds[pid], within=0), f"pid {pid} ended before the timeout"
            result = future.result(timeout=30)
            elapsed = time.monotonic() - start

        assert result.timed_out
        assert result.returncode == -signal.SIGKILL
        assert TIMEOUT <= elapsed < TIMEOUT + SLACK
        for pid, pidfd in pidfds.items():
            assert exited(pidfd), f"pid {pid} survived the run's timeout"
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)
    assert cgroup.name and not cgroup.exists(), f"the run's cgroup {cgroup} is still there"

    # What it hung on: github.com, resolved, then its packets dropped; asked by curl.
    connects = [e for e in result.violations if e.address is not None and e.protocol == "tcp"]
    assert connects, f"no blackholed connect recorded; events: {result.events}"
    for event in connects:
        assert (event.domain, event.outage) == ("github.com", "blackhole")
        assert (event.verdict, event.blocked_at) == ("blocked", "packet")
        assert event.address in GITHUB
        assert (event.pid, event.cmdline) == (curl, shlex.join(CURL))
        assert event.ancestry == ((int(shell), shlex.join(argv)),)


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize(
    "how",
    [
        pytest.param("marker", marks=pytest.mark.fence(outage="blackhole", timeout=TIMEOUT)),
        pytest.param("run", marks=pytest.mark.fence(outage="blackhole")),
    ],
)
def test_timed_out_run_fails_naming_the_dependency_it_waited_for(fenced: Fence, how: str) -> None:
    start = time.monotonic()
    with pytest.raises(EgressViolation) as info:
        if how == "marker":
            fenced.run(CURL)
        else:
            fenced.run(CURL, timeout=TIMEOUT)
    elapsed = time.monotonic() - start

    assert elapsed < TIMEOUT + SLACK
    text = str(info.value)
    headline = text.splitlines()[0]
    assert headline.endswith(shlex.join(CURL) + TIMED_OUT.format(seconds=TIMEOUT)), headline
    assert "github.com" in text
    assert f"pid {info.value.violations[0].pid}  {shlex.join(CURL)}" in text
    connects = [v for v in info.value.violations if v.address is not None and v.protocol == "tcp"]
    assert connects
    assert {(v.domain, v.outage, v.cmdline) for v in connects} == {
        ("github.com", "blackhole", shlex.join(CURL))
    }
