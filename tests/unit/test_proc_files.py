"""/proc files a fence reads hold bytes that are no UTF-8, and are read all the same.

A process names itself as it likes (prctl PR_SET_NAME takes any bytes; a title cut at
15 bytes can end in half a character), and the name is in the middle of /proc/PID/stat:
it must not stop the reading of the fields after it, which say whether an owner is
alive (`cgroup.proc_stat`, the sweep and the guardian). A mount point is any bytes too,
and mountinfo lists every mount: one of them must not stop the finding of the cgroup
mounts (`cgroup.cgroup2_mount`, `limits.v1_mounts`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytest_depfence import cgroup, limits

NAMES_ITSELF = """\
import ctypes, sys
ctypes.CDLL(None).prctl(15, b"\\xff\\xfe) 1 2", 0, 0, 0)  # PR_SET_NAME
print("named", flush=True)
sys.stdin.read()
"""


def test_a_process_named_in_bytes_that_are_no_utf8_is_read() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", NAMES_ITSELF], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"named\n"
        fields = cgroup.proc_stat(child.pid)
        assert fields is not None
        assert fields[0] in ("R", "S")  # the state, after the name however it reads
        assert int(fields[19]) > 0 and cgroup.start_time(child.pid) == fields[19]
        assert cgroup.alive(child.pid, fields[19])
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def test_a_mount_point_in_bytes_that_are_no_utf8_is_passed_over(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(
        b"22 1 0:5 / /mnt/caf\xe9 rw,relatime - ext4 /dev/sda1 rw\n"
        b"30 22 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
        b"31 22 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    assert cgroup.cgroup2_mount(str(mountinfo)) == Path("/sys/fs/cgroup/unified")
    assert limits.v1_mounts(str(mountinfo)) == {"memory": Path("/sys/fs/cgroup/memory")}
