"""The toolkit side: bcc, the machine it needs, compiling, loading and attaching.

Everything here is about *how* programs get into the kernel: finding the
distro's bcc from a virtualenv, checking its version, privileges, kernel
headers and tracefs, compiling the C with its -D contract (capturing what
clang and the verifier print), loading each program with its expected attach
type (through bcc when its `load_func()` takes one, 0.25+, else with the
BPF_PROG_LOAD syscall on the instructions bcc compiled: `progload`), and attaching with
bpf_link. What the programs *are* lives in `abi` and `programs`. Every
failure is a FenceUnavailable whose `reason` says what is missing and whose
`fix` says what to run.

bcc versions differ by distribution: 0.18 (Debian 11, Ubuntu 22.04), 0.26
(Debian 12), 0.29 (Ubuntu 24.04), 0.30+ (Debian 13). Two differences matter
here: `BPF.load_func()` takes `attach_type` only from 0.25 (sock_addr
programs need it at load time), and bcc reads tracepoint formats only from
debugfs (/sys/kernel/debug/tracing) before 0.26.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import inspect
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from ..cgroup import cgroup2_mount
from ..errors import FenceUnavailable
from . import tracing
from .progload import (
    LoadedProgram,
    bpf,
    has_helper,
    libbcc,
    load_by_syscall,
    load_instructions,
)

#: Set to a path list to say where the distro's `bcc` package lives (and only there).
BCC_PATH_ENV = "DEPFENCE_BCC_PATH"
BCC_INSTALL_HINT = (
    "install the distro package: apt-get install python3-bpfcc "
    "(bcc is not on PyPI; the PyPI package named 'bcc' is unrelated)"
)
BCC_REINSTALL_HINT = (
    "apt-get install --reinstall python3-bpfcc (or point DEPFENCE_BCC_PATH elsewhere)"
)
_DISTRO_DIRS = (
    "/usr/lib/python3/dist-packages",
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",
    "/usr/local/lib/python3/dist-packages",
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

#: The oldest bcc proven to build fences (Debian 11's and Ubuntu 22.04's python3-bpfcc).
#: Ring buffers, which every event travels on, came to bcc in 0.16.
MIN_BCC = (0, 18)
#: From this bcc on, `BPF.load_func()` takes `attach_type` (else: `progload.load_by_syscall`).
BCC_LOAD_FUNC_ATTACH_TYPE = (0, 25)
#: Before this bcc, tracepoint formats are read only from debugfs's tracing directory.
BCC_READS_TRACEFS = (0, 26)
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")

# Capabilities a fence needs (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39


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


# -- the machine ------------------------------------------------------------------------


def import_bcc() -> ModuleType:
    """Import the distro's bcc into this interpreter without adding the distro's site-packages."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    configured = os.environ.get(BCC_PATH_ENV)
    if configured is None:
        try:
            import bcc  # noqa: PLC0415

            return cast(ModuleType, bcc)
        except ImportError:
            dirs: list[str] = list(_DISTRO_DIRS)
    else:
        dirs = [d for d in configured.split(os.pathsep) if d]
    for d in dirs:
        module = _import_bcc_from(Path(d) / "bcc" / "__init__.py")
        if module is not None:
            return module
    where = f"{BCC_PATH_ENV}={configured!r}" if configured is not None else ", ".join(dirs)
    raise FenceUnavailable(f"bcc is not installed (looked in {where})", fix=BCC_INSTALL_HINT)


def locate_bcc() -> tuple[Path, str]:
    """Where `import_bcc` would load bcc from, and its version, without loading it.

    Loading bcc costs a library load (libbcc and LLVM) and tens of milliseconds: too
    much for pytest's header in a session that builds no fence. The version is read
    from the package's `version.py`, which is what `bcc.__version__` holds.
    """
    loaded = sys.modules.get("bcc")
    if loaded is not None:
        init = getattr(loaded, "__file__", None)
        return Path(init or "bcc").parent, bcc_version(loaded)
    configured = os.environ.get(BCC_PATH_ENV)
    dirs: list[str] = []
    if configured is None:
        spec = importlib.util.find_spec("bcc")  # finds a top-level package without running it
        if spec is not None and spec.origin:
            return Path(spec.origin).parent, _version_file(Path(spec.origin).parent)
        dirs = list(_DISTRO_DIRS)
    else:
        dirs = [d for d in configured.split(os.pathsep) if d]
    for d in dirs:
        if (Path(d) / "bcc" / "__init__.py").is_file():
            return Path(d) / "bcc", _version_file(Path(d) / "bcc")
    where = f"{BCC_PATH_ENV}={configured!r}" if configured is not None else ", ".join(dirs)
    raise FenceUnavailable(f"bcc is not installed (looked in {where})", fix=BCC_INSTALL_HINT)


def _version_file(package: Path) -> str:
    try:
        text = (package / "version.py").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return found[1] if found else "unknown"


def _import_bcc_from(init: Path) -> ModuleType | None:
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "bcc", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["bcc"]
        raise FenceUnavailable(
            f"bcc at {init.parent} does not load: {exc}", fix=BCC_REINSTALL_HINT
        ) from exc
    return module


def _effective_caps() -> int:
    with open("/proc/self/status", errors="replace") as f:  # Name: is any bytes
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    needed = {"CAP_SYS_ADMIN": _CAP_SYS_ADMIN, "CAP_NET_ADMIN": _CAP_NET_ADMIN}
    # Before 5.8 there is no CAP_BPF and CAP_SYS_ADMIN covers it.
    if not caps & (1 << _CAP_SYS_ADMIN):
        needed["CAP_BPF"] = _CAP_BPF
    missing = [name for name, bit in needed.items() if not caps & (1 << bit)]
    if missing:
        raise FenceUnavailable(
            "a fence needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); "
            f"this process (uid {os.geteuid()}) lacks {', '.join(missing)}",
            fix="run it as root (sudo), or give it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        )


def check_kernel_headers() -> Path:
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir():
        raise FenceUnavailable(
            f"no kernel header tree at {build} (bcc compiles the eBPF programs against it)",
            fix=(
                f"apt-get install linux-headers-{release}, or run scripts/bootstrap.sh; when "
                "this kernel has no packaged headers, link any distro header tree (e.g. "
                f"Debian's linux-headers-amd64) as {build}: the programs use only UAPI types"
            ),
        )
    return build


def _located_bcc_version() -> str:
    try:
        return locate_bcc()[1]
    except FenceUnavailable:
        return "unknown"


def tracefs_dir(mount: bool = True, bcc_version: str | None = None) -> Path | None:
    """Where bcc reads tracepoint formats. With `mount`, mounts tracefs (or, for a bcc
    older than 0.26, debugfs) when nothing is mounted; without, only checks that it could
    be (None: mountable, not mounted yet). `bcc_version`: the located bcc's by default."""
    version = _located_bcc_version() if bcc_version is None else bcc_version
    if reads_debugfs_only(version):
        # This bcc opens /sys/kernel/debug/tracing/events/... and nothing else; mounting
        # debugfs there brings tracefs along (the kernel automounts it at tracing/).
        candidates: tuple[Path, ...] = (DEBUGFS_TRACING,)
        target, fstype = DEBUGFS_TRACING.parent, b"debugfs"
        why = (
            f" (bcc {version} reads tracepoints only from {DEBUGFS_TRACING}; "
            "bcc 0.26+ also from tracefs)"
        )
        fix = f"mount -t debugfs none {target}"
    else:
        candidates = (Path("/sys/kernel/tracing"), DEBUGFS_TRACING)
        target, fstype, why = Path("/sys/kernel/tracing"), b"tracefs", ""
        fix = f"mount -t tracefs nodev {target}"
    for candidate in candidates:
        if (candidate / "events").is_dir():
            return candidate
    if not mount and target.is_dir():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if target.is_dir() and libc.mount(b"nodev", str(target).encode(), fstype, 0, None) == 0:
        if (candidates[0] / "events").is_dir():
            return candidates[0]
        err = errno.ENOENT
    else:
        err = ctypes.get_errno()
    raise FenceUnavailable(
        f"{fstype.decode()} is not mounted and mounting it at {target} failed "
        f"({os.strerror(err)}){why}",
        fix=fix,
    )


@dataclass(frozen=True)
class MachineState:
    """What a fence is built from on this machine (shown in pytest's header)."""

    kernel: str
    cgroup2: Path
    bcc_version: str

    def describe(self) -> str:
        return f"kernel {self.kernel}, cgroup2 at {self.cgroup2}, bcc {self.bcc_version}"


def preflight(load_bcc: bool = True) -> MachineState:
    """Check every part a fence needs, without compiling; FenceUnavailable names the first gap.

    With `load_bcc=False` bcc is only found, not loaded (`locate_bcc`): cheap enough for
    pytest's header in a session that may build no fence at all.
    """
    check_privileges()
    version = bcc_version(import_bcc()) if load_bcc else locate_bcc()[1]
    check_bcc_version(version)
    check_kernel_headers()
    mount = cgroup2_mount()
    tracefs_dir(mount=False, bcc_version=version)  # a header or doctor check mounts nothing
    return MachineState(platform.release(), mount, version)


def bcc_version(bcc: ModuleType) -> str:
    return str(getattr(bcc, "__version__", "unknown"))


def version_tuple(version: str) -> tuple[int, ...] | None:
    """(0, 18, 0) for "0.18.0" or "0.18.0+ds"; None when the version is not understood."""
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def reads_debugfs_only(version: str) -> bool:
    """Whether this bcc reads tracepoint formats from debugfs only (before 0.26)."""
    return _older_than(version, BCC_READS_TRACEFS)


def _older_than(version: str, bound: tuple[int, ...]) -> bool:
    """Whether a bcc version is known to be older than `bound` (unknown: assume not)."""
    parsed = version_tuple(version)
    return parsed is not None and parsed < bound


def check_bcc_version(version: str) -> None:
    """FenceUnavailable when this bcc is older than MIN_BCC."""
    if _older_than(version, MIN_BCC):
        minimum = ".".join(map(str, MIN_BCC))
        raise FenceUnavailable(
            f"bcc {version} is older than {minimum}, the oldest bcc pytest-depfence is "
            "tested with (its events travel on ring buffers, which bcc has from 0.16)",
            fix=(
                f"install python3-bpfcc {minimum} or newer (Debian 11 and Ubuntu 22.04: 0.18, "
                "Debian 12: 0.26, Ubuntu 24.04: 0.29), or point DEPFENCE_BCC_PATH at one"
            ),
        )


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
    if missing:
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
