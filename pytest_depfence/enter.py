"""`depfence-enter` (enter.c), the program a fenced command starts as: built once per
machine and user with the C compiler, kept in a cache (`cache_dir`, `helper`).

It does in one exec what `/bin/sh` (the move into the cgroup) and `unshare --cgroup`
do in two, and drops the capabilities and takes the seccomp filter a thread of the
owner's would otherwise take first (confine.py): about 1.5 ms less at every run here.
Where it cannot be built (no C compiler, another architecture) or the cache is not safe
to run from, fenced commands start through that chain as before, which `reason` says
(`depfence doctor`).

The cache holds what runs as the fence's owner at every run, root: it is used only
while `cachedir` finds it and every directory above it the owner's (or root's) alone.
The file's name carries a digest of the source, the flags and the architecture, so a
new version builds its own; it is built under a temporary name and renamed into
place, so processes building at once (pytest-xdist) never run half a file. A new
build runs once (`--` then `true`) before it is kept: a compiler whose output cannot
run leaves none.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

from . import cachedir
from .cachedir import cache_dir

SOURCE = Path(__file__).with_name("enter.c")
#: Freestanding and static: no libc (nor libc6-dev) and nothing for ld.so to do at exec.
#: No stack protector (its canary lives in libc's thread block, which is not there) and
#: no loop turned into a memcpy call.
CFLAGS = (
    "-O2", "-static", "-nostdlib", "-fno-pie", "-no-pie", "-ffreestanding", "-fno-builtin",
    "-fno-stack-protector", "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables",
)  # fmt: skip
#: Seconds a build may take.
BUILD_TIMEOUT = 60.0


class Unavailable(Exception):
    """Why there is no helper: fenced commands start through sh and unshare."""


@functools.cache
def _found() -> str | Unavailable:
    try:
        return build(cache_dir())
    except cachedir.Unsafe as exc:
        return Unavailable(str(exc))
    except Unavailable as exc:
        return exc
    except OSError as exc:  # a directory above the cache that cannot be read, say
        return Unavailable(f"cannot build or check depfence-enter: {exc}")


def helper() -> str | None:
    """The helper's path (built now if this user's cache has none), or None."""
    found = _found()
    return found if isinstance(found, str) else None


def reason() -> str | None:
    """Why `helper()` is None (None when there is a helper)."""
    found = _found()
    return None if isinstance(found, str) else str(found)


def build(directory: Path) -> str:
    """The helper in `directory` (made 0700 if missing), built there unless it is; its
    path. Unavailable when it cannot be built, or the directory or file is not safe."""
    source = SOURCE.read_bytes()
    machine = platform.machine()
    digest = hashlib.sha256(source + repr((CFLAGS, machine)).encode()).hexdigest()[:16]
    try:
        directory = cachedir.prepare(directory)
    except cachedir.Unsafe as exc:
        raise Unavailable(str(exc)) from exc
    except OSError as exc:
        raise Unavailable(f"cannot make the cache directory {directory}: {exc.strerror}") from exc
    path = directory / f"depfence-enter-{machine}-{digest}"
    if os.statvfs(directory).f_flag & os.ST_NOEXEC:
        raise Unavailable(f"{directory} is on a file system mounted noexec")
    if os.path.lexists(path):
        try:
            cachedir.check_owned(path)
        except cachedir.Unsafe as exc:
            raise Unavailable(str(exc)) from exc
        if not os.stat(path).st_mode & stat.S_IXUSR:
            raise Unavailable(f"{path} is not executable")
        return str(path)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise Unavailable("no C compiler (cc) to build depfence-enter")
    partial = directory / f".{path.name}.{os.getpid()}"
    try:
        _compile(compiler, partial)
        os.chmod(partial, 0o700)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return str(path)


def _compile(compiler: str, output: Path) -> None:
    try:
        built = subprocess.run(
            [compiler, *CFLAGS, "-o", str(output), str(SOURCE)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
        )  # fmt: skip
        if built.returncode != 0:
            lines = (built.stderr or built.stdout).strip().splitlines() or ["no output"]
            raise Unavailable(f"{compiler} could not build {SOURCE.name}: {lines[-1]}")
        tried = subprocess.run(
            [str(output), "--", "true"], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"building {SOURCE.name} took over {exc.timeout:.0f} s") from exc
    except OSError as exc:
        raise Unavailable(f"cannot build {SOURCE.name} with {compiler}: {exc}") from exc
    if tried.returncode != 0:
        raise Unavailable(
            f"{compiler}'s {SOURCE.name} does not run (exit {tried.returncode}): "
            f"{tried.stderr.strip()[-200:]}"
        )
