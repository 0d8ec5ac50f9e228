"""Running services a fence adopts for each run: finding them, and taking turns.

`Fence(services=[...])` names systemd units (`docker.service`, found by name
in the cgroup v2 tree) or cgroup paths. For each run the fence attaches its
programs to that cgroup too (fence.py `_adopt`), never kills or pauses what
runs there, and detaches when the run ends. Some cgroups cannot be adopted:
the root, one that holds the fence's own process (its DNS proxy's queries
would be sent back to itself), and the fences' own tree. Runs of two fences
that adopt one service take turns (a lock on its directory), since one
cgroup's DNS can go to one fence's proxy only.
"""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from pathlib import Path

from .cgroup import PARENT, cgroup2_mount
from .errors import ConfigError

#: Seconds a run waits for another fence's run to let go of a service both adopt.
ADOPT_WAIT = 60.0
#: Systemd unit suffixes a service to adopt may be named by.
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".slice")
#: How deep below the cgroup root a unit's cgroup is looked for (user.slice/user-0.slice/...).
UNIT_DEPTH = 4


@dataclass(frozen=True)
class Adopted:
    """A running service a fence adopts for each run, as the user named it: a systemd unit
    or a cgroup path. Its cgroup is found at each run (a restarted unit may have a new one)."""

    name: str
    #: Where it was written (marker at file:line, Fence(services=), CLI flag).
    source: str

    def directory(self) -> Path:
        """Its cgroup directory now; ConfigError naming it and where it was written, also
        for a cgroup the fence cannot adopt: the root, one holding this very process (the
        fence's own DNS would be redirected to itself), or the fences' own tree."""
        mount = cgroup2_mount()
        found = find_cgroup(self.name, mount)
        if found is None:
            raise ConfigError(
                self.name,
                f"no such systemd unit or cgroup under {mount} (a unit is found by "
                "its name, e.g. docker.service; a path is from the cgroup v2 root)",
                self.source,
            )
        own = mount / own_cgroup().lstrip("/")
        if found == mount or own == found or found in own.parents:
            why = "it holds this process (and the fence's DNS proxy): adopt a service's own"
        elif (mount / PARENT) in (found, *found.parents):
            why = "it is a fence's own cgroup"
        else:
            return found
        raise ConfigError(self.name, f"cannot adopt {found}: {why}", self.source)

    def take_turn(self, fd: int) -> None:
        """Hold its cgroup (`fd`: its directory; a lock released when `fd` is closed):
        runs of other fences, in this process or another (xdist workers), that adopt
        the same service wait their turn, since one cgroup's DNS can go to one fence's
        proxy only."""
        deadline = time.monotonic() + ADOPT_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        self.name,
                        f"another fence's run has adopted it for over {ADOPT_WAIT:g} s",
                        self.source,
                    ) from None
                time.sleep(0.05)  # flock has no timeout of its own


def own_cgroup() -> str:
    """This process's cgroup v2 path (the "0::" line of /proc/self/cgroup)."""
    with open("/proc/self/cgroup", errors="surrogateescape") as f:  # a path: any bytes
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def find_cgroup(spec: str, mount: Path | None = None) -> Path | None:
    """The cgroup directory of a systemd unit (`docker.service`: found by name up to
    UNIT_DEPTH levels down) or of a cgroup path (from the v2 root, or under its mount)."""
    root = mount or cgroup2_mount()
    if "/" not in spec and spec.endswith(UNIT_SUFFIXES):
        level = [root]
        for _ in range(UNIT_DEPTH):
            found = [p / spec for p in level if (p / spec).is_dir()]
            if found:
                return found[0]
            level = [c for p in level for c in _subdirs(p)]
        return None
    path = Path(spec)
    if not path.is_absolute():
        return None
    for candidate in (path, root / str(path).lstrip("/")):
        if candidate.is_dir() and (candidate / "cgroup.procs").exists():
            if candidate.resolve().is_relative_to(root.resolve()):
                return candidate
    return None


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
