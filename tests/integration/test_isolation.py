"""Fences are apart from each other and from everything outside them.

Two fences open at once (one loaded program set serves both) must each see
only their own queries; the test process itself, outside any fence, must
resolve through the lab as if no fence existed; and whatever a fenced script
starts stays fenced, including in a cgroup it makes below its own.

Runs are held open with FIFO gates (`fifo` fixture): the test waits for a
script's "ready" line and releases it with a "go" line, so the overlap the
test claims is certain, not a matter of timing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from dnslib import QTYPE, DNSRecord
from helpers_cgroup import OWN_CGROUP_SH

if TYPE_CHECKING:
    from pytest_depfence import Fence, FenceResult
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
_missing = [t for t in ("getent", "dig") if not shutil.which(t)]
if _missing:
    pytest.skip(f"these tests need {', '.join(_missing)}", allow_module_level=True)

Fifo = Any  # conftest.Fifo
DIG = ["dig", "+time=2", "+tries=1"]

# Holds the run open around its query: ready, wait for go, ask, say so, wait for done.
GATED = (
    'echo $$; echo ready > "$1"; read x < "$2"; getent hosts "$0"; echo asked > "$1"; read x < "$2"'
)


def gated_run(fence: Fence, name: str, ready: Fifo, go: Fifo) -> FenceResult:
    return fence.run(["sh", "-c", GATED, name, str(ready), str(go)], check=False, timeout=60)


@pytest.mark.parametrize("same_policy", [False, True], ids=["two-policies", "same-policy"])
def test_two_concurrent_fences_keep_their_events_apart(
    fences: Callable[..., Fence], fifo: Callable[[str], Fifo], same_policy: bool
) -> None:
    from pytest_depfence import Policy

    names = {"a": "github.com", "b": "pypi.internal"}
    blocked = tuple(names.values()) if same_policy else None
    fence = {key: fences(Policy.no_egress(*(blocked or (name,)))) for key, name in names.items()}
    ready = {key: fifo(f"ready-{key}") for key in names}
    go = {key: fifo(f"go-{key}") for key in names}

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            key: pool.submit(gated_run, fence[key], names[key], ready[key], go[key])
            for key in names
        }
        try:
            # Both runs are live (both cgroups registered) before either asks anything,
            # and both have asked before either may finish.
            for step in ("ready", "asked"):
                for key in names:
                    assert ready[key].read_line() == step
                for key in names:
                    go[key].write_line()
        finally:
            for key in names:  # never leave a script blocked, whatever failed above
                go[key].write_line()
                go[key].write_line()
        results = {key: futures[key].result(timeout=60) for key in names}

    roots = {key: int(results[key].stdout.split()[0]) for key in names}
    assert roots["a"] != roots["b"]
    for key, name in names.items():
        result = results[key]
        assert result.returncode == 0, result.stderr
        assert result.domains == [name]
        assert result.violations and {v.domain for v in result.violations} == {name}
        for event in result.events:
            assert event.cmdline == f"getent hosts {name}"
            assert event.ancestry == (
                (roots[key], shlex.join(["sh", "-c", GATED, name, str(ready[key]), str(go[key])])),
            )


@pytest.mark.no_egress("github.com")
def test_the_test_process_resolves_normally_while_a_fence_runs(
    fenced: Fence, lab: Lab, fifo: Callable[[str], Fifo]
) -> None:
    ready, go = fifo("ready"), fifo("go")
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(gated_run, fenced, "github.com", ready, go)
        try:
            assert ready.read_line() == "ready"  # the fence's programs are attached now

            # Straight from this process: the lab's answer, not the fence's outage answer.
            reply = DNSRecord.parse(
                DNSRecord.question("github.com").send(lab.RESOLVER4, 53, timeout=10)
            )
            assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr] == [
                ("A", lab.address("github.com"))
            ]
            # From an unfenced child of this process.
            dig = subprocess.run(
                [*DIG, "+short", f"@{lab.RESOLVER4}", "github.com"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
            assert dig.stdout.split() == [lab.address("github.com")], dig.stderr
            go.write_line()
            assert ready.read_line() == "asked"
        finally:
            go.write_line()
            go.write_line()
        result = future.result(timeout=60)

    root = int(result.stdout.split()[0])
    assert result.returncode == 0, result.stderr
    assert result.domains == ["github.com"]
    assert result.events
    # Only the fenced getent's own queries; neither of ours leaked into the fence.
    for event in result.events:
        assert event.unattributed is None
        assert event.cmdline == "getent hosts github.com"
        assert event.ancestry[-1][0] == root


@pytest.mark.no_egress("github.com")
def test_a_sub_cgroup_of_the_fence_is_still_fenced(fenced: Fence, lab: Lab) -> None:
    # A service the script starts in its own cgroup (as systemd-run or a container would).
    argv = [*DIG, "+short", f"@{lab.RESOLVER4}", "github.com"]
    script = (
        f'{OWN_CGROUP_SH}sub=$own/service && mkdir "$sub" && '
        f'echo $$ > "$sub/cgroup.procs" && {shlex.join(argv)}; true'
    )
    result = fenced.run(["sh", "-c", script], check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    assert lab.address("github.com") not in result.stdout.split(), "the service reached github.com"
    assert [(e.domain, e.verdict, e.cmdline) for e in result.events] == [
        ("github.com", "blocked", shlex.join(argv))
    ]
