"""One mount's filesystem type and superblock options, by statmount(2).

A fence's open checks that the cgroup2 mount has `nsdelegate` (and `favordynmods`)
on (`confine.ensure_mount_options`). Reading /proc/self/mountinfo for that costs
40 us here in a loop and ~120 us within a test's open, close and run (the kernel
formats the whole mount table); statmount(2) answers for one mount in ~3 us. It
needs Linux 6.8 (statmount, statx's STATX_MNT_ID_UNIQUE) and 6.11 for the options
(STATMOUNT_MNT_OPTS); wherever the kernel cannot say, these return None and the
caller reads mountinfo, as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

#: (statx, statmount) syscall numbers of this machine (statmount has one number on every
#: architecture); None elsewhere.
_SYSCALLS = {"x86_64": (332, 457), "aarch64": (291, 457)}.get(platform.machine())
_AT_FDCWD = -100
_STATX_MNT_ID_UNIQUE = 0x4000
#: struct statx: stx_mask at 0, stx_mnt_id at 0x90 (uapi/linux/stat.h).
_STATX_SIZE, _STATX_MNT_ID = 256, 0x90
STATMOUNT_FS_TYPE, STATMOUNT_MNT_OPTS = 0x20, 0x80
#: struct statmount: size, mnt_opts, mask, ..., fs_type at 36; its strings from 512, each
#: named by its offset there (uapi/linux/mount.h).
_STATMOUNT_FS_TYPE, _STATMOUNT_STR = 36, 512
_BUF_SIZE = 4096
_libc = ctypes.CDLL(None, use_errno=True)


def mount_id(path: str | os.PathLike[str]) -> int | None:
    """The unique id of the mount at `path` (statx), or None before Linux 6.8."""
    if _SYSCALLS is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.syscall(_SYSCALLS[0], _AT_FDCWD, os.fsencode(path), 0, _STATX_MNT_ID_UNIQUE, buf):
        return None
    (mask,) = struct.unpack_from("<I", buf.raw)
    (unique,) = struct.unpack_from("<Q", buf.raw, _STATX_MNT_ID)
    return unique if mask & _STATX_MNT_ID_UNIQUE else None


def super_options(unique_id: int) -> tuple[str, tuple[str, ...]] | None:
    """(filesystem type, superblock options) of the mount with this unique id in this
    thread's mount namespace, or None: no such mount, or a kernel that cannot say."""
    if _SYSCALLS is None:
        return None
    request = ctypes.create_string_buffer(
        struct.pack("<IIQQ", 24, 0, unique_id, STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS)
    )
    buf = ctypes.create_string_buffer(_BUF_SIZE)
    if _libc.syscall(_SYSCALLS[1], request, buf, _BUF_SIZE, 0):
        return None
    raw = buf.raw
    size, opts, mask = struct.unpack_from("<IIQ", raw)
    wanted = STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS
    if mask & wanted != wanted or size > _BUF_SIZE:
        return None
    (fs_type,) = struct.unpack_from("<I", raw, _STATMOUNT_FS_TYPE)

    def string(offset: int) -> str:
        at = _STATMOUNT_STR + offset
        return raw[at : raw.index(b"\0", at)].decode(errors="replace")

    return string(fs_type), tuple(o for o in string(opts).split(",") if o)
