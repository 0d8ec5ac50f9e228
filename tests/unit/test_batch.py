"""kernel/batch.py's deletion when the kernel refuses a batch.

The kernel stands in here as `_call` (the bpf() syscall) and a table object with
bcc's per-key `__delitem__`: Linux 5.10 has no batch delete for an LPM trie
(ENOTSUPP, 524) and then writes no count back. The real kernel's batches are tested
in tests/integration/test_contact_counts.py.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

import pytest

from pytest_depfence.kernel import batch

ENOTSUPP = 524  # the kernel's own errno for a map without the operation


class Table:
    """A map as bcc shows it: its key type, its fd, and a per-key delete."""

    Key = ctypes.c_uint32
    map_fd = -1

    def __init__(self, keys: set[int]) -> None:
        self.keys = set(keys)

    def __delitem__(self, key: Any) -> None:
        value = key.value if hasattr(key, "value") else key
        if value not in self.keys:
            raise KeyError(value)
        self.keys.remove(value)


def test_a_refused_batch_is_deleted_key_by_key_whatever_count_it_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The count field still holds what was asked for: taken for "all deleted", it had
    # left every key in the map (an LPM trie's address rules on Debian 11).
    monkeypatch.setattr(batch, "_call", lambda cmd, attr: ENOTSUPP)
    table = Table({1, 2, 3, 4})
    batch.delete(table, [Table.Key(k) for k in (1, 2, 3)])
    assert table.keys == {4}


def test_a_batch_that_stops_at_a_gone_key_goes_on_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch deletes what it can, says how many, and stops at a key that is gone.
    table = Table({1, 2, 4})

    def call(cmd: int, attr: Any) -> int:
        asked = (Table.Key * attr.count).from_address(attr.keys)
        for i, key in enumerate(asked):
            if key not in table.keys:
                attr.count = i
                return errno.ENOENT
            table.keys.remove(key)
        return 0

    monkeypatch.setattr(batch, "_call", call)
    batch.delete(table, [Table.Key(k) for k in (1, 3, 2, 4)])
    assert table.keys == set()
