"""Fence cgroups: finding the cgroup v2 mount, one directory per run, kill and removal.

Layout: <cgroup2 mount>/depfence/<owner pid>-<owner start time>/<run>. The
owner part lets a later process tell a crashed session's directories from a
live one's, so `sweep_stale` can kill what was left running and remove them.

The fence's programs are attached to the session directory, once per process
(`CgroupTree.enclose`): every run's and service's cgroup, made under it, has
them from its mkdir on (a cgroup's effective programs include its ancestors'),
and a run attaches, detaches and hands over nothing. Each owning process has a
guardian (`pytest_depfence.guardian`, started with the session directory) that
holds copies of those bpf_links: when the owner dies, it kills the session's
processes and removes the directories within a second, and only then lets the
programs go, instead of leaving the processes running unfenced until some later
sweep. The owner's side of that (starting it, handing it the links, restarting
one that died) lives there too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FenceUnavailable

if TYPE_CHECKING:
    from .guardian import Guardian
    from .limits import Limits

PARENT = "depfence"
_counter = itertools.count(1)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup v2 mount point (pure v2 at /sys/fs/cgroup, hybrid at .../unified, ...)."""
    try:
        with open(mountinfo, errors="surrogateescape") as f:  # a path may be any bytes
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return Path(fields[4])
    except OSError as exc:
        raise FenceUnavailable(
            f"cannot read {mountinfo}: {exc}", fix="run on Linux with /proc mounted"
        ) from exc
    raise FenceUnavailable(
        "no cgroup v2 filesystem is mounted (a fence is a cgroup v2 directory)",
        fix="mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid layout), "
        "or boot with systemd.unified_cgroup_hierarchy=1",
    )


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces):
    [0] is field 3 (state), [6] field 9 (flags), [19] field 22 (start time)."""
    try:
        stat = read_file(f"/proc/{pid}/stat")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return None if fields is None else fields[19]  # start time, in clock ticks since boot


def alive(pid: int, start: str) -> bool:
    """Whether `pid` is still the process that started at `start`, and not yet a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in ("Z", "X")


def session_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid)}"


def _owner_alive(name: str) -> bool:
    pid, _, start = name.partition("-")
    return pid.isdigit() and alive(int(pid), start)


#: How long the processes of a cgroup get to die of cgroup.kill before each is killed by its
#: pid as well.
KILL_WRITE_GRACE = 0.05
#: Between rounds of killing by pid, the wait for the cgroup to empty.
KILL_ROUND = 0.1


def kill_all(path: Path, timeout: float = 10.0) -> None:
    """Kill every process in the cgroup (and below) and wait until it is empty.

    cgroup.kill (5.14+) kills the whole subtree in one write, forks included, but
    passes over a process whose main thread has exited while others run on
    (measured on 6.18: it lives on, and its threads keep the network); a kill() of
    its pid ends it. So what is left after a moment is killed by pid, in rounds
    until the cgroup is empty (a fork between listing and killing escapes one
    round), as everything is where there is no cgroup.kill. An empty cgroup (nearly
    every run's, once its command exited) is left as it is: nothing can enter it but
    by a migration from outside."""
    if wait_empty(path, 0):
        return
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
        if wait_empty(path, KILL_WRITE_GRACE):
            return
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        for pid in pids_of(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if wait_empty(path, min(remaining, KILL_ROUND)):
            return
    raise RuntimeError(f"processes in {path} survived SIGKILL for {timeout}s")


def read_file(path: str | Path) -> str:
    """A small kernel file's text: open, read to the end, close. (`Path.read_text` takes
    twice the syscalls, for a buffered text stream; a run's end reads a few such files.)
    Bytes that are no UTF-8 (a process may give itself any name, which /proc/PID/stat
    shows) read as U+FFFD."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def pids_of(path: Path) -> list[int]:
    """Every process in the cgroup directory `path` and below it."""
    pids: list[int] = []
    for procs in path.rglob("cgroup.procs"):
        try:
            pids.extend(int(p) for p in read_file(procs).split())
        except OSError:
            pass
    return pids


def wait_empty(path: Path, timeout: float) -> bool:
    """Wait for `populated 0` in cgroup.events; the kernel signals each change by poll()."""
    try:
        fd = os.open(path / "cgroup.events", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        deadline = time.monotonic() + timeout
        while b"populated 0" not in os.read(fd, 4096):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
            os.lseek(fd, 0, os.SEEK_SET)  # a cgroup file is read again from its start
        return True
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a cgroup directory and its children (they must be empty of processes): one
    rmdir when it has none, as nearly every run's cgroup (listing a cgroup directory
    costs a stat per file of it)."""
    try:
        path.rmdir()
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    try:
        with os.scandir(path) as entries:
            children = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for child in sorted(children, reverse=True):
        remove_tree(Path(child))
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


def remove_if_unused(path: Path) -> None:
    """rmdir a directory others may still use (or have removed already): then leave it."""
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise


class FenceCgroup:
    """One run's cgroup: processes enter it by writing to cgroup.procs; close() removes it.
    With `limits` (limits.Limits), the kernel enforces them on it (`limits.Applied`)."""

    def __init__(self, session_dir: Path, label: str, limits: Limits | None = None) -> None:
        from .limits import Applied, Limits, Usage

        self.path = session_dir / f"{label}-{next(_counter)}"
        self.path.mkdir()
        self.id = os.stat(self.path).st_ino  # the cgroup id the kernel reports to eBPF
        self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:  # the session's parent's parent: the cgroup v2 mount
            self.limits = Applied(session_dir.parent.parent, self.path, limits or Limits())
        except BaseException:
            os.close(self.dir_fd)
            self.path.rmdir()
            raise
        #: What its processes used, read by `finish` once they are gone.
        self.usage = Usage()

    @property
    def procs(self) -> list[Path]:
        """The cgroup.procs files a process writes itself into to enter, in order."""
        return [*self.limits.procs, self.path / "cgroup.procs"]

    def pids(self) -> list[int]:
        return pids_of(self.path)

    def kill(self) -> None:
        kill_all(self.path)  # a cgroup already gone is empty (`wait_empty`)

    def finish(self, name: Callable[[int], str | None]) -> None:
        """Kill what is left and read what it all used (`usage`); `name(pid)` names the
        OOM killer's victims (None: not a process of this cgroup)."""
        self.kill()
        self.usage = self.limits.usage(name)

    def close(self) -> None:
        """Kill what is left, then remove the directory (and the limits' v1 cgroups)."""
        try:
            os.close(self.dir_fd)
        except OSError:
            pass
        self.kill()
        remove_tree(self.path)
        self.limits.close()


class CgroupTree:
    """This process's session directory under the shared depfence parent, and its guardian."""

    def __init__(self, mount: Path | None = None) -> None:
        self.mount = mount or cgroup2_mount()
        self.parent = self.mount / PARENT
        self.session = self.parent / session_name()
        self._mirrors_swept = False
        self._lock = threading.Lock()
        #: The session directory's bpf_links (`enclose`), the directory's cgroup id, and
        #: the guardian that holds copies of them.
        self._links: list[int] = []
        self._links_of: int | None = None
        self._holder: Guardian | None = None

    def ensure(self) -> Path:
        """Create this session's directory and start its guardian (see `sweep`)."""
        self.sweep()
        return self.session

    def sweep(self) -> list[Path]:
        """Run at every fence open: kill and remove the sessions of dead owners (and their
        limits' v1 cgroups: at this process's first sweep and whenever one of those
        sessions was removed here, as a guardian that removes a session removes them
        too), and make sure this session's directory exists and its guardian is running."""
        from .guardian import guard  # it imports this module
        from .limits import sweep_mirrors

        for _ in range(5):
            try:
                removed = sweep_stale(self.parent, self.session.name)
                if removed or not self._mirrors_swept:
                    sweep_mirrors()  # after: their processes were the v2 sessions'
                    self._mirrors_swept = True
                _make_session(self.session)
                break
            except FileNotFoundError:
                continue  # another session removed the empty parent in between; make it again
            except PermissionError as exc:
                raise FenceUnavailable(
                    f"cannot create fence cgroups under {self.parent}: {exc}",
                    fix="run as root (or with CAP_SYS_ADMIN) and with write access to the "
                    "cgroup v2 tree (in a container: a writable, delegated cgroup)",
                ) from exc
        else:
            raise FenceUnavailable(
                f"cannot create {self.session}: its parent keeps disappearing",
                fix="check what else removes cgroups under it, and report this output",
            )
        guard(self.session)
        return removed

    def enclose(self, attach: Callable[[int], list[int]]) -> None:
        """Attach the programs to the session directory (`attach(dir_fd)` returns the
        bpf_links), so that every cgroup made under it has them, and make sure the
        running guardian holds copies: once, and again should the directory have been
        made anew (its links went with the old one) or the guardian restarted. Before
        each run's cgroup is made; after `sweep`."""
        from .guardian import hold_links  # it imports this module

        with self._lock:
            directory = os.stat(self.session).st_ino
            if directory != self._links_of:
                fd = os.open(self.session, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    links = attach(fd)
                finally:
                    os.close(fd)
                close_all(self._links)
                self._links, self._links_of, self._holder = links, directory, None
            if self._holder is None or not self._holder.running():
                self._holder = hold_links(self.session, self._links)

    def guardian_pid(self) -> int | None:
        """The pid of the guardian holding this session's links (`enclose`), if one does."""
        holder = self._holder
        return holder.pid if holder is not None else None

    def v2_path(self, path: Path) -> str:
        """A cgroup directory's path from the v2 root, as /proc/PID/cgroup says it."""
        return "/" + str(path.relative_to(self.mount)) if path != self.mount else "/"

    def remove(self) -> None:
        """Remove this session's directory, and the shared parent when no other session uses it."""
        from .limits import remove_mirrors

        with self._lock:
            close_all(self._links)  # the guardian's copies go with its directory
            self._links, self._links_of, self._holder = [], None, None
        for path in (self.session, self.parent):
            remove_if_unused(path)
        remove_mirrors(self.session.name)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _make_session(session: Path) -> None:
    """mkdir the session's directory, and its parent first if that is missing: one
    syscall when both are there (in cgroupfs, a name that exists there is a directory)."""
    try:
        os.mkdir(session)
    except FileExistsError:
        return
    except FileNotFoundError:
        for path in (session.parent, session):  # another thread's open may make them too
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)


def sweep_stale(parent: Path, own: str = "") -> list[Path]:
    """Kill and remove the fence cgroups of sessions whose owner process is gone (`own`:
    this process's session, alive without asking)."""
    removed: list[Path] = []
    try:
        with os.scandir(parent) as listing:  # d_type: no stat per entry
            entries = [e for e in listing if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if entry.name == own or _owner_alive(entry.name):
            continue
        session = Path(entry.path)
        try:
            kill_all(session)
            remove_tree(session)
        except FileNotFoundError:
            continue  # another process swept it first
        removed.append(session)
    return removed
