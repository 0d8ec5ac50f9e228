"""The guardian: when the process that owns a fence dies, nothing of the fence keeps running.

The problem. A fence's programs are attached with bpf_link, and the links are
file descriptors of the owning process (a pytest session, `depfence run`, a
library user). When the owner is SIGKILLed the kernel closes them and the
programs detach, but the fenced script and everything it started live on in
their cgroups, with the network open, until some later session sweeps them
(possibly never).

The choice: one small process per owner, started with the owner's session
directory (`CgroupTree.sweep`), that holds copies of the session's links and,
once the owner is gone, kills every process of the session (`cgroup.kill`,
else SIGKILL by listing), removes its directories, and only then lets the
links go. The programs therefore stay attached until nothing they fenced can
run: there is no moment without a fence. Rejected:

- only killing, without holding the links: the kernel releases the owner's
  links while it exits, before anyone can notice; measured here, a fenced loop
  reached the lab's github.com hundreds of times in the 0.1-0.9 s before the
  owner's pidfd reported the exit (closing classic tracepoints was slow; without
  BTF three still are), and still some times in the ~1 ms between the owner's
  files closing and the kill;
- legacy BPF_PROG_ATTACH (programs outlive the process): nothing would kill
  the processes, and a crashed session must leave nothing attached;
- PR_SET_PDEATHSIG on each fenced command: it reaches the command only, not
  what it forks or daemonises, and fires when the spawning *thread* exits;
- the sweep alone: it needs a later fence to open on the same machine.

The lifeline. The guardian's stdin is a unix socket whose other end only the
owner holds (not inheritable, so nothing the owner starts keeps it). The
owner sends the session directory's links over it (`CgroupTree.enclose`, once;
SCM_RIGHTS, and fds in flight are held by the socket too). Its EOF comes as the
kernel closes the owner's files, up to a second before the pidfd reports the
exit; EOF counts only when the owner is exiting (PF_EXITING), else the pidfd
alone tells. The pidfd (Linux 5.3+; else /proc/PID/stat every 0.1 s, a zombie
counting as gone) is opened before the owner's start time is checked, so a
reused pid is never mistaken for the owner. Links whose cgroup is not a directory of the
session (one made anew) are closed once PRUNE_AT links are held (the cgroup's
removal detached them already).

It must outlive what kills the owner, so it is in a session of its own
(`setsid`: a terminal's SIGINT or SIGHUP to the owner's process group misses
it, and it ignores both anyway), it forks once more so that it is no
descendant of the owner (a kill of the owner's process tree misses it), and it
moves itself to the cgroup that holds the `depfence` parent (the cgroup v2
root, as a rule) so that killing the owner's cgroup or unit misses it and it is
never inside a fence. Where that move is refused (a delegated cgroup in a
container) it stays in the owner's cgroup, unless that is a fence: then it
refuses to start and the owner gets FenceUnavailable. It holds nothing of the
owner's but the lifeline: every other inherited descriptor is closed at exec,
and once it has said "ready PID START" on the pipe the owner reads, stdout and
stderr are /dev/null. Only the standard library, `cgroup` and `limits` (which import
nothing else of this package but `errors`) are loaded: it is ready in about 50 ms.

After a normal exit the owner's atexit has removed its directory: the guardian
only tries to remove the shared parent, and exits.

Usage (started by the owner, not by hand)::

    python -m pytest_depfence.guardian OWNER_PID OWNER_START SESSION_DIR
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .cgroup import (
    PARENT,
    alive,
    kill_all,
    proc_stat,
    remove_if_unused,
    remove_tree,
    start_time,
)
from .errors import FenceUnavailable
from .limits import remove_mirrors

#: The guardian's one line on stdout once it watches the owner: "ready PID START".
READY = "ready"
#: How long a guardian may take to start (a Python interpreter on a loaded CI machine).
GUARDIAN_START_TIMEOUT = 30.0
#: At most this many descriptors in one message on the lifeline (SCM_RIGHTS).
MAX_FDS = 32
#: Where pidfd_open is missing: how often the owner's /proc entry is read.
POLL_INTERVAL = 0.1
#: How long the guardian keeps trying to empty and remove the session before giving up.
PATIENCE = 30.0
#: Links held before those of cgroups no longer in the session are closed (removing a
#: cgroup detached its links already: a held one only keeps a little memory).
PRUNE_AT = 4 * MAX_FDS
#: The task flag the kernel sets first thing in do_exit() (include/linux/sched.h).
PF_EXITING = 0x00000004


class GuardianError(Exception):
    """The guardian cannot watch this owner; the text is what the owner reports."""


def main(argv: list[str]) -> int:
    try:
        owner, start, session = _parse(argv)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        pidfd = _open_pidfd(owner)
        _leave_owner_cgroup(session)
    except (GuardianError, OSError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    if os.fork() != 0:
        os._exit(0)  # the owner reaps this one; the guardian is no descendant of the owner
    me = os.getpid()
    try:
        print(f"{READY} {me} {start_time(me)}", flush=True)
    except BrokenPipeError:
        os._exit(1)  # the owner stopped waiting for us and reports the failure
    _detach_stdio()
    links = Links(session)
    try:
        wait_gone(owner, start, pidfd, _lifeline(), links)
        return 0 if clean(session) else 1
    finally:
        links.release()  # only now: until the kill, what ran in the session stayed fenced


def _parse(argv: list[str]) -> tuple[int, str, Path]:
    if len(argv) != 3 or not argv[0].isdigit() or not argv[1].isdigit():
        raise GuardianError("usage: python -m pytest_depfence.guardian OWNER_PID OWNER_START DIR")
    owner, start, session = int(argv[0]), argv[1], Path(argv[2])
    # Only ever a session directory named for this owner: never kill an arbitrary cgroup.
    if session.name != f"{owner}-{start}" or session.parent.name != PARENT:
        raise GuardianError(f"{session} is not the fence session of pid {owner} (start {start})")
    if not (session / "cgroup.procs").is_file():
        raise GuardianError(f"{session} is not a cgroup directory")
    return owner, start, session


def _open_pidfd(owner: int) -> int | None:
    """A pidfd of the owner, or None where the kernel (or Python) has none."""
    try:
        return os.pidfd_open(owner)
    except AttributeError:
        return None
    except OSError as exc:
        # ENOSYS: a kernel before 5.3; ESRCH: the owner is gone already (wait_gone returns).
        if exc.errno in (errno.ENOSYS, errno.ESRCH):
            return None
        raise


def _leave_owner_cgroup(session: Path) -> None:
    """Move to the cgroup holding the depfence parent; never stay inside a fence."""
    home = session.parent.parent
    try:
        fd = os.open(home / "cgroup.procs", os.O_WRONLY)  # never O_CREAT: a cgroup file or none
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
        return
    except OSError as exc:
        refused = exc
    here = _own_cgroup(home)
    if here is None or here == session.parent or session.parent in here.parents:
        raise GuardianError(f"cannot move out of the fence cgroup {here} into {home}: {refused}")


def _own_cgroup(mount: Path) -> Path | None:
    try:
        with open("/proc/self/cgroup", errors="surrogateescape") as f:  # a path: any bytes
            for line in f:
                if line.startswith("0::"):
                    return mount / line[3:].strip().lstrip("/")
    except OSError:
        pass
    return None


def _detach_stdio() -> None:
    """stdout and stderr on /dev/null: the owner's handshake pipe sees EOF."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)


def _lifeline() -> socket.socket | None:
    """stdin, when it is the owner's unix socket (not when run by hand)."""
    try:
        sock = socket.socket(fileno=0)
    except OSError:
        return None
    if sock.family != socket.AF_UNIX:
        sock.detach()
        return None
    return sock


class Links:
    """The bpf_links the owner handed over: held while their cgroup is one of the session's."""

    def __init__(self, session: Path) -> None:
        self.session = session
        self.fds: list[int] = []

    def receive(self, lifeline: socket.socket) -> bool:
        """Take what the owner sent; False at EOF (or when the lifeline broke)."""
        try:
            data, fds, _, _ = socket.recv_fds(lifeline, 1024, MAX_FDS)
        except OSError:
            return False
        self.fds += fds
        if len(self.fds) >= PRUNE_AT:
            self.prune()
        return bool(data or fds)

    def prune(self) -> None:
        """Close every link whose cgroup is no directory of the session (any more)."""
        live = _cgroup_ids(self.session)
        kept = []
        for fd in self.fds:
            if _link_cgroup(fd) in live:
                kept.append(fd)
            else:
                os.close(fd)
        self.fds = kept

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _cgroup_ids(session: Path) -> set[int]:
    """The ids (inode numbers) of the session's cgroup directories, itself included."""
    ids: set[int] = set()
    for where, _, _ in os.walk(session):
        try:
            ids.add(os.stat(where).st_ino)
        except OSError:
            pass
    return ids


def _link_cgroup(fd: int) -> int | None:
    """The cgroup id of a cgroup bpf_link (0 once that cgroup is gone); None for other fds."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("cgroup_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def wait_gone(
    owner: int,
    start: str,
    pidfd: int | None,
    lifeline: socket.socket | None = None,
    links: Links | None = None,
) -> None:
    """Return once the owner is exiting or has exited (a zombie counts as exited),
    taking the links it sends on the lifeline meanwhile."""
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    if lifeline is not None:
        poller.register(lifeline, select.POLLIN)
    timeout = None if pidfd is not None else POLL_INTERVAL * 1000
    held = links or Links(Path("/nonexistent"))
    try:
        # The pidfd was opened first: it is this very process, and turns readable as it
        # exits (no /proc read at every wake-up then, which the owner's sends cause).
        while pidfd is not None or alive(owner, start):
            for fd, _ in poller.poll(timeout):
                if fd == pidfd:
                    return
                if lifeline is not None and not held.receive(lifeline):
                    if exiting(owner, start):
                        return
                    poller.unregister(lifeline)  # it closed the socket itself: pidfd only
    finally:
        if pidfd is not None:
            os.close(pidfd)


def exiting(owner: int, start: str) -> bool:
    """Whether the owner is in exit (PF_EXITING, set as the kernel starts tearing it down)."""
    fields = proc_stat(owner)
    if fields is None or fields[19] != start:
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)


def clean(session: Path, patience: float = PATIENCE) -> bool:
    """Kill everything in the session and remove it (and the shared parent, when unused).

    Retried until `patience` runs out: a process the owner was starting can
    enter a run cgroup after the kill, and then the rmdir fails with EBUSY.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            if session.exists():
                kill_all(session, timeout=max(0.1, deadline - time.monotonic()))
                remove_tree(session)
            break
        except FileNotFoundError:
            break  # another process swept it meanwhile
        except (OSError, RuntimeError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
    remove_mirrors(session.name)
    try:
        remove_if_unused(session.parent)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- the owner's side
# Starting the guardian, handing it the links, starting another should it die
# (`CgroupTree.sweep` and `enclose`).
_guardians: dict[Path, Guardian] = {}
_guardians_lock = threading.Lock()


class Guardian:
    """The owner's handle on a running guardian: its pid, a pidfd to see it exit, and our end
    of its lifeline (a unix socket: its stdin), closed by nothing but this process's exit."""

    def __init__(self, pid: int, start: str, lifeline: socket.socket) -> None:
        self.pid = pid
        self.start = start
        self.lifeline = lifeline
        self._send_lock = threading.Lock()
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass  # before 5.3 (or gone already): running() reads /proc instead
        if self.pidfd is not None and start_time(pid) != start:
            self.close()  # the pid was reused before we held it: that guardian is gone

    def running(self) -> bool:
        if self.lifeline.fileno() < 0:
            return False
        if self.pidfd is not None:
            poller = select.poll()  # not select(): the pidfd may be above FD_SETSIZE
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)
        return alive(self.pid, self.start)

    def hold(self, fds: list[int]) -> None:
        """Give the guardian its own copies of `fds` (bpf_links of this session's cgroups)."""
        with self._send_lock:
            for at in range(0, len(fds), MAX_FDS):
                socket.send_fds(self.lifeline, [b"L"], fds[at : at + MAX_FDS], socket.MSG_NOSIGNAL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.lifeline.close()


def guard(session: Path) -> Guardian:
    """Make sure this process's session has a running guardian; start one if not."""
    with _guardians_lock:
        current = _guardians.get(session)
        if current is not None and current.running():
            return current
        if current is not None:
            current.close()
            del _guardians[session]
        _guardians[session] = started = start_guardian(session)
        return started


def hold_links(session: Path, links: list[int]) -> Guardian:
    """Hand the session's bpf_links to its guardian, and return that guardian: should this
    process die, they stay attached until the guardian has killed the session's runs.
    FenceUnavailable when no guardian takes them."""
    failure: OSError | None = None
    for _ in range(2):
        current = guard(session)
        try:
            current.hold(links)
            return current
        except OSError as exc:
            current.close()  # it died since guard() looked: the next guard() starts another
            failure = exc
    raise FenceUnavailable(
        f"the fence guardian of {session} does not take the programs: {failure}",
        fix="report this output; a run is not started without its guardian",
    ) from failure


def start_guardian(session: Path) -> Guardian:
    """Start `python -m pytest_depfence.guardian` for `session` (named for this process)
    and wait until it watches this process; FenceUnavailable when it cannot."""
    owner, _, start = session.name.partition("-")
    package_root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-S", "-m", "pytest_depfence.guardian", owner, start, str(session)]
    fix = (
        f"run `{' '.join(argv)}` by hand to see why; a fence is not built without "
        "the guardian that removes it when this process dies"
    )
    if not sys.executable:
        raise FenceUnavailable("no Python interpreter to start the fence guardian with", fix=fix)
    # Ours is not inheritable: nothing this process starts keeps the lifeline open after it.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=theirs.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env={"PYTHONPATH": str(package_root)},
        )
    except OSError as exc:
        ours.close()
        raise FenceUnavailable(f"cannot start the fence guardian: {exc}", fix=fix) from exc
    finally:
        theirs.close()
    code, said = _handshake(proc)
    words = said.split()
    if code != 0 or len(words) != 3 or words[0] != READY or not words[1].isdigit():
        ours.close()
        shown = said.strip() or f"exit status {code}, nothing said"
        raise FenceUnavailable(f"the fence guardian did not start: {shown}", fix=fix)
    return Guardian(int(words[1]), words[2], _renumber_high(ours))


def _renumber_high(sock: socket.socket) -> socket.socket:
    """The same socket on a high descriptor number, so that it closes early when we die.

    An exiting process's files are released highest descriptor first (its
    task_work runs newest first; measured on 6.18). Closing bcc's programs takes
    tens of milliseconds (raw tracepoints), up to a second on a kernel without
    BTF, where three stay classic: on a descriptor above theirs, the lifeline's
    EOF reaches the guardian first.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    floor = min(soft, 1024) - 16
    if floor <= sock.fileno():
        return sock
    try:
        high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, floor)
    except OSError:
        return sock  # every high number is taken: the pidfd still tells, later
    sock.close()
    return socket.socket(fileno=high)


def _handshake(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """The starter's exit status and what the guardian said, once every writer closed the pipe."""
    deadline = time.monotonic() + GUARDIAN_START_TIMEOUT
    assert proc.stdout is not None
    chunks: list[bytes] = []
    with proc.stdout:
        fd = proc.stdout.fileno()
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, b"".join(chunks).decode(errors="replace")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
