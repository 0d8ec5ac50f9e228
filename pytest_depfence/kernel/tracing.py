"""What the tracing programs read that depends on the machine: -D flags for bcc.

The programs watching processes (bpf/procs.c, mounts.c, escape.c, unix.c,
subcgroups.c, dispatched by bpf/syscalls.c) are raw tracepoints: a process
that attached classic (perf-event) tracepoints spends one RCU grace period
pair per tracepoint when it closes them (perf_trace_event_unreg ->
tracepoint_synchronize_unregister, under the global event_mutex, so closing
them from threads does not overlap them): 15 of them cost 0.47-0.87 s at
every process exit on 6.18; raw tracepoints detach in well under a
millisecond. bench/bench_exit.py measures both.

A raw tracepoint gets the kernel function's own arguments, not a formatted
record, so three things come from here:

- the syscall numbers (`raw_syscalls:sys_enter` and `sys_exit` fire for every
  syscall; the programs keep the few they watch) and where the syscall
  number, its arguments and the caller's mode are in `struct pt_regs`: the
  ptrace ABI of x86-64 (`user_regs_struct`) and arm64 (`user_pt_regs`), both
  UAPI. Compat (32-bit) syscalls are skipped, as the classic syscall
  tracepoints skip them (ARCH_TRACE_IGNORE_COMPAT_SYSCALLS).
- the offsets of the few kernel struct fields the classic tracepoints read
  for us (`task_struct.pid`, `cgroup.kn`, `cgroup.root`, `kernfs_node.id`,
  `cgroup_root.hierarchy_id`): read from the running kernel's own BTF
  (/sys/kernel/btf/vmlinux), never from the header tree, which may be another
  kernel's. Without BTF (or a field not found as a plain member) the three
  tracepoints that need them (sched_process_fork, cgroup_attach_task, and
  before 5.14 cgroup_mkdir/rmdir) stay classic: correct, slow to detach.
- the offsets of the path from a task to the inode behind one of its file
  descriptors (`task_struct.files` ... `super_block.s_dev`: FD_FIELDS), which
  bpf/hostsfile.c follows to tell a write to a hosts file. They are a group of
  their own: without them (DEPFENCE_NO_FD_INODE) only that check is off (a write
  into a hosts file through a descriptor is not seen; renames and creations of
  a file named hosts still are), the tracepoints above stay raw.
"""

from __future__ import annotations

import platform
import struct
from pathlib import Path

from ..errors import FenceUnavailable

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

#: Syscall numbers (the ABI of each architecture; arm64 uses asm-generic's).
SYSCALLS = {
    "x86_64": {
        "EXECVE": 59,
        "EXECVEAT": 322,
        "CONNECT": 42,
        "MOUNT": 165,
        "MOVE_MOUNT": 429,
        "CHROOT": 161,
        "PIVOT_ROOT": 155,
        "SETNS": 308,
        "CLONE3": 435,
        "SOCKET": 41,
        "SENDTO": 44,
        "SENDMSG": 46,
        "SENDMMSG": 307,
        # Writes into a file (hostsfile.c): the descriptor is the first argument, or the
        # third (copy_file_range, splice).
        "WRITE": 1,
        "PWRITE64": 18,
        "WRITEV": 20,
        "PWRITEV": 296,
        "PWRITEV2": 328,
        "FTRUNCATE": 77,
        "SENDFILE": 40,
        "COPY_FILE_RANGE": 326,
        "SPLICE": 275,
        # Making a name (hostsfile.c): the new name is read from the arguments.
        "OPEN": 2,
        "CREAT": 85,
        "OPENAT": 257,
        "OPENAT2": 437,
        "RENAME": 82,
        "RENAMEAT": 264,
        "RENAMEAT2": 316,
        "LINK": 86,
        "LINKAT": 265,
        "SYMLINK": 88,
        "SYMLINKAT": 266,
    },
    "aarch64": {
        "EXECVE": 221,
        "EXECVEAT": 281,
        "CONNECT": 203,
        "MOUNT": 40,
        "MOVE_MOUNT": 429,
        "CHROOT": 51,
        "PIVOT_ROOT": 41,
        "SETNS": 268,
        "CLONE3": 435,
        "SOCKET": 198,
        "SENDTO": 206,
        "SENDMSG": 211,
        "SENDMMSG": 269,
        "WRITE": 64,
        "PWRITE64": 68,
        "WRITEV": 66,
        "PWRITEV": 70,
        "PWRITEV2": 287,
        "FTRUNCATE": 46,
        "SENDFILE": 71,
        "COPY_FILE_RANGE": 285,
        "SPLICE": 76,
        # asm-generic has no open, creat, rename, link nor symlink: only the *at forms.
        "OPENAT": 56,
        "OPENAT2": 437,
        "RENAMEAT": 38,
        "RENAMEAT2": 276,
        "LINKAT": 37,
        "SYMLINKAT": 36,
    },
}

#: Byte offsets in struct pt_regs (ptrace ABI): the syscall number as it is at syscall
#: exit, the first three arguments and the fifth and sixth at entry, and the word telling
#: a native caller. At exit the arguments are still there but for arm64's x0, which
#: holds the return value by then: REG_EXIT_ARG0 is x86-64's di, arm64's orig_x0 (the
#: kernel's struct pt_regs, right after the UAPI user_pt_regs; unchanged since 3.7).
#: REG_ARG3 is the fourth argument: x86-64's r10 (the syscall ABI's, not the C ABI's
#: rcx), arm64's x3.
#: x86-64: orig_ax; di, si, dx, r8, r9; cs == __USER_CS (0x33) for 64-bit code (its low
#: byte: a Xen PV guest's is 0xe033, its 32-bit one 0xe023).
#: arm64: x8 (the number, never clobbered by the kernel); x0, x1, x2, x4, x5; pstate without
#: PSR_MODE32_BIT (0x10).
REGS = {
    "x86_64": {
        "REG_NR": 120,
        "REG_ARG0": 112,
        "REG_ARG1": 104,
        "REG_ARG2": 96,
        "REG_ARG3": 56,
        "REG_EXIT_ARG0": 112,
        "REG_ARG4": 72,
        "REG_ARG5": 64,
        "REG_MODE": 136,
        "MODE_MASK": 0xFF,
        "MODE_NATIVE": 0x33,
    },
    "aarch64": {
        "REG_NR": 64,
        "REG_ARG0": 0,
        "REG_ARG1": 8,
        "REG_ARG2": 16,
        "REG_ARG3": 24,
        "REG_EXIT_ARG0": 272,
        "REG_ARG4": 32,
        "REG_ARG5": 40,
        "REG_MODE": 264,
        "MODE_MASK": 0x10,
        "MODE_NATIVE": 0,
    },
}

#: (struct, field) -> the -D name of its byte offset.
BTF_FIELDS = {
    ("task_struct", "pid"): "OFF_TASK_PID",
    ("task_struct", "tgid"): "OFF_TASK_TGID",
    ("task_struct", "signal"): "OFF_TASK_SIGNAL",
    ("signal_struct", "live"): "OFF_SIGNAL_LIVE",
    ("cgroup", "kn"): "OFF_CGROUP_KN",
    ("cgroup", "root"): "OFF_CGROUP_ROOT",
    ("kernfs_node", "id"): "OFF_KERNFS_ID",
    ("cgroup_root", "hierarchy_id"): "OFF_ROOT_HIERARCHY_ID",
}

#: task->files->fdt->fd[n]->f_inode->{i_ino, i_sb->s_dev}: the file behind a descriptor.
FD_FIELDS = {
    ("task_struct", "files"): "OFF_TASK_FILES",
    ("files_struct", "fdt"): "OFF_FILES_FDT",
    ("fdtable", "max_fds"): "OFF_FDTABLE_MAX_FDS",
    ("fdtable", "fd"): "OFF_FDTABLE_FD",
    ("file", "f_inode"): "OFF_FILE_INODE",
    ("inode", "i_ino"): "OFF_INODE_INO",
    ("inode", "i_sb"): "OFF_INODE_SB",
    ("super_block", "s_dev"): "OFF_SB_DEV",
}

_BTF_MAGIC = 0xEB9F
_KIND_STRUCT = 4
#: Bytes after the 12-byte btf_type, per kind: fixed, and per vlen entry.
_KIND_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_KIND_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


def syscall_cflags(machine: str | None = None) -> list[str]:
    """-D flags for raw_syscalls: syscall numbers and pt_regs offsets of this machine."""
    machine = machine or platform.machine()
    if machine not in SYSCALLS:
        raise FenceUnavailable(
            f"pytest-depfence knows the syscall ABI of x86_64 and aarch64, not {machine}",
            fix="run it on x86_64 or arm64, or add this architecture to kernel/tracing.py",
        )
    flags = [f"-DSYS_{name}={nr}" for name, nr in SYSCALLS[machine].items()]
    flags += [f"-DDEPFENCE_{name}={value}" for name, value in REGS[machine].items()]
    return flags


def btf_offsets(
    path: Path | None = None, fields: dict[tuple[str, str], str] = BTF_FIELDS
) -> dict[str, int] | None:
    """{-D name: byte offset} of every field of `fields` in the running kernel, or None
    when there is no BTF or a field is not a plain, byte-aligned member of its struct."""
    return _offset_sets(path, fields)[0]


def _offset_sets(
    path: Path | None, *field_sets: dict[tuple[str, str], str]
) -> list[dict[str, int] | None]:
    """`btf_offsets` of each field set, from one read and one walk of the types: they
    are walked from the first until every struct is found, and they come early in
    vmlinux's BTF (about the 2000th of 127,000 types on 6.18, ~1 ms)."""
    try:
        data = (path or VMLINUX_BTF).read_bytes()  # sysfs cannot be mmapped; 5 MiB read in ~2 ms
        members = _members(data, {name for fields in field_sets for name, _ in fields})
    except (OSError, ValueError, struct.error):
        return [None for _ in field_sets]
    return [_offsets(members, fields) for fields in field_sets]


def _members(data: bytes, structs: set[str]) -> dict[str, dict[str, int]] | None:
    """struct name -> {member name: bit offset} of each of `structs` BTF has (None: no
    BTF); the walk ends once all are found."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", data, 0
    )
    if magic != _BTF_MAGIC:
        return None
    strings = hdr_len + str_off
    wanted: dict[int, str] = {}  # name offset -> struct name
    for name in structs:
        at = data.find(b"\0" + name.encode() + b"\0", strings, strings + str_len)
        if at >= 0:
            wanted[at + 1 - strings] = name
    fields: dict[str, dict[str, int]] = {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end and len(fields) < len(wanted):
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == _KIND_STRUCT and name_off in wanted and wanted[name_off] not in fields:
            bitfields = bool(info >> 31)
            members = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 + i * 12)
                bits = m_off & 0xFFFFFF if bitfields else m_off
                if bitfields and m_off >> 24:
                    continue  # a bitfield: never one of ours
                members[_string(data, strings + m_name)] = bits
            fields[wanted[name_off]] = members
        pos += 12 + _KIND_EXTRA.get(kind, 0) + _KIND_PER_MEMBER.get(kind, 0) * vlen
    return fields


def _offsets(
    members: dict[str, dict[str, int]] | None, wanted_fields: dict[tuple[str, str], str]
) -> dict[str, int] | None:
    if members is None:
        return None
    offsets = {}
    for (struct_name, field), define in wanted_fields.items():
        bits = members.get(struct_name, {}).get(field)
        if bits is None or bits % 8:
            return None
        offsets[define] = bits // 8
    return offsets


def _string(data: bytes, at: int) -> str:
    return data[at : data.find(b"\0", at)].decode(errors="replace")


def btf_cflags() -> list[str]:
    """-D flags with the BTF offsets, or DEPFENCE_NO_BTF_OFFSETS (classic tracepoints);
    and those of FD_FIELDS, or DEPFENCE_NO_FD_INODE (writes through a descriptor unseen)."""
    flags = []
    found = _offset_sets(None, BTF_FIELDS, FD_FIELDS)
    for offsets, missing in zip(found, ("NO_BTF_OFFSETS", "NO_FD_INODE")):
        if offsets is None:
            flags.append(f"-DDEPFENCE_{missing}=1")
        else:
            flags += [f"-DDEPFENCE_{name}={value}" for name, value in offsets.items()]
    return flags
