"""A run's lifetime: everything it started dies with it, its cgroup goes, and the process I/O holds.

Daemons are watched through a pidfd opened while the run is held open by a
FIFO gate, so "it is dead afterwards" cannot be fooled by a reused pid.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers_cgroup import cgroup_of

from pytest_depfence import CommandFailed
from pytest_depfence.cgroup import CgroupTree
from pytest_depfence.render import COMMAND_FAILED

if TYPE_CHECKING:
    from pytest_depfence import Fence

if os.geteuid() != 0:
    pytest.skip("fenced runs need root (cgroups, eBPF)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
SLACK = 3.0  # seconds a run may take beyond its timeout to kill, reap and clean up


def session_runs() -> list[Path]:
    session = CgroupTree().session
    return sorted(p for p in session.iterdir() if p.is_dir()) if session.exists() else []


def exited(pidfd: int, within: float = 5.0) -> bool:
    """Whether the pidfd's process has exited (a pidfd polls readable from then on).

    The run's cgroup reports empty as the last task leaves it, which can be a
    moment before that task is a zombie; so wait for the exit, with a bound.
    """
    return bool(select.select([pidfd], [], [], within)[0])


# Each starts a sleeper that leaves the script's process tree (pid to the "pids"
# FIFO), waits for "go", then exits without waiting for it. The test reads the
# sleeper's cgroup from outside (the fence's cgroup namespace shows it as `/`).
# "main-thread-exited": a process whose main thread has gone (pthread_exit) while another
# runs on, which cgroup.kill passes over (6.18).
LEADER_EXITS = (
    "import ctypes, os, sys, threading, time; "
    "threading.Thread(target=time.sleep, args=(1000,)).start(); "
    "open(sys.argv[1], 'w').write(f'{os.getpid()}\\n'); "
    "ctypes.CDLL(None).pthread_exit(None)"
)
DAEMONISE = {
    "setsid": 'setsid sh -c \'echo $$ > "$0"; exec sleep 1000\' "$1" &',
    "double-fork": '( sh -c \'echo $$ > "$0"; exec sleep 1000\' "$1" & ) ;',
    "main-thread-exited": f'python3 -c "{LEADER_EXITS}" "$1" &',
}


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("how", list(DAEMONISE))
def test_daemonised_grandchild_dies_with_the_run(
    fenced: Fence, fifo: Callable[[str], Fifo], how: str
) -> None:
    pids, go = fifo("pids"), fifo("go")
    script = f'{DAEMONISE[how]} read x < "$2"; exit 0'
    pidfd = -1
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(
                fenced.run, ["sh", "-c", script, "sh", str(pids), str(go)], timeout=60
            )
            try:
                daemon = int(pids.read_line())
                pidfd = os.pidfd_open(daemon)
                assert not exited(pidfd, within=0), "the daemon died before the run ended"
                cgroup = cgroup_of(daemon)
            finally:
                go.write_line()
            result = future.result(timeout=60)
        assert result.returncode == 0, result.stderr
        assert not result.timed_out
        assert exited(pidfd), f"pid {daemon} (sleep 1000, {how}) outlived the run"
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    assert cgroup.parent == CgroupTree().session
    assert not cgroup.exists()


@pytest.mark.no_egress("github.com")
def test_a_script_ending_its_process_group_ends_only_its_own(fenced: Fence) -> None:
    """`trap 'kill 0' EXIT` ends a script's background jobs with it: the process group
    it signals is its own, not the test runner's (which this test would not outlive)."""
    result = fenced.run(["sh", "-c", "sleep 1000 & trap 'kill 0' EXIT; echo started"], check=False)
    assert result.stdout == "started\n"
    # The shell's own status: its SIGTERM (dash 0.5.12), or 0 (0.5.11 ends its trap first).
    assert result.returncode in (0, -signal.SIGTERM)


@pytest.mark.no_egress("github.com")
def test_timeout_kills_the_run_and_leaves_nothing(fenced: Fence) -> None:
    timeout = 0.5
    start = time.monotonic()
    result = fenced.run(["sleep", "1000"], timeout=timeout, check=False)
    elapsed = time.monotonic() - start

    assert result.timed_out
    assert result.returncode == -signal.SIGKILL
    assert timeout <= elapsed < timeout + SLACK
    assert session_runs() == []


@pytest.mark.no_egress("github.com")
def test_timeout_also_kills_what_the_script_started(
    fenced: Fence, fifo: Callable[[str], Fifo]
) -> None:
    pids = fifo("pids")
    script = 'sleep 1000 & echo $! > "$0"; wait'
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(fenced.run, ["sh", "-c", script, str(pids)], timeout=1.0, check=False)
        child = int(pids.read_line())
        pidfd = os.pidfd_open(child)
        try:
            result = future.result(timeout=30)
            assert result.timed_out
            assert exited(pidfd)
        finally:
            os.close(pidfd)
    assert session_runs() == []


@pytest.mark.no_egress("github.com")
def test_input_is_passed_on_stdin(fenced: Fence) -> None:
    result = fenced.run(["cat"], input="line one\nline two\n", timeout=30)
    assert (result.returncode, result.stdout) == (0, "line one\nline two\n")

    raw = fenced.run(["wc", "-c"], input=b"\x00\xff" * 40000, timeout=30)
    assert raw.stdout.strip() == "80000"


@pytest.mark.no_egress("github.com")
def test_stdin_is_empty_without_input(fenced: Fence) -> None:
    start = time.monotonic()
    result = fenced.run(["cat"], timeout=10)

    assert not result.timed_out, "cat waited for input: stdin is not empty"
    assert (result.returncode, result.stdout) == (0, "")
    assert time.monotonic() - start < SLACK


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP], ids=lambda s: s.name
)
def test_killed_by_a_signal_reports_a_negative_returncode(fenced: Fence, signum: int) -> None:
    if signal.getsignal(signum) == signal.SIG_IGN:
        # Under nohup: ignored from here down, and a shell cannot undo that (POSIX).
        pytest.skip(f"{signal.Signals(signum).name} is ignored here, so by the fenced shell")
    result = fenced.run(f"kill -{int(signum)} $$", timeout=30, check=False)
    assert result.returncode == -signum
    assert not result.timed_out


@pytest.mark.no_egress("github.com")
def test_exit_status_and_output_are_reported(fenced: Fence) -> None:
    result = fenced.run("echo out; echo err >&2; exit 7", timeout=30, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")


@pytest.mark.no_egress("github.com")
def test_a_failing_teardown_step_skips_none_of_the_others(
    fenced: Fence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain that fails (as against a silent upstream) must still let every other step
    run: the background job killed, the cgroup removed, the fence ready for the next run."""
    fenced.open()
    proxy = fenced._proxy
    assert proxy is not None

    def failing_drain(timeout: float = 5.0) -> None:  # stands in for a drain that times out
        raise TimeoutError("the drain failed (stand-in)")

    monkeypatch.setattr(proxy, "drain", failing_drain)
    with pytest.raises(TimeoutError, match="stand-in"):
        fenced.run(["sh", "-c", "sleep 1000 & echo started"])
    assert session_runs() == []  # removed, so nothing ran in it any more
    monkeypatch.undo()
    result = fenced.run(["sh", "-c", "echo again"])
    assert result.stdout == "again\n"
    assert session_runs() == []


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize(
    ("script", "how"),
    [
        ("echo doomed >&2; exit 3", "exited with 3"),
        ("kill -TERM $$", f"was killed by signal {int(signal.SIGTERM)}"),
    ],
    ids=["exit", "signal"],
)
def test_check_raises_when_the_command_fails(fenced: Fence, script: str, how: str) -> None:
    with pytest.raises(CommandFailed) as info:
        fenced.run(script, timeout=30)
    assert str(info.value).splitlines()[0] == COMMAND_FAILED.format(command=script, how=how)
    assert info.value.returncode != 0
    if "doomed" in script:
        assert "  doomed" in str(info.value).splitlines()
    assert fenced.results[-1].returncode == info.value.returncode  # still on record


@pytest.mark.no_egress("github.com")
def test_check_raises_at_the_timeout(fenced: Fence) -> None:
    with pytest.raises(CommandFailed, match="timed out after 0.5 s"):
        fenced.run(["sleep", "1000"], timeout=0.5)
    assert session_runs() == []
