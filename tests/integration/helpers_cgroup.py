"""Where a fenced process's cgroup is, for tests that look at it.

A fenced command runs in a cgroup namespace rooted at its fence cgroup, so its own
/proc/self/cgroup reads `0::/`. From outside the fence (the test process) the real
path is read with `cgroup_of(pid)`; inside, a script that wants to make a sub-cgroup
of its fence through the host's cgroup2 mount finds its directory with
`OWN_CGROUP_SH`, by its pid in the cgroup.procs files of the fence tree.
"""

from __future__ import annotations

from pathlib import Path

from pytest_depfence.cgroup import PARENT, cgroup2_mount

#: Shell: sets $mount (the cgroup2 mount) and $own (the directory of the shell's cgroup).
OWN_CGROUP_SH = f"""\
mount=$(awk '$3 == "cgroup2" {{ print $2; exit }}' /proc/self/mounts)
own=$(grep -lx "$$" "$mount"/{PARENT}/*/*/cgroup.procs | sed 's,/cgroup.procs$,,')
[ -n "$own" ] || {{ echo "no cgroup holds pid $$" >&2; exit 1; }}
"""


def cgroup_of(pid: int) -> Path:
    """The cgroup directory of a live process, as the test process (outside any fence) sees it."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::/"):
                return cgroup2_mount() / line.strip()[len("0::/") :]
    raise AssertionError(f"pid {pid} has no cgroup v2 line in /proc/{pid}/cgroup")
