"""BPF_PROG_LOAD by syscall: for a bcc whose `load_func()` takes no attach type, and
the helper probe.

bcc's `BPF.load_func()` passes `expected_attach_type` only from 0.25; sock_addr
programs are refused without it. On an older bcc (0.18 on Debian 11 and Ubuntu
22.04) `load_by_syscall` loads the instructions bcc compiled (map fds already
in them) with BPF_PROG_LOAD itself, and `ProgramLoadError` carries what the
verifier said, in the words bcc's own `load_func()` uses. `has_helper` loads a
four-instruction program to learn whether a program type may call a helper on
this kernel. `toolkit.load_program` chooses between bcc and this.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import sys
from dataclasses import dataclass
from typing import Any

_BPF_PROG_LOAD = 5
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: Any) -> tuple[int, int]:
    """The bpf(2) syscall `cmd` on the ctypes structure `attr`: (its result, errno or 0)."""
    result = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return int(result), ctypes.get_errno() if result < 0 else 0


@dataclass(frozen=True)
class LoadedProgram:
    """A program loaded by `load_by_syscall`: what bcc's `BPF.Function` gives, fd and name.
    The fd stays open for the life of the process, as bcc's would."""

    name: bytes
    fd: int


class ProgramLoadError(OSError):
    """BPF_PROG_LOAD refused a program; `verifier_log` is what the verifier said."""

    def __init__(self, err: int, name: str, verifier_log: str) -> None:
        # The words bcc's own load_func uses, so a failure reads the same on every bcc.
        super().__init__(err, f"Failed to load BPF program {name.encode()!r}: {os.strerror(err)}")
        self.verifier_log = verifier_log

    def __str__(self) -> str:
        return str(self.strerror)


class _ProgLoadAttr(ctypes.Structure):
    """union bpf_attr for BPF_PROG_LOAD, up to expected_attach_type (UAPI since 4.17)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


#: Verifier log sizes tried after a failed load (the kernel answers ENOSPC when it is
#: too small; before 5.2 it takes at most 16 MiB - 1).
_LOG_SIZES = (1 << 20, (1 << 24) - 1)
_BPF_INSN_SIZE = 8


def load_by_syscall(bpf: Any, name: str, prog_type: int, attach_type: int) -> LoadedProgram:
    """BPF_PROG_LOAD with `expected_attach_type`, for a bcc whose `load_func()` has none.

    The instructions are the ones bcc compiled (map fds already in them), read through
    libbcc's `bpf_function_start`/`bpf_function_size`, as `load_func()` reads them; the
    license is the module's. Only bcc's BTF line info is left out: a verifier log then
    shows instructions without source lines.
    """
    lib = libbcc(bpf)
    start = lib.bpf_function_start(bpf.module, name.encode())
    if not start:
        raise ValueError(f"the compiled object has no function {name!r}")
    size = lib.bpf_function_size(bpf.module, name.encode())
    license_ = lib.bpf_module_license(bpf.module)  # bytes (bcc declares a char *)
    return load_instructions(name, prog_type, attach_type, ctypes.string_at(start, size), license_)


#: Prefixes of bcc's function names that libbcc leaves out of the name the kernel keeps
#: (`bpftool prog show`), so that a program loaded here is named as when bcc loads it.
_BCC_PREFIXES = ("raw_tracepoint__", "tracepoint__", "kretprobe__", "kprobe__")


def object_name(name: str) -> bytes:
    """The name the kernel keeps for function `name` (15 bytes at most), as libbcc gives it."""
    for prefix in _BCC_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.encode()[:15]


def load_instructions(
    name: str, prog_type: int, attach_type: int, insns: bytes, license_: bytes
) -> LoadedProgram:
    """BPF_PROG_LOAD of `insns` (struct bpf_insn, as bcc compiled them: `load_by_syscall`,
    or from the cache: `progcache`) with `expected_attach_type`; ProgramLoadError says
    what the verifier said."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license_)
    attr = _ProgLoadAttr()
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns) // _BPF_INSN_SIZE
    attr.insns = ctypes.addressof(code)
    attr.license = ctypes.addressof(license_buf)
    attr.prog_name = object_name(name)
    attr.expected_attach_type = attach_type
    fd, err = _prog_load(attr)
    if fd < 0 and err == errno.EPERM and _raise_memlock():
        fd, err = _prog_load(attr)  # before 5.11, BPF memory counts against RLIMIT_MEMLOCK
    if fd >= 0:
        return LoadedProgram(name.encode(), fd)
    raise ProgramLoadError(err, name, _verifier_log(attr))


def libbcc(bpf: Any) -> Any:
    """libbcc as bcc's Python package declared it (restype and argtypes set)."""
    module = sys.modules.get("bcc.libbcc")
    lib = getattr(module, "lib", None)
    if lib is None:
        raise ImportError(f"bcc's libbcc module is not loaded (bcc object {type(bpf)!r})")
    return lib


def _prog_load(attr: _ProgLoadAttr) -> tuple[int, int]:
    return bpf(_BPF_PROG_LOAD, attr)


def _verifier_log(attr: _ProgLoadAttr) -> str:
    """Load again with a log, for the verifier's words (what bcc prints on failure)."""
    for size in _LOG_SIZES:
        buf = ctypes.create_string_buffer(size)
        attr.log_level, attr.log_size = 1, size
        attr.log_buf = ctypes.addressof(buf)
        fd, err = _prog_load(attr)
        if fd >= 0:  # loaded this time: nothing to explain; not ours to keep
            os.close(fd)
            return ""
        if err != errno.ENOSPC:
            return buf.value.decode(errors="replace").strip()
    return buf.value.decode(errors="replace").strip()


def _raise_memlock() -> bool:
    """Lift RLIMIT_MEMLOCK as bcc does for its maps; False when it was no limit already."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return False
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, unlimited)
    except (ValueError, OSError):
        return False
    return True


def has_helper(prog_type: int, helper: int) -> bool:
    """Whether programs of `prog_type` may call helper number `helper` on this kernel:
    a four-instruction program that calls it, loaded and closed (a few microseconds)."""
    insns = (ctypes.c_uint64 * 4)(
        _insn(0xB7, dst=1, imm=1),  # r1 = 1 (the helper's argument)
        _insn(0x85, imm=helper),  # call helper
        _insn(0xB7, dst=0, imm=0),  # r0 = 0
        _insn(0x95),  # exit
    )
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr()
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns)
    attr.insns = ctypes.addressof(insns)
    attr.license = ctypes.addressof(license_)
    fd, err = _prog_load(attr)
    if fd < 0 and err == errno.EPERM and _raise_memlock():
        fd, err = _prog_load(attr)
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> int:
    """One struct bpf_insn as the little-endian u64 it is on x86-64 and arm64."""
    return code | (dst | src << 4) << 8 | (off & 0xFFFF) << 16 | (imm & 0xFFFFFFFF) << 32
