"""Nothing outlives a fence: not after a crash, not after the whole session.

A session that dies by SIGKILL cannot clean up, so the design relies on its
guardian (pytest_depfence/guardian.py): it holds copies of the session's
bpf_links, kills and removes the session's cgroups when the owner is gone, and
only then lets the links go; every fence open also sweeps sessions whose owner
is gone. `test_nothing_left_behind` runs after
every other test of the session (conftest moves it last) and checks the
result of everything before it.

Other pytest sessions may be fencing on this machine at the same time; their
live session directories are theirs, and are left out of the checks.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers_cgroup import cgroup_of

import pytest_depfence
from pytest_depfence.cgroup import PARENT, cgroup2_mount, session_name, sweep_stale
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel.toolkit import ATTACH_TYPES

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fence cleanup needs root (cgroups, eBPF)", allow_module_level=True)
BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"
if not os.access(BPFTOOL, os.X_OK):
    pytest.skip("these tests need bpftool (apt-get install bpftool)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
SOURCE_ROOT = Path(pytest_depfence.__file__).resolve().parent.parent

# A session that opens a fence, parks `sleep 1000` in it, and is then killed.
CRASHING_SESSION = """\
import sys
from pytest_depfence import Fence, Policy

ready, upstream = sys.argv[1], sys.argv[2]
# The fenced script reports its pid, then becomes `sleep 1000`.
script = 'echo "$$" > "$0"; exec sleep 1000'
with Fence(Policy.no_egress("github.com"), upstream=upstream) as fence:
    fence.run(["sh", "-c", script, ready])
"""


def attached(path: Path, *, tree: bool = False, effective: bool = False) -> Any:
    """`bpftool cgroup show PATH` (programs; `effective`: its ancestors' too) or `bpftool
    cgroup tree PATH` (cgroup entries)."""
    done = subprocess.run(
        [BPFTOOL, "-j", "cgroup", "tree" if tree else "show", str(path)]
        + (["effective"] if effective else []),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip() or "[]")  # no program: an empty line, not []


def owner_alive(session_dir: Path) -> bool:
    """Whether the process that owns a session directory (`<pid>-<start time>`) still runs."""
    pid = session_dir.name.partition("-")[0]
    return pid.isdigit() and session_name(int(pid)) == session_dir.name


def exited(pidfd: int, within: float = 10.0) -> bool:
    return bool(select.select([pidfd], [], [], within)[0])


def test_crashed_session_leaves_nothing_attached_and_is_swept(
    lab: Lab, fifo: Callable[[str], Fifo], tmp_path: Path
) -> None:
    ready = fifo("ready")
    script = tmp_path / "crashing_session.py"
    script.write_text(CRASHING_SESSION)
    log = tmp_path / "session.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
    }
    # Started from the test's thread, so the session lives in the lab as well.
    with log.open("wb") as log_file:
        session = subprocess.Popen(
            [sys.executable, str(script), str(ready), lab.upstream],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    pidfd = -1
    try:
        try:
            sleeper_pid = ready.read_line(timeout=120)
        except TimeoutError:
            session.kill()
            session.wait()
            pytest.fail(f"the session never became ready:\n{log.read_text()}")
        pidfd = os.pidfd_open(int(sleeper_pid))
        run_cgroup = cgroup_of(int(sleeper_pid))  # read from outside the fence's namespace
        session_dir = run_cgroup.parent
        assert session_dir.name.startswith(f"{session.pid}-")
        names = {p["name"] for p in attached(run_cgroup, effective=True)}
        assert {"connect4", "sendmsg4", "recvmsg4", "egress"} <= names  # the live fence

        session.kill()  # the session only, by its pid: it gets no chance to clean up
        assert session.wait(timeout=30) == -9

        # Its guardian kills what the session fenced and removes its cgroups (only then
        # does it let go of the links it held, so nothing ran unfenced in between).
        assert exited(pidfd), f"the crashed session's sleep 1000 (pid {sleeper_pid}) survived"
        deadline = time.monotonic() + 5
        while session_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # polling a directory the guardian removes; bounded
        assert not session_dir.exists()
        assert not owner_alive(session_dir)
        # And a sweep, as the next fence open runs it, finds nothing left of it.
        assert session_dir not in sweep_stale(cgroup2_mount() / PARENT)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        if pidfd >= 0:
            os.close(pidfd)


def test_nothing_left_behind() -> None:
    """After every other test: no run cgroup, no stale session, no program attached but
    the fence's own, to this live session's directory (linked once, till this process exits).

    Needs no lab: it only reads the cgroup tree and asks bpftool.
    """
    try:
        parent = cgroup2_mount() / PARENT
    except FenceUnavailable as exc:
        pytest.skip(f"no cgroup v2 mount, so no fence ran: {exc}")
    if not parent.exists():
        return  # the last session to leave removes the shared parent: nothing is left
    mine = parent / session_name()
    sessions = [p for p in parent.iterdir() if p.is_dir()]
    others_live = [p for p in sessions if p != mine and owner_alive(p)]

    assert [p for p in sessions if p != mine and p not in others_live] == [], "stale sessions"
    if mine.exists():
        assert [p.name for p in mine.iterdir() if p.is_dir()] == [], "run cgroups left behind"

    def ours(cgroup: str) -> bool:
        return not any(Path(cgroup).is_relative_to(p) for p in others_live)

    programs = {
        entry["cgroup"]: [p["name"] for p in entry.get("programs", [])]
        for entry in attached(parent, tree=True)
        if ours(entry["cgroup"]) and entry.get("programs")
    }
    own = programs.pop(str(mine), None)
    assert programs == {}, "programs still attached"
    if own is not None:
        assert sorted(own) == sorted(ATTACH_TYPES), f"{mine} has programs not the fence's"
