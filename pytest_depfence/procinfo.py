"""Who asked: a pid's command line and its ancestry up to the fenced script.

The kernel's records (argv copied at exec, parent at fork) are the source of
truth, because the asker may have exited and its pid been reused by the time
we look. /proc is read only to complete an argv the kernel had to truncate,
and only when what /proc shows still starts with what the kernel saw.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from os.path import basename
from typing import Protocol

#: The furthest we walk up a process tree (guards against a parent loop in stale records).
MAX_DEPTH = 64
#: Command lines remembered (each DNS query names its process and the chain above it).
_CMDLINES_KEPT = 4096
_cmdlines: dict[tuple[tuple[str, ...], bool, str | None], str] = {}


class ProcRecord(Protocol):
    """What the kernel recorded of a process (`kernel.ProcRecord`)."""

    @property
    def pid(self) -> int: ...
    @property
    def ppid(self) -> int: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def exited(self) -> bool: ...
    @property
    def cgroup_id(self) -> int: ...
    @property
    def exe(self) -> str: ...


class ProcSource(Protocol):
    """Where process records come from (the loaded programs' `procs` map)."""

    def process(self, pid: int, at_ns: int | None = None) -> ProcRecord | None: ...


@dataclass(frozen=True)
class Attribution:
    pid: int | None
    cmdline: str | None
    ancestry: tuple[tuple[int, str], ...]
    unattributed: str | None = None
    #: `pid` is the socket's owner (who created, connected or addressed it), not surely
    #: the process that sent the message (kernel.Owner.by_socket).
    by_socket: bool = False


def read_proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def cmdline_of(record: ProcRecord) -> str:
    """The record's command line, shell-quoted; a truncated argv completed from /proc
    while the process is alive; then, when argv[0] does not name the program that runs
    (`exec -a innocuous-tool curl ...`), " (exe PATH)" with the path it was exec'd by.
    Remembered per argv and exe: the same process asking again (every query of a
    resolver loop) costs a lookup, not a quoting of every argument."""
    if record.truncated and not record.exited:
        # /proc may say more, or something new, each time
        return _live_cmdline(record) + _exe_note(record)
    key = (record.argv, record.truncated, record.exe)
    text = _cmdlines.get(key)
    if text is None:
        text = shlex.join(record.argv) + (" …" if record.truncated else "") + _exe_note(record)
        if len(_cmdlines) >= _CMDLINES_KEPT:
            _cmdlines.clear()
        _cmdlines[key] = text
    return text


def _exe_note(record: ProcRecord) -> str:
    """' (exe PATH)' when the program's name in argv[0] is not the one exec'd, else ''."""
    exe = record.exe
    if not exe or (record.argv and basename(record.argv[0]) == basename(exe)):
        return ""
    return f" (exe {shlex.quote(exe)})"


def _live_cmdline(record: ProcRecord) -> str:
    # Only a live process is still the one the kernel recorded (a reused pid is re-recorded).
    live = read_proc_cmdline(record.pid)
    if live and _extends(live, list(record.argv)):
        return shlex.join(live)
    return shlex.join(record.argv) + " …"


def _extends(full: list[str], prefix: list[str]) -> bool:
    if len(full) < len(prefix) or not prefix:
        return False
    head = all(f == p for f, p in zip(full[: len(prefix) - 1], prefix[:-1]))
    return head and full[len(prefix) - 1].startswith(prefix[-1])


def attribute(
    source: ProcSource, pid: int, cgroup_id: int, root_pid: int | None, at_ns: int | None = None
) -> Attribution:
    """Command line and ancestry of `pid`, as recorded inside fence cgroup `cgroup_id`; with
    `at_ns` (CLOCK_MONOTONIC), as they were then: a sender that exec'd since is named by
    the program that sent, and so is each ancestor."""
    record = source.process(pid, at_ns)
    if record is None or record.cgroup_id != cgroup_id:
        return Attribution(None, None, (), f"pid {pid} was not recorded in this fence")
    ancestry: list[tuple[int, str]] = []
    seen = {pid}
    current = record
    while current.pid != root_pid and current.ppid and len(ancestry) < MAX_DEPTH:
        parent = source.process(current.ppid, at_ns)
        if parent is None or parent.cgroup_id != cgroup_id or parent.pid in seen:
            break
        ancestry.append((parent.pid, cmdline_of(parent)))
        seen.add(parent.pid)
        current = parent
    return Attribution(pid, cmdline_of(record), tuple(ancestry))
