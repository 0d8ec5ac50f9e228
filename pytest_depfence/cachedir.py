"""The per-machine cache directory: what `depfence-enter` (enter.py) and the compiled
programs (kernel/progcache.py) are kept in.

What is kept there runs as the fence's owner, root, or goes into the kernel: the
directory, every directory above it and every file used from it must be the owner's (or
root's) and writable by nobody else (above it, a sticky directory such as /tmp will
do), or they are not used. A cache in another user's home could otherwise be swapped for
one of that user's between the check and its use.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class Unsafe(Exception):
    """The cache directory, or a file in it, may be written by someone else."""


def cache_dir() -> Path:
    """/var/cache/pytest-depfence for root (whose HOME may be the invoking user's, under
    `sudo -E`), else $XDG_CACHE_HOME/pytest-depfence or ~/.cache/pytest-depfence."""
    if os.geteuid() == 0:
        return Path("/var/cache/pytest-depfence")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        raise Unsafe(f"no cache directory: the home directory is not known ({base})")
    return Path(base) / "pytest-depfence"


def prepare(directory: Path) -> Path:
    """`directory`, made 0700 if missing, resolved; Unsafe unless it and every directory
    above it pass `check_owned` (OSError when it cannot be made or looked at)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = Path(os.path.realpath(directory))
    check_owned(directory)
    for above in directory.parents:  # a sticky /tmp: others cannot move what is root's
        check_owned(above, sticky=True)
    return directory


def check_owned(path: Path, *, sticky: bool = False, st: os.stat_result | None = None) -> None:
    """Unsafe unless `path` (whose stat `st` is, when given: an open file's) is this
    user's (or root's), not a symbolic link, and writable by no one else (`sticky`:
    unless it is a sticky directory, like /tmp)."""
    st = st or os.lstat(path)
    shared = st.st_mode & 0o022 and not (sticky and st.st_mode & stat.S_ISVTX)
    if stat.S_ISLNK(st.st_mode) or st.st_uid not in (0, os.geteuid()) or shared:
        raise Unsafe(
            f"{path} is not this user's alone (owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}): nothing is run or loaded from there"
        )
