"""Fence cgroups: finding the cgroup v2 mount, one directory per run, kill and removal.

Layout: <cgroup2 mount>/depfence/<owner pid>-<owner start time>/<run>. The
owner part lets a later process tell a crashed session's directories from a
live one's, so `sweep_stale` can kill what was left running and remove them.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import signal
import time
from pathlib import Path

from .errors import FenceUnavailable

PARENT = "depfence"
_counter = itertools.count(1)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup v2 mount point (pure v2 at /sys/fs/cgroup, hybrid at .../unified, ...)."""
    try:
        with open(mountinfo) as f:
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


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def session_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def _owner_alive(name: str) -> bool:
    pid, _, start = name.partition("-")
    return pid.isdigit() and _start_time(int(pid)) == start


def kill_all(path: Path, timeout: float = 10.0) -> None:
    """Kill every process in the cgroup (and below) and wait until it is empty."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():  # 5.14+: one write kills the whole subtree, forks included
        kill_file.write_text("1")
    else:
        _kill_by_listing(path)
    if not wait_empty(path, timeout):
        raise RuntimeError(f"processes in {path} survived SIGKILL for {timeout}s")


def _kill_by_listing(path: Path) -> None:
    # Without cgroup.kill, a fork between reading and killing escapes one round; repeat.
    for _ in range(100):
        pids = _pids(path)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids(path: Path) -> list[int]:
    pids: list[int] = []
    for procs in path.rglob("cgroup.procs"):
        try:
            pids.extend(int(p) for p in procs.read_text().split())
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
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if b"populated 0" in os.read(fd, 4096):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a cgroup directory and its children (they must be empty of processes)."""
    if not path.exists():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_tree(child)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


class FenceCgroup:
    """One run's cgroup: processes enter it by writing to cgroup.procs; close() removes it."""

    def __init__(self, session_dir: Path, label: str) -> None:
        self.path = session_dir / f"{label}-{next(_counter)}"
        self.path.mkdir()
        self.id = os.stat(self.path).st_ino  # the cgroup id the kernel reports to eBPF
        self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)

    def pids(self) -> list[int]:
        return _pids(self.path)

    def kill(self) -> None:
        if self.path.exists():
            kill_all(self.path)

    def close(self) -> None:
        """Kill what is left, then remove the directory."""
        try:
            os.close(self.dir_fd)
        except OSError:
            pass
        self.kill()
        remove_tree(self.path)


class CgroupTree:
    """This process's session directory under the shared depfence parent."""

    def __init__(self, mount: Path | None = None) -> None:
        self.mount = mount or cgroup2_mount()
        self.parent = self.mount / PARENT
        self.session = self.parent / session_name()

    def ensure(self) -> Path:
        for _ in range(5):
            try:
                self.parent.mkdir(exist_ok=True)
                sweep_stale(self.parent)
                self.session.mkdir(exist_ok=True)
                return self.session
            except FileNotFoundError:
                continue  # another session removed the empty parent in between; make it again
            except PermissionError as exc:
                raise FenceUnavailable(
                    f"cannot create fence cgroups under {self.parent}: {exc}",
                    fix="run as root (or with CAP_SYS_ADMIN) and with write access to the "
                    "cgroup v2 tree (in a container: a writable, delegated cgroup)",
                ) from exc
        raise FenceUnavailable(
            f"cannot create {self.session}: its parent keeps disappearing",
            fix="check what else removes cgroups under it, and report this output",
        )

    def remove(self) -> None:
        """Remove this session's directory, and the shared parent when no other session uses it."""
        for path in (self.session, self.parent):
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise


def sweep_stale(parent: Path) -> list[Path]:
    """Kill and remove the fence cgroups of sessions whose owner process is gone."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for session in parent.iterdir():
        if not session.is_dir() or _owner_alive(session.name):
            continue
        try:
            kill_all(session)
            remove_tree(session)
        except FileNotFoundError:
            continue  # another process swept it first
        removed.append(session)
    return removed
