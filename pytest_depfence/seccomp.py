"""What a fenced command may not do to the fence itself: a seccomp filter (`install`).

A fenced command runs as its caller does, root included, and keeps every
capability but CAP_NET_RAW and CAP_SYS_PTRACE (`confine`; without the latter the
owner's and guardian's memory is closed to it): CAP_SYS_ADMIN is what a deploy
script needs for `mount`, `unshare` and the like, and it is also all `bpf()` asks for.
Measured without this filter: `bpftool link detach` on the fence's links, or
`kill -9` of the guardian and the owner, and the script's next connections went
out unjudged, with no event and a green run. So a fenced command's first program,
depfence-enter, installs on itself (`packed`, given in hex) a filter the command
inherits through every fork and exec and can never remove (seccomp filters only ever
stack); where the command starts through sh and unshare instead, the thread that
forks them installs it on itself (`install`):

- `bpf()` commands that reach a program, map or link by id or pinned path
  (BPF_*_GET_FD_BY_ID, BPF_OBJ_GET) or detach one (BPF_LINK_DETACH, BPF_PROG_DETACH):
  EPERM. The fence's programs, maps and links are reached no other way (their
  descriptors are the owner's and the guardian's; a bpf-link file opened again
  through /proc is not a link). So `bpftool prog show` and `bpftool map dump`
  fail inside a fence; loading and attaching programs of one's own still works.
- pidfd_getfd (a descriptor out of another process) and pidfd_send_signal (a
  /proc/PID directory is a pidfd too): ENOSYS, so that tools fall back to kill().
- kill, tgkill, rt_(tg)sigqueueinfo, pidfd_open, ptrace and process_vm_writev aimed
  at a protected process or thread (the owner and its threads, its guardian: the
  `protected` ids; a thread's id signals its whole process), kill of their process
  groups and kill(-1) (every process): EPERM. So is fcntl(F_SETOWN) naming one of
  them (SIGIO, whose default action ends a process, would go there when the file is
  ready), and the requests that name one through a pointer: F_SETOWN_EX, FIOSETOWN,
  SIOCSPGRP. tkill (by thread id, and the owner may make threads after the filter):
  EPERM always; glibc uses tgkill.

The filter knows x86-64 (its x32 calls too) and i386 programs on it, and arm64;
elsewhere none is installed. It is not a sandbox: a root script can still reach a
thread the owner made after the run started, a service outside the fence (systemd)
that kills for it, or the guardian's cgroup. Killing the owner ends the test
session (red, never green); README's "What still gets through" says what is left.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from collections.abc import Iterable

from .errors import FenceUnavailable

#: bpf() commands a fenced command may not give (include/uapi/linux/bpf.h).
BPF_OBJ_GET, BPF_PROG_DETACH = 7, 9
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_LINK_GET_FD_BY_ID = 13, 14, 30
BPF_LINK_DETACH = 34
REFUSED_BPF = (
    BPF_OBJ_GET,
    BPF_PROG_DETACH,
    BPF_PROG_GET_FD_BY_ID,
    BPF_MAP_GET_FD_BY_ID,
    BPF_LINK_GET_FD_BY_ID,
    BPF_LINK_DETACH,
)

#: fcntl() and ioctl() requests that name a process to signal when a file is ready
#: (SIGIO's default action ends a process): F_SETOWN takes a pid or -pgid, checked;
#: F_SETOWN_EX, FIOSETOWN and SIOCSPGRP take it through a pointer, so they are refused.
F_SETOWN, F_SETOWN_EX = 8, 15
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902

#: Syscall numbers by audit architecture (AUDIT_ARCH_*: the filter's `arch` field); x32
#: calls come as x86-64 ones with a bit set, a few under numbers of their own (512+).
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64 = 0xC000003E, 0x40000003, 0xC00000B7
_X32_BIT = 0x40000000
SYSCALLS: dict[int, dict[str, tuple[int, ...]]] = {
    AUDIT_ARCH_X86_64: {
        "bpf": (321,), "kill": (62,), "tkill": (200,), "tgkill": (234,),
        "rt_sigqueueinfo": (129, 524), "rt_tgsigqueueinfo": (297, 536), "ptrace": (101, 521),
        "process_vm_writev": (311, 540), "pidfd_open": (434,), "pidfd_send_signal": (424,),
        "pidfd_getfd": (438,), "fcntl": (72,), "ioctl": (16, 514),
    },
    AUDIT_ARCH_I386: {
        "bpf": (357,), "kill": (37,), "tkill": (238,), "tgkill": (270,),
        "rt_sigqueueinfo": (178,), "rt_tgsigqueueinfo": (335,), "ptrace": (26,),
        "process_vm_writev": (348,), "pidfd_open": (434,), "pidfd_send_signal": (424,),
        "pidfd_getfd": (438,), "fcntl": (55, 221), "ioctl": (54,),
    },
    AUDIT_ARCH_AARCH64: {
        "bpf": (280,), "kill": (129,), "tkill": (130,), "tgkill": (131,),
        "rt_sigqueueinfo": (138,), "rt_tgsigqueueinfo": (240,), "ptrace": (117,),
        "process_vm_writev": (271,), "pidfd_open": (434,), "pidfd_send_signal": (424,),
        "pidfd_getfd": (438,), "fcntl": (25,), "ioctl": (29,),
    },
}  # fmt: skip
#: What each call is checked for: the label of its check in `program`.
CHECKS = {
    "bpf": "bpf",
    "pidfd_getfd": "enosys",
    "pidfd_send_signal": "enosys",
    "tkill": "eperm",  # by thread id: any thread of the owner's, even one made later
    "kill": "kill",
    "tgkill": "arg0",
    "rt_sigqueueinfo": "arg0",
    "rt_tgsigqueueinfo": "arg0",
    "pidfd_open": "arg0",
    "process_vm_writev": "arg0",
    "ptrace": "arg1",
    "fcntl": "fcntl",
    "ioctl": "ioctl",
}
#: The architectures a machine's programs may be built for.
ARCHES = {"x86_64": (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386), "aarch64": (AUDIT_ARCH_AARCH64,)}

# Classic BPF, as seccomp takes it (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JA, _JEQ_K, _AND_K, _RET_K = 0x20, 0x05, 0x15, 0x54, 0x06
#: A conditional jump reaches at most 255 instructions ahead: a check of more values than
#: this returns EPERM from a copy of its own after each run of them.
_NEAR = 250
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_NR, _ARCH, _ARG0, _ARG1, _ARG2 = 0, 4, 16, 24, 32  # seccomp_data (low 32 bits)
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


Instruction = tuple[int, int, int, int]


def program(
    protected: Iterable[int], machine: str | None = None, groups: Iterable[int] | None = None
) -> list[Instruction]:
    """The filter for `protected` pids and process `groups` (default: theirs) as (code,
    jt, jf, k) instructions; empty for a machine it does not know."""
    arches = ARCHES.get(machine or platform.machine(), ())
    pids = sorted({p for p in protected if p > 0})
    groups = _groups(pids) if groups is None else groups
    asm = _Assembler()
    asm.load(_ARCH)
    for arch in arches:
        asm.jump_if(arch, f"arch{arch:x}")
    asm.ret(_RET_ALLOW)  # another ABI: nothing known of it
    for arch in arches:
        asm.label(f"arch{arch:x}")
        asm.load(_NR)
        if arch == AUDIT_ARCH_X86_64:
            asm.emit(_AND_K, 0, 0, ~_X32_BIT & 0xFFFFFFFF)  # x32 calls: the same, plus a bit
        for name, numbers in SYSCALLS[arch].items():
            for number in numbers:
                asm.far_jump_if(number, CHECKS[name])
        asm.ret(_RET_ALLOW)
    asm.refuse_if("bpf", _ARG0, REFUSED_BPF)
    # kill(pid) and F_SETOWN's pid: a process, -pgid its group (kill: -1 is everything).
    signalled = [pid & 0xFFFFFFFF for pid in (-1, *pids, *(-group for group in groups))]
    asm.refuse_if("kill", _ARG0, signalled)
    asm.label("fcntl")
    asm.load(_ARG1)
    asm.far_jump_if(F_SETOWN_EX, "eperm")
    asm.jump_if(F_SETOWN, "setown")  # the next check
    asm.ret(_RET_ALLOW)
    asm.refuse_if("setown", _ARG2, signalled)
    asm.refuse_if("ioctl", _ARG1, (FIOSETOWN, SIOCSPGRP))
    asm.refuse_if("arg0", _ARG0, pids)
    asm.refuse_if("arg1", _ARG1, pids)
    asm.label("eperm")
    asm.ret(_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.ret(_RET_ERRNO | errno.ENOSYS)
    return asm.assemble() if arches else []


def packed(protected: Iterable[int]) -> bytes:
    """The filter for `protected` as the kernel takes it (struct sock_filter after struct
    sock_filter: what depfence-enter is given in hex, what `install` puts on a thread);
    empty for a machine it does not know. FenceUnavailable when it is longer than the
    kernel takes (EINVAL), said with its cause."""
    pids = tuple(sorted({p for p in protected if p > 0}))
    raw = _packed(pids, tuple(sorted(_groups(pids))), platform.machine())
    if len(raw) > MAX_INSNS * _INSN.size:
        raise FenceUnavailable(
            f"the seccomp filter that protects this process's {len(pids)} threads and "
            f"its guardian is {len(raw) // _INSN.size} instructions, over the kernel's "
            f"{MAX_INSNS}",
            fix="open fences from a process with fewer threads",
        )
    return raw


def install(protected: Iterable[int]) -> None:
    """Put the filter on the calling thread (never the whole process): what it forks
    from now on inherits it. FenceUnavailable when the kernel refuses it."""
    raw = packed(protected)
    if not raw:
        return
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(raw) // _INSN.size, ctypes.addressof(buffer))
    libc = _libc()
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise FenceUnavailable(
            "cannot put the seccomp filter that keeps a fenced command off the fence's own "
            f"programs and guardian on the thread that starts it: {os.strerror(err)}",
            fix="run as root (CAP_SYS_ADMIN), on a kernel with CONFIG_SECCOMP_FILTER",
        )


_INSN = struct.Struct("=HBBI")
#: The most instructions the kernel takes in a filter (BPF_MAXINSNS).
MAX_INSNS = 4096


@functools.lru_cache(maxsize=16)
def _packed(pids: tuple[int, ...], groups: tuple[int, ...], machine: str) -> bytes:
    """`program` as the kernel takes it; the same few pids come at every run."""
    return b"".join(_INSN.pack(*insn) for insn in program(pids, machine, groups))


def _groups(pids: Iterable[int]) -> set[int]:
    """The process groups of `pids` (kill(-pgid) reaches every process of one)."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _Assembler:
    """Classic BPF with labels: jumps are resolved to the forward offsets seccomp needs."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, int, int | str]] = []
        self._labels: dict[str, int] = {}

    def emit(self, code: int, jt: int, jf: int, k: int | str) -> None:
        self._code.append((code, jt, jf, k))

    def load(self, offset: int) -> None:
        self.emit(_LD_W_ABS, 0, 0, offset)

    def jump_if(self, value: int, label: str) -> None:
        """To `label`, at most 255 instructions ahead, if the loaded word is `value`."""
        self._code.append((_JEQ_K, -1, 0, f"{value}:{label}"))

    def far_jump_if(self, value: int, label: str) -> None:
        """To `label`, however far ahead, if the loaded word is `value`: past an
        unconditional jump otherwise (the syscall checks run after every protected pid's)."""
        self.emit(_JEQ_K, 0, 1, value)
        self._code.append((_JA, 0, 0, f"ja:{label}"))

    def ret(self, value: int) -> None:
        self.emit(_RET_K, 0, 0, value)

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def refuse_if(self, label: str, offset: int, values: Iterable[int]) -> None:
        """At `label`: EPERM when the word at `offset` is one of `values`, else allow. Each
        run of up to _NEAR values jumps to an EPERM just after it, so any number will do."""
        self.label(label)
        self.load(offset)
        listed = list(values)
        runs = [listed[at : at + _NEAR] for at in range(0, len(listed), _NEAR)] or [[]]
        for number, run in enumerate(runs):
            refused = f"{label}-refused-{number}"
            for value in run:
                self.jump_if(value, refused)
            if number < len(runs) - 1:
                self.emit(_JA, 0, 0, 1)  # over the return below, to the next run
            else:
                self.ret(_RET_ALLOW)
            self.label(refused)
            self.ret(_RET_ERRNO | errno.EPERM)

    def assemble(self) -> list[Instruction]:
        out = []
        for at, (code, jt, jf, k) in enumerate(self._code):
            if isinstance(k, str):
                value, label = k.split(":")
                offset = self._labels[label] - at - 1
                if code == _JA:
                    k = offset
                else:
                    jt, k = offset, int(value)
                if not 0 <= offset <= (0xFFFFFFFF if code == _JA else 255):
                    raise ValueError(f"seccomp jump to {label} out of reach ({offset})")
            out.append((code, jt, jf, k))
        return out
