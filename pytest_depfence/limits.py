"""CPU, memory and pids limits on a fenced cgroup, and what the run used.

`fence(memory="512M", cpus=1.5, pids=256)` is enforced by the kernel on each
run's cgroup and each fenced service's. Each controller is used where the
machine has it:

- pure cgroup v2 (current distributions, the VM lanes): `memory.max` (and
  `memory.swap.max` 0, so the limit is not swap), `cpu.max`, `pids.max` in the
  fence cgroup itself, the controllers enabled down the `depfence` tree;
- a hybrid layout, whose memory/cpu/pids controllers are v1 hierarchies: a
  mirror cgroup `<v1 mount>/depfence/<session>/<run>` per controller, with
  `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`),
  `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`, which the command joins
  as it enters the fence (`Applied.procs`). A root process can leave a v1
  cgroup (v1 has no `nsdelegate`): that escapes the limit, not the fence.

The same path from the hierarchy's root names a run on both layouts, which is
how the kernel's "oom-kill: ... oom_memcg=/depfence/..." line is matched.

What the run used (`Usage`) is read after its last process died, before the
cgroups go: CPU seconds from the v2 cgroup's `cpu.stat` (there without any
controller), peak memory (`memory.peak`, 5.19+, or v1 `memory.max_usage_in_bytes`),
the kernel's OOM kills (`memory.events`/`memory.oom_control`), with the
victims' pids from the kernel log (/dev/kmsg), and forks the pids limit
refused (`pids.events`).

Only the standard library and `cgroup` are imported: the guardian removes a
dead owner's mirrors too (`remove_mirrors`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cgroup import PARENT, read_file, remove_tree, sweep_stale
from .errors import FenceUnavailable

#: The controller each limit needs.
CONTROLLERS = {"memory": "memory", "cpus": "cpu", "pids": "pids"}
#: cpu.max / cpu.cfs_period_us: the period a quota of `cpus` CPUs is given in (µs).
CPU_PERIOD_US = 100_000
#: A fixed point of the kernel log line the OOM killer writes for every victim.
_KILLED = re.compile(r"Killed process (\d+) \(")
_MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Limits:
    """The limits of a fence (None: no limit). Values are checked by `options`."""

    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpus, self.pids))

    def controllers(self) -> list[str]:
        return [c for name, c in CONTROLLERS.items() if getattr(self, name) is not None]

    def shown(self, name: str) -> str:
        """The value of limit `name` as a user writes it (`512M`, `1.5`, `256`)."""
        value = getattr(self, name)
        return format_bytes(value) if name == "memory" else f"{value:g}"

    def describe(self, name: str) -> str:
        """`memory=512M`."""
        return f"{name}={self.shown(name)}"


@dataclass(frozen=True)
class Usage:
    """What a fenced command used, and the limits it hit (see the module docstring)."""

    limits: Limits = field(default_factory=Limits)
    cpu_seconds: float | None = None
    #: Bytes; None when the kernel does not say (no memory limit, or v2 before 5.19).
    peak_memory: int | None = None
    #: Processes the kernel's OOM killer killed for the memory limit.
    oom_kills: int = 0
    #: Those it named in its log: (pid, command line).
    oom_victims: tuple[tuple[int, str], ...] = ()
    #: Forks the pids limit refused.
    forks_refused: int = 0

    @property
    def hit(self) -> bool:
        return self.oom_kills > 0 or self.forks_refused > 0


def format_bytes(value: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


# ----------------------------------------------------------------------------- layout
def v1_mounts(mountinfo: str = _MOUNTINFO) -> dict[str, Path]:
    """Controller -> mount point of each cgroup v1 hierarchy that has one of ours."""
    found: dict[str, Path] = {}
    with open(mountinfo, errors="surrogateescape") as f:  # a path may be any bytes
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "cgroup":
                continue
            supers = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
            for controller in CONTROLLERS.values():
                if controller in supers:
                    found.setdefault(controller, Path(fields[4]))
    return found


def where_enforced(
    v2_mount: Path, limits: Limits, mountinfo: str = _MOUNTINFO
) -> dict[str, Path | None]:
    """For each controller `limits` needs: None (in cgroup v2) or its v1 mount.
    FenceUnavailable names a controller the machine has in neither."""
    if not limits:
        return {}
    try:
        on_v2 = set((v2_mount / "cgroup.controllers").read_text().split())
    except OSError:
        on_v2 = set()
    v1 = v1_mounts(mountinfo)
    placed: dict[str, Path | None] = {}
    for controller in limits.controllers():
        if controller in on_v2:
            placed[controller] = None
        elif controller in v1:
            placed[controller] = v1[controller]
        else:
            raise FenceUnavailable(
                f"the {controller} controller is neither in cgroup v2 ({v2_mount}) nor "
                f"mounted as a cgroup v1 hierarchy, so a {controller} limit cannot be enforced",
                fix=f"enable it (cgroup_enable={controller} on the kernel command line, "
                "or mount it), or drop the limit",
            )
    return placed


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise FenceUnavailable(
            f"cannot write {text.strip()!r} to {path}: {exc.strerror}",
            fix="run as root with a writable cgroup tree (in a container: delegate the "
            "memory, cpu and pids controllers to it)",
        ) from exc


def _enable_down(v2_mount: Path, cgroup: Path, controllers: list[str]) -> None:
    """Enable `controllers` in every cgroup.subtree_control from the v2 root to `cgroup`'s
    parent (`depfence` and the session hold no processes, as v2 requires)."""
    above = cgroup.relative_to(v2_mount).parts[:-1]
    for depth in range(len(above) + 1):
        control = v2_mount.joinpath(*above[:depth], "cgroup.subtree_control")
        missing = [c for c in controllers if c not in control.read_text().split()]
        if missing:
            _write(control, " ".join(f"+{c}" for c in missing))


# ----------------------------------------------------------------------------- a cgroup's
class Applied:
    """The limits on one fence cgroup (`path`, in the v2 tree): what the command joins,
    what it used, and the v1 mirrors to remove."""

    def __init__(self, v2_mount: Path, path: Path, limits: Limits) -> None:
        self.limits = limits
        self.path = path
        relative = path.relative_to(v2_mount)
        self.mirrors: dict[str, Path] = {}
        self._kmsg: int | None = None
        try:
            placed = where_enforced(v2_mount, limits)
            v2 = [c for c, mount in placed.items() if mount is None]
            if v2:
                _enable_down(v2_mount, path, v2)
            for controller, mount in placed.items():
                if mount is not None:
                    mirror = mount / relative
                    mirror.mkdir(parents=True, exist_ok=True)
                    self.mirrors[controller] = mirror
            self._set(limits)
            if limits.memory is not None:
                self._kmsg = _open_kmsg()
        except BaseException:
            self.close()
            raise

    @property
    def procs(self) -> list[Path]:
        """The v1 cgroup.procs files the command writes itself into (before the v2 one)."""
        return [mirror / "cgroup.procs" for mirror in self.mirrors.values()]

    def _dir(self, controller: str) -> Path:
        return self.mirrors.get(controller, self.path)

    def _set(self, limits: Limits) -> None:
        if limits.memory is not None:
            where = self._dir("memory")
            if "memory" in self.mirrors:
                _write(where / "memory.limit_in_bytes", str(limits.memory))
                if (where / "memory.memsw.limit_in_bytes").exists():
                    _write(where / "memory.memsw.limit_in_bytes", str(limits.memory))
            else:
                _write(where / "memory.max", str(limits.memory))
                if (where / "memory.swap.max").exists():
                    _write(where / "memory.swap.max", "0")
        if limits.cpus is not None:
            quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
            where = self._dir("cpu")
            if "cpu" in self.mirrors:
                _write(where / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(where / "cpu.cfs_quota_us", str(quota))
            else:
                _write(where / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if limits.pids is not None:
            _write(self._dir("pids") / "pids.max", str(limits.pids))

    def usage(self, name: Callable[[int], str | None]) -> Usage:
        """What the cgroup's processes used, read once they are gone (before `close`).
        `name(pid)`: a victim's command line, None when the pid is not of this cgroup (the
        kernel's log names every cgroup's victims)."""
        usec = _keyed(self.path / "cpu.stat", "usage_usec")
        usage = Usage(limits=self.limits, cpu_seconds=None if usec is None else usec / 1e6)
        if self.limits.memory is not None:
            memory = self._dir("memory")
            v1 = "memory" in self.mirrors
            peak = memory / ("memory.max_usage_in_bytes" if v1 else "memory.peak")
            events = memory / ("memory.oom_control" if v1 else "memory.events")
            kills = _keyed(events, "oom_kill") or 0
            victims = tuple(
                (pid, cmdline)
                for pid in (self._victims() if kills else ())
                if (cmdline := name(pid)) is not None
            )
            usage = replace(usage, peak_memory=_number(peak), oom_kills=kills, oom_victims=victims)
        if self.limits.pids is not None:
            refused = _keyed(self._dir("pids") / "pids.events", "max") or 0
            usage = replace(usage, forks_refused=refused)
        return usage

    def _victims(self) -> Iterator[int]:
        """The pid of each process the OOM killer named in the kernel log since the limits
        were set, of any cgroup."""
        while self._kmsg is not None:
            try:
                record = os.read(self._kmsg, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten before we read it: go on
                    continue
                return
            found = _KILLED.search(record.decode(errors="replace").partition(";")[2])
            if found:
                yield int(found.group(1))

    def close(self) -> None:
        """Remove the v1 mirrors (their processes are gone: they were the v2 cgroup's)."""
        if self._kmsg is not None:
            os.close(self._kmsg)
            self._kmsg = None
        for mirror in self.mirrors.values():
            remove_tree(mirror)


def _open_kmsg() -> int | None:
    """/dev/kmsg from its end (new records only); None when this process may not read it."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _number(path: Path) -> int | None:
    try:
        return int(read_file(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path, key: str) -> int | None:
    """The value of `key` in a flat-keyed file (`oom_kill 3`)."""
    try:
        for line in read_file(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------- sweeping
def sweep_mirrors() -> None:
    """Remove the v1 mirror sessions of dead owners (their processes died with the v2 sweep)."""
    try:
        mounts = set(v1_mounts().values())
    except OSError:
        return
    for mount in mounts:
        sweep_stale(mount / PARENT)


def remove_mirrors(session_name: str) -> None:
    """Remove a session's v1 mirrors, and their parent when unused (at the owner's exit;
    the guardian, once the owner died)."""
    try:
        mounts = set(v1_mounts().values())
    except OSError:
        return
    for mount in mounts:
        session = mount / PARENT / session_name
        try:
            remove_tree(session)
            session.parent.rmdir()
        except OSError:
            pass  # in use: a run of the session still holds processes, another session the parent
