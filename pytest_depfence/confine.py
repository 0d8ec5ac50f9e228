"""How a command enters its fence, and what keeps it there.

A fenced command (`command`: a str runs through /bin/sh -c) is started by `spawn` as
`entry_argv(...)`. Its first program is `depfence-enter [-c CAP]... [-f FILTER]
PROCS... -- ARGV` (enter.c, built by enter.py), which does steps 1 to 4 then execs the
command as execvp does; where that cannot be built, steps 1 and 2 are a chain of execs
(`/bin/sh` for each move, then util-linux's `unshare --cgroup`) that `start` forks
from a thread of its own that did steps 3 and 4 to itself first.

1. It moves itself into the fence cgroup (writes 0 to its cgroup.procs: a program of
   its own rather than preexec_fn, as running Python in a forked child of a threaded
   process is not safe), so nothing the command runs is ever outside; on a hybrid
   host with limits, into each v1 cgroup of the limits first;
2. It unshares the cgroup namespace, rooted at the fence cgroup
   (/proc/self/cgroup reads `0::/`). With `nsdelegate` on the cgroup2 mount, the
   kernel refuses to migrate a task of that namespace to a cgroup outside its root
   (`cgroup_procs_write_permission`: ENOENT), whatever the mount it names it through
   and even as root; `ensure_mount_options` turns that option on where it is off;
3. unless `raw_sockets=True`, the command is born without CAP_NET_RAW in its bounding,
   inheritable and ambient sets (so without it in the permitted and effective sets
   every exec computes, root or setuid): depfence-enter takes it out of its own sets
   before its exec (`enter_options`: `-c 13`); the chain is forked from a thread that
   dropped it first (capabilities are per thread and a child inherits its forking
   thread's; a new thread inherits its creator's namespaces: a lab's network namespace
   is the calling thread's). No raw or packet socket, which the connect-time hooks
   never see. A user namespace gives every capability back inside it (`unshare -Urn`):
   a raw or packet socket made there all the same kills its process (bpf/escape.c,
   FENCE_RAW_SOCKETS unset). This was an exec of util-linux's `setpriv` (1.2-1.6 ms of
   every run here), then that thread (0.2-0.3 ms with step 4).

4. whatever it runs may not reach the fence's programs, maps or links through
   `bpf()`, nor signal, trace or take descriptors from the process that owns the
   fence and its guardian: a seccomp filter (`seccomp.py`) put on depfence-enter (`-f`,
   the instructions in hex) or on the chain's thread before it forks, which the
   command inherits and cannot take off. Nor may it read or write their memory
   (/proc/PID/mem, measured: a root script rewrote a blocked name's rule in the owner
   and fetched it with a green run): CAP_SYS_PTRACE goes as CAP_NET_RAW does (`-c 19`),
   and without it the kernel lets a process trace only one whose capabilities are a
   subset of its own (commoncap), which the owner's and guardian's full root set is not.
   A command's own children stay traceable: strace and gdb work.

The entry program's path is found once, so a command's own PATH cannot change what
enters the fence.

Step 1 is a migration, and a migration write-locks the kernel's
cgroup_threadgroup_rwsem. From 6.0 on that lock is per-CPU by default, and
write-locking it waits for an RCU grace period whenever no migration happened in
the last few milliseconds: 14-35 ms on this 2-CPU machine, at every run of a test
(back-to-back runs of `true` hide it). The cgroup2 option `favordynmods` keeps the
lock out of per-CPU mode, so a migration costs what it did before 6.0 (forks and
exits take the lock's slow read side instead), and `ensure_mount_options` turns it on
too where the kernel has it. A kernel without it (before 6.0) never waits there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from . import enter, seccomp, statmount
from .errors import ConfigError, FenceUnavailable

MOUNTINFO = "/proc/self/mountinfo"
_MOVE_IN = ("/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"')

CAP_NET_RAW = 13
CAP_SYS_PTRACE = 19
_CAP_NAMES = {CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_PTRACE: "CAP_SYS_PTRACE"}
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_LOWER = 47, 3
_CAPABILITY_VERSION_3 = 0x20080522

# mount(2) flags for the per-mount and per-superblock options /proc/self/mountinfo
# shows as words: a remount that does not repeat them would clear them.
MS_RDONLY, MS_REMOUNT, MS_STRICTATIME = 1, 32, 1 << 24
_FLAG_WORDS = {
    "ro": MS_RDONLY,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "mand": 64,
    "dirsync": 128,
    "nosymfollow": 256,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
    "lazytime": 1 << 25,
}


@dataclass(frozen=True)
class Tools:
    """What a command enters its fence through: `enter` (depfence-enter, enter.py), or
    where it could not be built, the shell step and `unshare`."""

    unshare: str | None
    enter: str | None = None


_lock = threading.Lock()
_tools: Tools | None = None
#: The kernel did not take `favordynmods` (before 6.0 it has no such option): not asked again.
_no_favordynmods = False
#: The unique id of the cgroup2 mount whose options were last found on (`statmount`).
_checked_mount: int | None = None


def prepare(mountinfo: str = MOUNTINFO) -> Tools:
    """At each fence's open: the entry tools (found once) and the cgroup2 mount's options
    on (checked each time: a remount anywhere can turn them off); FenceUnavailable says
    what is missing and the fix."""
    global _tools
    with _lock:
        if _tools is None:
            _tools = find_tools()
        ensure_mount_options(mountinfo)
        return _tools


def find_tools() -> Tools:
    helper = enter.helper()
    unshare = shutil.which("unshare")
    if helper is None and unshare is None:
        raise FenceUnavailable(
            "unshare not found: fenced commands start through util-linux's unshare "
            f"(a cgroup namespace) where depfence-enter cannot be built ({enter.reason()})",
            fix="apt-get install gcc (to build depfence-enter), or util-linux",
        )
    return Tools(unshare=unshare, enter=helper)


def entry_argv(
    tools: Tools, procs: Sequence[Path], argv: list[str], options: Sequence[str] = ()
) -> list[str]:
    """The command line that moves into each cgroup whose cgroup.procs is in `procs`, in
    order (the fence cgroup last; before it, the v1 cgroups of its limits: `limits`),
    unshares the cgroup namespace and runs argv: depfence-enter with its `options`
    (`enter_options`), else the chain."""
    if tools.enter is not None:
        return [tools.enter, *options, *map(str, procs), "--", *argv]
    assert tools.unshare is not None
    moves = [arg for path in procs for arg in (*_MOVE_IN, str(path))]
    return [*moves, tools.unshare, "--cgroup", "--", *argv]


_P = TypeVar("_P")


def command(
    cmd: str | Sequence[str],
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
) -> tuple[list[str], str]:
    """argv to run (a str through /bin/sh -c) and the command as reports show it;
    FileNotFoundError when it is not there."""
    if isinstance(cmd, str):
        argv, shown = ["/bin/sh", "-c", cmd], cmd
    else:
        argv, shown = [os.fspath(a) for a in cmd], shlex.join(os.fspath(a) for a in cmd)
    if not argv:
        raise ConfigError(repr(cmd), "the command is empty", "Fence.run()")
    search_path = (env or os.environ).get("PATH", os.defpath)
    if not _on_path(argv[0], search_path) and not os.path.isfile(
        os.path.join(os.fspath(cwd or "."), argv[0])
    ):
        raise FileNotFoundError(2, "command not found", argv[0])
    return argv, shown


#: (command, PATH) -> where `shutil.which` found it last: a test runs the same few commands
#: again and again, and a search is a stat per PATH entry before the command's own.
_found: dict[tuple[str, str], str] = {}


def _on_path(name: str, search_path: str) -> bool:
    """Whether `name` is a command in `search_path` (as `shutil.which` says): where it was
    found before is checked first, with one access(); a command not found is looked for
    every time."""
    key = (name, search_path)
    before = _found.get(key)
    if before is not None and os.access(before, os.X_OK):
        return True
    found = shutil.which(name, path=search_path)
    if found is None:
        _found.pop(key, None)
        return False
    if len(_found) < 1024:
        _found[key] = found
    return True


def spawn(
    tools: Tools,
    procs: Sequence[Path],
    argv: list[str],
    *,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    stdin: int | IO[Any] | None,
    raw_sockets: bool,
    guardian: int | None,
) -> subprocess.Popen[bytes]:
    """Start `argv` through `entry_argv` (into each cgroup of `procs`) without the
    capabilities `start` drops and under its seccomp filter, with this process, its
    threads and its `guardian` protected; stdin as given (None: empty), output to pipes.
    depfence-enter drops them and takes the filter itself (`enter_options`), so it is
    started from this thread; the chain is started by `start`.

    In a session of its own unless its stdin is a terminal (`depfence run` at a
    prompt): a script's `kill 0` (`trap 'kill 0' EXIT`, to end its background jobs)
    signals its own process group, which would otherwise be this process's too."""
    protect = [os.getpid(), *_threads(), *([guardian] if guardian is not None else [])]

    def popen(entry: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            entry,
            bufsize=0,  # `output.Output` reads the pipes' fds: no buffered stream over them
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=not _is_terminal(stdin),
        )

    if tools.enter is not None:
        return popen(entry_argv(tools, procs, argv, enter_options(raw_sockets, protect)))
    entry = entry_argv(tools, procs, argv)
    return start(lambda: popen(entry), raw_sockets=raw_sockets, protect=protect)


def enter_options(raw_sockets: bool, protect: Sequence[int]) -> list[str]:
    """depfence-enter's options that do what `start`'s thread does: drop the capabilities
    (`dropped`), then take the seccomp filter for `protect` (in hex)."""
    options = [arg for cap in dropped(raw_sockets) for arg in ("-c", str(cap))]
    raw = seccomp.packed(protect)
    return [*options, "-f", raw.hex()] if raw else options


def dropped(raw_sockets: bool) -> tuple[int, ...]:
    """The capabilities a fenced command is born without (steps 3 and 4)."""
    return (CAP_SYS_PTRACE,) if raw_sockets else (CAP_NET_RAW, CAP_SYS_PTRACE)


def _threads() -> list[int]:
    """This process's thread ids: each signals the whole process (seccomp.py)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _is_terminal(stdin: int | IO[Any] | None) -> bool:
    if stdin is None or stdin in (subprocess.PIPE, subprocess.DEVNULL):
        return False
    try:
        return os.isatty(stdin if isinstance(stdin, int) else stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False


def start(popen: Callable[[], _P], *, raw_sockets: bool, protect: Sequence[int]) -> _P:
    """`popen()` (it starts the entry chain), from a new thread without CAP_NET_RAW
    unless `raw_sockets` (step 3 above), without CAP_SYS_PTRACE, and with the seccomp
    filter that keeps what it starts off the fence's programs and the `protect` pids
    (step 4). The thread is new each time, as neither a bounding set nor a filter ever
    comes off; what `popen` raises is raised here."""
    result: list[_P] = []
    failure: list[BaseException] = []

    def spawn() -> None:
        try:
            seccomp.install(protect)
            for cap in dropped(raw_sockets):
                drop_capability(cap)
            result.append(popen())
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=spawn, name="depfence-spawn")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def drop_capability(cap: int) -> None:
    """Take capability `cap` (CAP_NET_RAW, CAP_SYS_PTRACE) out of the calling thread's
    bounding, inheritable and ambient sets, for good (what `setpriv --bounding-set -CAP
    --inh-caps -CAP --ambient-caps -CAP` does before its exec); its effective and
    permitted sets keep it until the thread's child execs."""
    libc = _libc()
    name = _CAP_NAMES[cap]

    def check(failed: int, what: str) -> None:
        if failed:
            err = ctypes.get_errno()
            raise FenceUnavailable(
                f"cannot take {name} out of the {what} set of the thread that starts "
                f"the fenced command: {os.strerror(err)}",
                fix="run as root (the bounding set needs CAP_SETPCAP)"
                + (
                    ", or fence with raw_sockets=True to leave CAP_NET_RAW to the command"
                    if cap == CAP_NET_RAW
                    else ""
                ),
            )

    check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0, "bounding")
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)  # pid 0: this thread
    data = (_CapData * 2)()
    check(libc.capget(ctypes.byref(header), data) != 0, "inheritable (capget)")
    data[cap // 32].inheritable &= ~(1 << cap % 32)
    check(libc.capset(ctypes.byref(header), data) != 0, "inheritable (capset)")
    # The ambient set needs the capability in the inheritable one, so it is empty of it
    # now; lowered all the same, as setpriv does (EINVAL: before 4.3 there is no such set).
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_LOWER, cap, 0, 0) != 0:
        check(ctypes.get_errno() != errno.EINVAL, "ambient")


@dataclass(frozen=True)
class Cgroup2Mount:
    """The cgroup2 line of a mountinfo file: where, and its mount and superblock options."""

    path: Path
    mount_options: tuple[str, ...]
    super_options: tuple[str, ...]

    @property
    def nsdelegate(self) -> bool:
        return "nsdelegate" in self.super_options

    @property
    def favordynmods(self) -> bool:
        return "favordynmods" in self.super_options

    def remount_request(self, option: str = "nsdelegate") -> tuple[int, str]:
        """mount(2) flags and data that turn `option` on and keep every other option."""
        words = (*self.mount_options, *self.super_options)
        flags = MS_REMOUNT
        for word in words:
            flags |= _FLAG_WORDS.get(word, 0)
        if not {"noatime", "relatime"} & set(words):
            flags |= MS_STRICTATIME  # else the kernel's default, relatime, replaces it
        fs_options = [w for w in self.super_options if w not in ("rw", option, *_FLAG_WORDS)]
        return flags, ",".join([*fs_options, option])


def read_cgroup2_mount(mountinfo: str = MOUNTINFO) -> Cgroup2Mount | None:
    """The first cgroup2 mount in `mountinfo`, or None. Read at every fence's open: only
    its line is split (a path's spaces are escaped in mountinfo, so " - " is only ever
    the separator before the filesystem type)."""
    with open(mountinfo, "rb") as f:
        data = f.read()
    at = data.find(b" - cgroup2 ")
    if at < 0:
        return None
    start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
    fields = data[start : end if end >= 0 else len(data)].decode(errors="replace").split()
    sep = fields.index("-")
    super_options = fields[sep + 3] if len(fields) > sep + 3 else ""
    return Cgroup2Mount(
        Path(fields[4]),
        tuple(fields[5].split(",")),
        tuple(o for o in super_options.split(",") if o),
    )


def ensure_mount_options(mountinfo: str = MOUNTINFO) -> None:
    """Make the cgroup2 hierarchy refuse migrations out of a cgroup namespace, and make a
    migration cheap (`favordynmods`, where the kernel has it: see the module's notes).

    Without `nsdelegate` (a flag of the one cgroup2 hierarchy, set by remounting any
    of its mounts) a root process in a cgroup namespace can still move itself to any
    cgroup it can name. systemd mounts cgroup2 with it; hosts that mount it by hand
    often do not, so the fence remounts it, keeping every other option. The kernel
    takes the flags only from a process in the initial cgroup namespace. Both stay on.
    """
    global _no_favordynmods, _checked_mount
    if mountinfo == MOUNTINFO and _options_still_on():
        return
    mount = read_cgroup2_mount(mountinfo)
    if mount is None:
        return  # no cgroup2 at all: cgroup.py says so, with its fix
    path, error = mount.path, None
    if not mount.nsdelegate:
        error = _remount(mount, "nsdelegate")
        mount = read_cgroup2_mount(mountinfo)
    if mount is not None and mount.nsdelegate and not mount.favordynmods and not _no_favordynmods:
        # Only speed is at stake: a kernel that refuses it (EINVAL before 6.0, EPERM, or
        # ignores it outside the initial cgroup namespace) leaves runs slower, and is not
        # asked again. The remount keeps nsdelegate: checked below.
        _remount(mount, "favordynmods")
        mount = read_cgroup2_mount(mountinfo)
        _no_favordynmods = mount is None or not mount.favordynmods
    if mount is None or not mount.nsdelegate:
        raise FenceUnavailable(
            f"cgroup2 at {path} is mounted without nsdelegate, so a fenced root process "
            "could move itself out of its fence, and turning it on failed"
            + (f" ({error})" if error else " (not in the initial cgroup namespace?)"),
            fix=f"on the host: mount -o remount,nsdelegate {path}",
        )
    if mountinfo == MOUNTINFO:
        _checked_mount = statmount.mount_id(mount.path)


def _options_still_on() -> bool:
    """Whether the cgroup2 mount found last has its options on still, asked of the kernel
    for that one mount (`statmount`; the options are the one hierarchy's, so a remount
    anywhere shows). False when it cannot say: then mountinfo is read."""
    if _checked_mount is None:
        return False
    found = statmount.super_options(_checked_mount)
    if found is None or found[0] != "cgroup2":
        return False
    options = found[1]
    return "nsdelegate" in options and ("favordynmods" in options or _no_favordynmods)


def _remount(mount: Cgroup2Mount, option: str) -> str | None:
    """Remount `mount` with `option` on and every other option kept; the error, or None."""
    flags, data = mount.remount_request(option)
    libc = _libc()
    text = ctypes.c_char_p
    libc.mount.argtypes = [text, text, text, ctypes.c_ulong, text]
    failed = libc.mount(b"cgroup2", os.fsencode(mount.path), b"cgroup2", flags, data.encode())
    return os.strerror(ctypes.get_errno()) if failed else None
