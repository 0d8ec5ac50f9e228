"""The toolkit side: compiling, loading and attaching the programs with bcc.

Everything here is about *how* programs get into the kernel: compiling the C
with its -D contract (capturing what clang and the verifier print), loading
each program with its expected attach type (through bcc when its `load_func()`
takes one, 0.25+, else with the BPF_PROG_LOAD syscall on the instructions bcc
compiled: `progload`), and attaching with bpf_link. The machine all this needs
(bcc found and checked, privileges, headers, tracefs) is `machine`'s; what the
programs *are* lives in `abi` and `programs`. Every failure is a
FenceUnavailable whose `reason` says what is missing and whose `fix` says
what to run.

bcc versions differ by distribution: 0.18 (Debian 11, Ubuntu 22.04), 0.26
(Debian 12), 0.29 (Ubuntu 24.04), 0.30+ (Debian 13). Two differences matter:
`BPF.load_func()` takes `attach_type` only from 0.25 (sock_addr programs need
it at load time), and bcc reads tracepoint formats only from debugfs
(/sys/kernel/debug/tracing) before 0.26 (`machine.tracefs_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import FenceUnavailable
from . import tracing
from .machine import bcc_version
from .progload import (
    LoadedProgram,
    bpf,
    has_helper,
    libbcc,
    load_by_syscall,
    load_instructions,
)

#: Program name (a function of depfence.c) -> enum bpf_attach_type (uapi/linux/bpf.h).
ATTACH_TYPES = {
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "sendmsg6": 15,  # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg4": 19,  # BPF_CGROUP_UDP4_RECVMSG
    "recvmsg6": 20,  # BPF_CGROUP_UDP6_RECVMSG
    "egress": 1,  # BPF_CGROUP_INET_EGRESS
    "sock_create": 2,  # BPF_CGROUP_INET_SOCK_CREATE
}
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPE_CGROUP_SKB = 8
PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_CGROUP_SOCK_ADDR = 18
#: Program name -> its program type, for those of ATTACH_TYPES that are not sock_addr ones.
PROG_TYPES = {"egress": PROG_TYPE_CGROUP_SKB, "sock_create": PROG_TYPE_CGROUP_SOCK}


def cgroup_program_kind(name: str) -> tuple[int, int]:
    """(program type, expected attach type) of cgroup program `name` (of ATTACH_TYPES)."""
    return PROG_TYPES.get(name, PROG_TYPE_CGROUP_SOCK_ADDR), ATTACH_TYPES[name]


BPF_FUNC_GET_CURRENT_PID_TGID = 14
BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID = 123
_BPF_LINK_CREATE = 28
#: Added to every compile of the fence's programs, a third of its time. bcc runs
#: clang's -O2 pipeline and then its own -O3 one over the result; the first is
#: skipped (the IR goes to bcc's pipeline as clang emits it, without `optnone`).
#: And no debug info: bcc would turn it into BTF, which none of these programs or
#: maps needs (no global functions, spin locks or local storage).
COMPILE_FLAGS = ("-g0", "-Xclang", "-disable-llvm-passes")


# -- sources ----------------------------------------------------------------------------


def bpf_source_dir() -> Path:
    """The C sources: inside the wheel, or `bpf/` beside the package in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "bpf", package.parent / "bpf"):
        if (candidate / "depfence.c").is_file():
            return candidate
    raise FenceUnavailable(
        f"the eBPF sources (depfence.c) are missing from {package / 'bpf'}",
        fix="reinstall pytest-depfence (the wheel carries them as pytest_depfence/bpf)",
    )


def program_text(src: Path | None = None) -> str:
    """The C that bcc compiles: depfence.c with its local includes inlined.

    bcc rewrites TRACEPOINT_PROBE argument structs only in the main text, so the
    per-concern files are inlined rather than #included. Print this to debug
    (with `abi.cflags()` for the defines).
    """
    src = src or bpf_source_dir()

    def expand(name: str, seen: set[str]) -> str:
        if name in seen:
            return ""
        seen.add(name)
        out = []
        for line in (src / name).read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith('#include "') and stripped.endswith('"'):
                out.append(expand(stripped[len('#include "') : -1], seen))
            else:
                out.append(line)
        return "\n".join(out)

    return expand("depfence.c", set())


# -- compiling and loading --------------------------------------------------------------


class StderrCapture:
    """Capture what C code writes to fd 2 (bcc prints compiler and verifier logs there)."""

    def __enter__(self) -> StderrCapture:
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace").strip()
        self._file.close()


#: Loads tried when the verifier gives up because a signal came for this process: it
#: answers EAGAIN then (a profiler or debugger stopping the process does it), and libbpf
#: retries as many times.
_LOAD_ATTEMPTS = 5


def _captured(call: Callable[[], Any]) -> tuple[Any, Exception | None, str]:
    """(result, exception, what C code printed to stderr meanwhile); a load the verifier
    gave up on for a pending signal is tried again. After a success, what was printed
    goes on to stderr: a warning, or words of another thread (a first fence compiles
    while its session is made: `fence._load_programs_while`)."""
    for _ in range(_LOAD_ATTEMPTS):
        failure: Exception | None = None
        with StderrCapture() as log:
            try:
                result = call()
            except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception; reported below
                failure = exc
        if failure is None:
            if log.text:
                print(log.text, file=sys.stderr)
            return result, None, ""
        if not _interrupted(failure):
            break
    return None, failure, log.text


def _interrupted(failure: Exception) -> bool:
    """Whether a load failed with EAGAIN: bcc says it only in words (os.strerror)."""
    return getattr(failure, "errno", None) == errno.EAGAIN or str(failure).endswith(
        os.strerror(errno.EAGAIN)
    )


def program_cflags(cflags: list[str]) -> list[str]:
    """Every flag the programs are compiled with: `cflags`, what this kernel's helpers
    and structs need (`kernel_cflags`) and COMPILE_FLAGS."""
    return [*cflags, *kernel_cflags(), *COMPILE_FLAGS]


def compile_with(bcc: ModuleType, text: str, flags: list[str]) -> Any:
    """bcc's BPF object for `text` compiled with exactly `flags` (clang runs here, in
    memory, in a thread that sees a short /proc/kallsyms: `kallsyms`). bcc loads and
    attaches the tracepoint programs here too: a refusal of one is reported as a load
    failure, not a compile one."""
    from . import kallsyms  # noqa: PLC0415 - a thread pool: not for the report header's check

    bpf, failure, log = _captured(
        lambda: kallsyms.call_with_short_kallsyms(lambda: bcc.BPF(text=text.encode(), cflags=flags))
    )
    if failure is None:
        return bpf
    refused = re.match(r"Failed to load BPF program b?'?([\w.]+)", str(failure))
    if refused:
        # clang's warnings come first; the loader's own words start at its "bpf:" line.
        at = log.find("bpf: Failed to load program")
        raise _load_failure(refused[1], failure, log[at:] if at >= 0 else log)
    raise FenceUnavailable(
        f"bcc {bcc_version(bcc)} could not compile the eBPF programs: {failure}"
        + (f"\nclang said:\n{log}" if log else ""),
        fix=(
            "check that the kernel header tree matches this kernel (depfence doctor); "
            "print the C with pytest_depfence.kernel.program_text() and report it with "
            "this output"
        ),
    ) from failure


#: Lines only a verifier log has: an instruction dump, or the verifier's own summary.
_VERIFIER_LOG = re.compile(r"^\d+: \(|^processed \d+ insns|^verification time", re.MULTILINE)
#: The verifier's words for a helper this kernel lacks for the program's type.
_UNKNOWN_HELPER = re.compile(r"^unknown func (\w+)#\d+", re.MULTILINE)


def kernel_cflags() -> list[str]:
    """-D flags for this machine: its syscall ABI and kernel struct offsets for the raw
    tracepoints (`tracing`), and what its helpers allow: the tracepoint programs walk a
    task's cgroup ancestors only where tracing programs have
    bpf_get_current_ancestor_cgroup_id (5.14+, or a kernel it was backported to;
    bpf/fence.h), and the egress program names a datagram by the task sending it only
    where cgroup_skb programs have bpf_get_current_pid_tgid (6.10+; before it, by the
    socket's owner: bpf/egress.c)."""
    flags = [*tracing.syscall_cflags(), *tracing.btf_cflags()]
    if not has_helper(PROG_TYPE_RAW_TRACEPOINT, BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID):
        flags.append("-DDEPFENCE_NO_TRACING_ANCESTORS=1")
    if not has_helper(PROG_TYPE_CGROUP_SKB, BPF_FUNC_GET_CURRENT_PID_TGID):
        flags.append("-DDEPFENCE_NO_SKB_CURRENT_TASK=1")
    return flags


def load_program(bpf: Any, name: str, prog_type: int, attach_type: int) -> Any:
    """Load one function of the compiled object as a program; say exactly what failed.

    The program is loaded with its expected attach type (sock_addr programs are refused
    without one): by bcc's `load_func()` where it takes one (0.25+), else by
    `progload.load_by_syscall`. The result has `.fd` and `.name` either way.
    """
    if load_func_takes_attach_type(bpf):
        call: Callable[[], Any] = lambda: bpf.load_func(  # noqa: E731
            name.encode(), prog_type, attach_type=attach_type
        )
    else:
        call = lambda: load_by_syscall(bpf, name, prog_type, attach_type)  # noqa: E731
    return _load(name, call)


def load_compiled(
    name: str, prog_type: int, attach_type: int, insns: bytes, license_: bytes
) -> LoadedProgram:
    """Load instructions bcc compiled in an earlier process (`progcache`), as
    `load_program` loads them: tried again and explained the same way."""
    loaded: LoadedProgram = _load(
        name, lambda: load_instructions(name, prog_type, attach_type, insns, license_)
    )
    return loaded


def _load(name: str, call: Callable[[], Any]) -> Any:
    fn, failure, log = _captured(call)
    if failure is None:
        return fn
    raise _load_failure(name, failure, getattr(failure, "verifier_log", "") or log)


def _load_failure(name: str, failure: Exception, log: str) -> FenceUnavailable:
    """Why the kernel refused program `name`: a helper it lacks, the verifier, or the load."""
    missing = _UNKNOWN_HELPER.search(log)
    if _interrupted(failure):
        # What the verifier had read when it gave up is in the log: not a rejection.
        reason = (
            f"loading the {name} program was interrupted {_LOAD_ATTEMPTS} times in a row: "
            f"the verifier gives up while a signal is pending ({failure})"
        )
        fix = (
            "is this process being traced or sampled (strace, gdb, py-spy without "
            "--nonblocking) or sent signals in a loop? Run it again without that"
        )
    elif missing:
        reason = (
            f"this kernel ({platform.release()}) has no helper {missing[1]} for the {name} "
            f"program: {failure}\n{log}"
        )
        fix = (
            "every helper and the first kernel that has it for each program type is listed "
            "at the top of bpf/*.c: report it with this output, uname -r and the bcc version"
        )
    elif _VERIFIER_LOG.search(log):
        reason = f"the kernel's verifier rejected the {name} program: {failure}\n{log}"
        fix = "report it with this output, uname -r and the bcc version (depfence doctor)"
    else:
        reason = f"loading the {name} program failed: {failure}" + (
            f"\nbcc said:\n{log}" if log else ""
        )
        fix = "check the kernel (5.8+ with BPF enabled) and privileges with: depfence doctor"
    exc = FenceUnavailable(reason, fix=fix)
    exc.__cause__ = failure
    return exc


def load_func_takes_attach_type(bpf: Any) -> bool:
    """Whether this bcc's `BPF.load_func()` can pass an expected attach type (0.25+)."""
    try:
        return "attach_type" in inspect.signature(bpf.load_func).parameters
    except (TypeError, ValueError):
        return False


def table_max_entries(table: Any) -> int:
    """A bcc table's size: its `max_entries`, which bcc before 0.20 keeps for arrays only."""
    found = getattr(table, "max_entries", None)
    if found is None:
        found = libbcc(table).bpf_table_max_entries_id(table.bpf.module, table.map_id)
    return int(found)


# -- attaching --------------------------------------------------------------------------


def bpf_link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf_link of a program to a cgroup: it detaches when the fd is closed or we die."""
    attr = (ctypes.c_uint32 * 16)()  # union bpf_attr, zero-padded
    attr[0], attr[1], attr[2], attr[3] = prog_fd, target_fd, attach_type, 0
    fd, err = bpf(_BPF_LINK_CREATE, attr)
    if fd < 0:
        raise OSError(err, f"BPF_LINK_CREATE: {os.strerror(err)}")
    return fd


def probe_link_support(prog_fd: int) -> None:
    """bpf_link for cgroups arrived in 5.7; say so plainly instead of failing per fence."""
    try:
        bpf_link_create(prog_fd, -1, ATTACH_TYPES["connect4"])
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTDIR):
            return
        if exc.errno == errno.EINVAL:
            raise FenceUnavailable(
                f"this kernel ({platform.release()}) cannot attach cgroup programs with bpf_link",
                fix="use Linux 5.8 or newer (bpf_link for cgroups 5.7, ring buffers 5.8)",
            ) from exc
        raise FenceUnavailable(
            f"probing bpf_link support failed: {exc}",
            fix="check privileges and the kernel with: depfence doctor",
        ) from exc
