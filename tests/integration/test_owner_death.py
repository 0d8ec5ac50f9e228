"""When a fence's owner dies, nothing of the fence keeps running (pytest_depfence.guardian).

Owners here are child Pythons (or a whole inner pytest run) started from the
test's thread, so they and their fenced scripts live in the lab too: a script
the fence stopped guarding can reach the lab's github.com and nothing else,
and the lab's HTTP log shows it if it does. Guardians are found the way an
administrator would find them, by their command line in /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import pytest_depfence
from pytest_depfence import guardian
from pytest_depfence.cgroup import (
    PARENT,
    CgroupTree,
    cgroup2_mount,
    remove_tree,
    start_time,
)
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel.toolkit import ATTACH_TYPES

if TYPE_CHECKING:
    from pytest_depfence import Fence, Policy
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("owner-death tests need root (cgroups, eBPF)", allow_module_level=True)

Fifo = Any  # conftest.Fifo
SOURCE_ROOT = Path(pytest_depfence.__file__).resolve().parent.parent
#: What "within one second" allows, from the owner's SIGKILL.
BOUND = 1.0
#: How long an owner may take to compile the programs and start its script.
STARTUP = 120.0

# An owner: opens a fence in the lab and runs argv in it (the script gets the
# lab's upstream from the environment it inherits, nothing else).
OWNER = """\
import sys
from pytest_depfence import Fence, Policy

upstream, argv = sys.argv[1], sys.argv[2:]
with Fence(Policy.no_egress("github.com"), upstream=upstream) as fence:
    result = fence.run(argv, check=False)
print("returncode", result.returncode, flush=True)
"""

# A fenced script that keeps trying github.com over TCP, as fast as it can: it
# reports its pid once 20 attempts failed (the fence is on), then
# loops; each connect that succeeds is appended to ESCAPES and sends a request
# whose path carries TOKEN, so the lab's log shows it.
LOOPER = """\
import os, socket, sys
ready, address, token, escapes = sys.argv[1:5]
attempt = failed = 0
while True:
    attempt += 1
    try:
        with socket.create_connection((address, 80), timeout=1) as sock:
            with open(escapes, "a") as f:
                f.write(f"{attempt}\\n")
            request = f"GET /{token}/{attempt} HTTP/1.0\\r\\nHost: github.com\\r\\n\\r\\n"
            sock.sendall(request.encode())
            sock.recv(1)
    except OSError:
        failed += 1
    if failed == 20 and attempt == 20:
        with open(ready, "w") as f:
            f.write(f"{os.getpid()}\\n")
"""

# A fenced script that reports its pid, then waits for "go".
PARK = 'echo $$ > "$0"; read x < "$1"'


def owner_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    for name in ("CI", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY"):
        env.pop(name, None)  # an inner pytest run must not think it is a CI job
    return env


@pytest.fixture
def owners(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start owner processes (`owners(*argv)`, output to a log); any still running is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"owner-{len(started)}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=owner_env(),
                cwd=tmp_path,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def owner_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("owner-*.log")))


def guardians_of(owner: int) -> list[int]:
    """Live (not zombie) processes whose command line is this owner's guardian."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pytest_depfence.guardian" in argv:
            at = argv.index(b"pytest_depfence.guardian")
            if argv[at + 1 : at + 2] == [str(owner).encode()]:
                found.append(int(entry.name))
    return found


def exited(pidfd: int, within: float) -> bool:
    return bool(select.select([pidfd], [], [], within)[0])


def no_guardian_of(owner: int, within: float = BOUND) -> bool:
    """Whether the owner's guardian is gone, waiting up to `within` seconds for it to go."""
    deadline = time.monotonic() + within
    while guardians_of(owner):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def gone_by(path: Path, deadline: float) -> float | None:
    """When (monotonic) `path` was seen gone, polling until `deadline`; None if it stayed."""
    while True:
        now = time.monotonic()
        if not path.exists():
            return now
        if now >= deadline:
            return None
        time.sleep(0.005)


def wait_line(fifo: Fifo, owner: subprocess.Popen[bytes], tmp_path: Path) -> str:
    try:
        return str(fifo.read_line(timeout=STARTUP))
    except TimeoutError:
        owner.kill()
        owner.wait()
        pytest.fail(f"the owner's script never reported:\n{owner_log(tmp_path)}")


def session_of(owner: int) -> Path:
    return cgroup2_mount() / PARENT / f"{owner}-{start_time(owner)}"


def held_links(pid: int) -> list[int]:
    """The cgroup ids of the cgroup bpf_links process `pid` holds."""
    ids = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "anon_inode:bpf_link":
                info = (fd.parent.parent / "fdinfo" / fd.name).read_text()
                ids += [int(line.split()[1]) for line in info.splitlines() if "cgroup_id:" in line]
    return ids


def cgroup_of(pid: int) -> Path:
    """A process's cgroup directory, read from outside any cgroup namespace it is in."""
    line = Path(f"/proc/{pid}/cgroup").read_text().split("0::", 1)[1].strip()
    return cgroup2_mount() / line.lstrip("/")


# --------------------------------------------------------------------------- owner killed


def test_owner_sigkill_kills_the_fenced_script_within_a_second(
    lab: Lab, fifo: Callable[[str], Fifo], owners: Callable[..., Any], tmp_path: Path
) -> None:
    ready = fifo("ready")
    looper, escapes = tmp_path / "looper.py", tmp_path / "escapes"
    looper.write_text(LOOPER)
    token = f"owner-death-{uuid.uuid4().hex}"
    address = lab.address("github.com")
    owner = owners(
        sys.executable, "-c", OWNER, lab.upstream,
        sys.executable, str(looper), str(ready), address, token, str(escapes),
    )  # fmt: skip
    script_pid = int(wait_line(ready, owner, tmp_path))
    pidfd = os.pidfd_open(script_pid)
    try:
        session = session_of(owner.pid)
        run = cgroup_of(script_pid)
        assert run.parent == session
        (guard,) = guardians_of(owner.pid)
        # The guardian holds the links of the session, whose programs the run has: they
        # stay until it has killed the run.
        assert held_links(guard).count(session.stat().st_ino) >= 4
        assert not escapes.exists(), "the fence let a connection through while its owner lived"

        killed = time.monotonic()
        owner.kill()  # the owner only, by its pid: it gets no chance to clean up
        died = time.monotonic() if exited(pidfd, within=BOUND + 5) else None
        removed = gone_by(session, killed + BOUND + 5)
        assert owner.wait(timeout=30) == -9
    finally:
        os.close(pidfd)

    assert died is not None, f"the fenced script (pid {script_pid}) outlived its owner"
    assert removed is not None, f"{session} outlived its owner"
    print(
        f"\nowner SIGKILL -> fenced script dead {(died - killed) * 1e3:.1f} ms, "
        f"session removed {(removed - killed) * 1e3:.1f} ms"
    )
    assert died - killed < BOUND
    assert removed - killed < BOUND
    assert [p for _, _, p in lab.http_log() if token in p] == [], "requests reached github.com"
    connected = escapes.read_text().split() if escapes.exists() else []
    assert connected == [], f"connections to github.com got through: attempts {connected}"
    assert no_guardian_of(owner.pid), "the guardian outlived its work"


def test_the_lab_log_would_show_an_escape(lab: Lab) -> None:
    """The control for the test above: the same request, unfenced, is in the lab's log."""
    token = f"owner-death-control-{uuid.uuid4().hex}"
    url = f"http://{lab.address('github.com')}/{token}/1"
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", url], timeout=30)
    assert done.returncode == 0
    assert [p for _, _, p in lab.http_log() if token in p] == [f"/{token}/1"]


# --------------------------------------------------------------------------- owner exits


def test_guardian_leaves_with_its_owner_and_leaves_nothing(
    lab: Lab, fifo: Callable[[str], Fifo], owners: Callable[..., Any], tmp_path: Path
) -> None:
    ready, go = fifo("ready"), fifo("go")
    owner = owners(sys.executable, "-c", OWNER, lab.upstream, "sh", "-c", PARK, str(ready), str(go))
    wait_line(ready, owner, tmp_path)
    session = session_of(owner.pid)
    (guard,) = guardians_of(owner.pid)
    pidfd = os.pidfd_open(guard)
    try:
        stat = Path(f"/proc/{guard}/stat").read_text().rsplit(")", 1)[1].split()
        ppid, sid = int(stat[1]), int(stat[3])
        assert ppid != owner.pid, "the guardian is a child of its owner (a tree kill reaches it)"
        assert sid != os.getsid(owner.pid), "the guardian is in its owner's session"
        cgroup = cgroup_of(guard)
        parent = cgroup2_mount() / PARENT
        assert cgroup != parent and parent not in cgroup.parents, f"the guardian is in {cgroup}"

        go.write_line()
        assert owner.wait(timeout=60) == 0, owner_log(tmp_path)
        left = time.monotonic()
        assert exited(pidfd, within=BOUND + 5), "the guardian outlived its owner"
        print(f"\nguardian exit {(time.monotonic() - left) * 1e3:.1f} ms after its owner's")
        assert time.monotonic() - left < BOUND
    finally:
        os.close(pidfd)
    assert not session.exists()
    assert no_guardian_of(owner.pid)


def test_guardian_holds_no_fd_of_the_owner(
    lab: Lab, fifo: Callable[[str], Fifo], tmp_path: Path
) -> None:
    """An inner pytest run (the owner): its output pipe reaches EOF when it exits, even with
    its guardian stopped (SIGSTOP) so that it cannot exit first."""
    ready, go = fifo("ready"), fifo("go")
    (tmp_path / "test_inner.py").write_text(
        "import os, pytest\n\n"
        '@pytest.mark.no_egress("github.com")\n'
        "def test_parked(fenced):\n"
        f"    fenced.run(['sh', '-c', {PARK!r}, {str(ready)!r}, {str(go)!r}])\n"
    )
    inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    with subprocess.Popen(
        [*inner, "--depfence-lab", "--depfence-require", "test_inner.py"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=owner_env(),
        cwd=tmp_path,
    ) as owner:
        assert owner.stdout is not None
        try:
            ready.read_line(timeout=STARTUP)
        except TimeoutError:
            owner.kill()
            pytest.fail(f"the inner run never started its script:\n{owner.stdout.read()!r}")
        (guard,) = guardians_of(owner.pid)
        pidfd = os.pidfd_open(guard)
        os.kill(guard, signal.SIGSTOP)
        try:
            try:
                _assert_holds_nothing_of(guard, owner.pid)
            finally:
                go.write_line()  # the inner run ends now, its guardian stopped
            text = _read_until_eof(owner.stdout.fileno(), STARTUP)
            assert owner.wait(timeout=30) == 0, text
        finally:
            os.kill(guard, signal.SIGCONT)
        try:
            assert exited(pidfd, within=BOUND), "the guardian, continued, did not exit"
        finally:
            os.close(pidfd)
    assert "1 passed" in text
    assert no_guardian_of(owner.pid)


def _assert_holds_nothing_of(guard: int, owner: int) -> None:
    """The guardian holds neither of the owner's stdout and stderr; what it holds is known."""
    output = {_inode(f"/proc/{owner}/fd/{fd}") for fd in (1, 2)}
    held = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{guard}/fd").iterdir()}
    assert {_inode(f"/proc/{guard}/fd/{fd}") for fd in held} & output == set()
    # stdin: the lifeline (a unix socket to the owner); the owner's pidfd; the session's links.
    assert held.pop(0).startswith("socket:"), held
    assert (held.pop(1), held.pop(2)) == ("/dev/null", "/dev/null")
    assert set(held.values()) == {"anon_inode:[pidfd]", "anon_inode:bpf_link"}, held


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _read_until_eof(fd: int, timeout: float) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    while select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)
    pytest.fail("the owner's output pipe stayed open")


def test_a_guardian_that_died_is_replaced_and_given_the_programs_links(
    fences: Callable[..., Fence],
) -> None:
    """The programs are linked once, to the session directory: a guardian started anew
    (this one was killed) gets their links before the next run starts, so the owner's
    death stays covered."""
    fence = fences(pytest_depfence.Policy.no_egress("github.com"))
    fence.run(["true"])
    session = session_of(os.getpid())
    (first,) = guardians_of(os.getpid())
    assert held_links(first).count(session.stat().st_ino) == len(ATTACH_TYPES)
    pidfd = os.pidfd_open(first)
    try:
        os.kill(first, signal.SIGKILL)  # this process's own guardian, started by its fence
        assert exited(pidfd, within=10), "the guardian outlived SIGKILL"
    finally:
        os.close(pidfd)

    fence.run(["true"])
    (second,) = guardians_of(os.getpid())
    assert second != first
    assert held_links(second).count(session.stat().st_ino) == len(ATTACH_TYPES)


# --------------------------------------------------------------------------- stale sessions


def test_every_fence_open_sweeps_stale_sessions(
    fences: Callable[[Policy], Fence], tmp_path: Path
) -> None:
    from pytest_depfence import Policy

    policy = Policy.no_egress("github.com")
    fences(policy)  # this process has opened a fence: what follows is not its first open
    for _ in range(2):
        stale, sleeper = _stale_session(tmp_path)
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            fences(policy)
            assert not stale.exists(), "a fence opened without sweeping a dead owner's session"
            assert exited(pidfd, within=5), "the dead owner's sleep 1000 survived the sweep"
        finally:
            os.close(pidfd)
            if sleeper.poll() is None:
                sleeper.kill()
            sleeper.wait()
            remove_tree(stale)  # when the sweep failed: empty now, and no longer ours to leave


def _stale_session(tmp_path: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """A session named for an owner that died, with `sleep 1000` still in its run cgroup."""
    with subprocess.Popen(["sleep", "1000"]) as dead:
        name = f"{dead.pid}-{start_time(dead.pid)}"
        dead.kill()
    run = CgroupTree().parent / name / "run-1"
    run.mkdir(parents=True)
    sleeper = subprocess.Popen(
        ["/bin/sh", "-c", 'echo 0 > "$0" && exec sleep 1000', str(run / "cgroup.procs")]
    )
    deadline = time.monotonic() + 10
    while str(sleeper.pid) not in (run / "cgroup.procs").read_text().split():
        assert time.monotonic() < deadline and sleeper.poll() is None, "sleep never entered"
        time.sleep(0.01)
    return run.parent, sleeper


# --------------------------------------------------------------------------- no guardian


def test_a_guardian_that_cannot_start_is_a_reason_not_a_silent_fail_open(tmp_path: Path) -> None:
    with pytest.raises(FenceUnavailable) as info:
        session = tmp_path / "not-depfence" / f"{os.getpid()}-{start_time(os.getpid())}"
        guardian.start_guardian(session)
    assert "the fence guardian did not start" in info.value.reason
    assert "is not the fence session of pid" in info.value.reason
    assert info.value.fix is not None and "pytest_depfence.guardian" in info.value.fix


def test_guardian_without_pidfd_polls_proc() -> None:
    """Kernels before 5.3: the owner's /proc entry is read every POLL_INTERVAL."""
    with subprocess.Popen(["sleep", "1000"]) as owner:
        start = start_time(owner.pid)
        assert start is not None
        killed = time.monotonic()
        owner.kill()  # left a zombie until wait(): a zombie counts as gone
        guardian.wait_gone(owner.pid, start, None)
        assert time.monotonic() - killed < guardian.POLL_INTERVAL * 3
