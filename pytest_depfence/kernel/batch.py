"""Whole hash maps read, and many of their keys deleted, a batch per syscall.

A run's end forgets what the kernel recorded of its cgroups (programs.py):
one pass over each map, keeping what belongs to them, then one deletion.
bcc's per-key iteration costs two syscalls and ~13 us of Python per entry
(66 ms for the 5,000 socket owners of bench/bench_traffic.py's short
connections); BPF_MAP_LOOKUP_BATCH and BPF_MAP_DELETE_BATCH (Linux 5.6, hash
and LRU hash maps; every kernel this project supports) do it in a few
syscalls. bcc's own batch calls need bcc 0.20, newer than Debian 11's 0.18,
so these are made here, by syscall, on the maps' fds. Should the kernel refuse
them anyway, bcc's per-key calls do the same work, slower.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from .progload import bpf

_BPF_MAP_LOOKUP_BATCH = 24
_BPF_MAP_DELETE_BATCH = 27
#: Entries asked for per lookup syscall, at most; doubled when one hash bucket holds more.
CHUNK = 512
#: ... and no more than this many bytes of keys and values: the buffers are allocated
#: (and zeroed) for every call, and 512 process records (4.4 KB each) made every run's
#: end page in 2.25 MB for the few records it had (~0.2 ms).
CHUNK_BYTES = 64 << 10


class _BatchAttr(ctypes.Structure):
    """union bpf_attr's `batch` member (uapi/linux/bpf.h), zero-padded like the union."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("pad", ctypes.c_uint64 * 8),
    ]


def _call(cmd: int, attr: _BatchAttr) -> int:
    """The syscall's errno (0: success); attr.count says how many entries it did."""
    return bpf(cmd, attr)[1]


def entries(table: Any) -> list[tuple[Any, Any]]:
    """Every (key, leaf) of a bcc hash table, as bcc's `items()` gives them (ctypes
    objects: a scalar key or leaf too, with its `.value`)."""
    try:
        return _lookup_batch(table)
    except OSError:
        return [(key, leaf) for key, leaf in table.items()]


def _lookup_batch(table: Any) -> list[tuple[Any, Any]]:
    found: list[tuple[Any, Any]] = []
    # The kernel's resume token: a hash map's is a bucket index (u32); room for a key.
    token = ctypes.create_string_buffer(max(8, ctypes.sizeof(table.Key)))
    entry = ctypes.sizeof(table.Key) + ctypes.sizeof(table.Leaf)
    chunk, started = max(1, min(CHUNK, CHUNK_BYTES // entry)), False
    while True:
        keys, leaves = (table.Key * chunk)(), (table.Leaf * chunk)()
        attr = _BatchAttr(map_fd=table.map_fd, count=chunk)
        attr.in_batch = ctypes.addressof(token) if started else 0
        attr.out_batch = ctypes.addressof(token)
        attr.keys, attr.values = ctypes.addressof(keys), ctypes.addressof(leaves)
        err = _call(_BPF_MAP_LOOKUP_BATCH, attr)
        if err == errno.ENOSPC and attr.count == 0:
            chunk *= 2  # a bucket holds more entries than asked for: ask for more
            continue
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        found.extend(
            (_item(table.Key, keys, i), _item(table.Leaf, leaves, i)) for i in range(attr.count)
        )
        if err == errno.ENOENT:  # the last bucket was read
            return found
        started = True


def _item(kind: Any, array: Any, index: int) -> Any:
    """array[index] as a `kind` object: ctypes hands out a scalar element as a plain int."""
    value = array[index]
    return value if isinstance(value, kind) else kind(value)


def delete(table: Any, keys: list[Any]) -> None:
    """Delete these keys of a bcc table; keys already gone are fine. A map the kernel
    deletes no batch of (an LPM trie before Linux 6.x) has them deleted one by one."""
    if not keys:
        return
    array = (table.Key * len(keys))(*keys)
    done = 0
    while done < len(keys):
        attr = _BatchAttr(map_fd=table.map_fd, count=len(keys) - done)
        attr.keys = ctypes.addressof(array) + done * ctypes.sizeof(table.Key)
        err = _call(_BPF_MAP_DELETE_BATCH, attr)
        if err in (0, errno.ENOENT):
            # How many it deleted: written back by a batch that ran. ENOENT: the next is
            # gone already (an LRU map evicted it): skip it.
            done += attr.count + (err == errno.ENOENT)
            continue
        # Refused as a batch (ENOTSUPP: the map has no batch delete), and then the kernel
        # writes no count back, so none is trusted: one by one from `done`, where a key
        # a partial batch deleted already is gone.
        for key in keys[done:]:
            try:
                del table[key]
            except KeyError:
                pass
        return
