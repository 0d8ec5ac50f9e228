"""/etc/hosts at each fenced run: read again only when it may have changed.

`addresses.read_own_hosts` keeps the last read while the calling thread is in the
process's own mount namespace, no mount changed there (poll() on its mountinfo), the
root is the same and the file is (device, inode, size, mtime, ctime), its last change
well before that read. Here a file of the test's stands in for /etc/hosts (the
function takes its path), and the real reads are counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers_net import private_hosts

from pytest_depfence import addresses

if os.geteuid() != 0:
    pytest.skip("mount namespaces need root", allow_module_level=True)

V1 = "10.77.1.1 github.com\n"
V2 = "10.77.1.2 github.com\n"  # the same size


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `read_hosts` really read, from a cache that starts empty."""
    seen: list[str] = []
    real = addresses.read_hosts

    def counting(path: str, mountinfo: str) -> addresses.HostsFile:
        seen.append(path)
        return real(path, mountinfo)

    monkeypatch.setattr(addresses, "read_hosts", counting)
    monkeypatch.setattr(addresses, "_seen", None)
    return seen


def names(read: addresses.HostsFile) -> list[tuple[str, tuple[str, ...]]]:
    return [(str(address), hostnames) for address, hostnames in read.entries]


def test_an_unchanged_file_is_read_once_and_any_change_again(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(addresses, "_SETTLED_NS", -(10**18))  # settled at once (next test)
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    first = addresses.read_own_hosts(str(hosts))
    assert addresses.read_own_hosts(str(hosts)) == first
    assert len(reads) == 1 and names(first) == [("10.77.1.1", ("github.com",))]

    hosts.write_text(V2)  # the same size: its times tell (set apart from the clock's tick)
    os.utime(hosts, ns=(10**18, 10**18))
    assert names(addresses.read_own_hosts(str(hosts))) == [("10.77.1.2", ("github.com",))]
    assert len(reads) == 2

    hosts.write_text(V2 + "10.77.1.3 api.github.com\n")  # longer
    assert len(addresses.read_own_hosts(str(hosts)).entries) == 2
    replacement = tmp_path / "new"
    replacement.write_text(V1)
    replacement.replace(hosts)  # another inode under the name
    assert names(addresses.read_own_hosts(str(hosts))) == [("10.77.1.1", ("github.com",))]
    assert len(reads) == 4
    assert addresses.read_own_hosts(str(hosts)).key == (
        addresses.read_hosts(str(hosts), "/proc/thread-self/mountinfo").key
    )


def test_a_file_changed_just_before_its_read_is_read_again(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write in the same clock tick as the read would leave every time as it was.
    monkeypatch.setattr(addresses, "_SETTLED_NS", 10 * 10**9)
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    addresses.read_own_hosts(str(hosts))
    addresses.read_own_hosts(str(hosts))
    assert len(reads) == 2


def test_a_mount_in_the_processs_namespace_makes_it_read_again(tmp_path: Path) -> None:
    # In a process with a mount namespace of its own (unshare -m), so nothing is mounted
    # on the machine: a tmpfs mounted anywhere there is a change poll() reports.
    hosts, mountpoint = tmp_path / "hosts", tmp_path / "mnt"
    hosts.write_text(V1)
    mountpoint.mkdir()
    script = f"""
import os, subprocess
from pytest_depfence import addresses
addresses._SETTLED_NS = -(10**18)
reads = []
real = addresses.read_hosts
addresses.read_hosts = lambda path, mountinfo: (reads.append(path), real(path, mountinfo))[1]
read = lambda: addresses.read_own_hosts({str(hosts)!r})
read(); read()
print(len(reads))
subprocess.run(["mount", "-t", "tmpfs", "none", {str(mountpoint)!r}], check=True)
read(); read()
print(len(reads))
"""
    unshare = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script]
    done = subprocess.run(unshare, capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["1", "2"], done.stderr


def test_a_thread_in_a_mount_namespace_of_its_own_is_read_each_time(
    tmp_path: Path, reads: list[str]
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    view = addresses._mounts_view

    def twice() -> list[addresses.HostsFile]:
        return [addresses.read_own_hosts(), addresses.read_own_hosts()]

    got = private_hosts(hosts, twice)
    assert [names(read) for read in got] == [[("10.77.1.1", ("github.com",))]] * 2
    assert reads == ["/etc/hosts", "/etc/hosts"]  # nothing kept of it
    assert addresses._seen is None and addresses._mounts_view == view


def test_a_forked_child_keeps_nothing_of_its_parents(tmp_path: Path, reads: list[str]) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    addresses.read_own_hosts(str(hosts))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, b"%d %d" % (addresses._seen is None, addresses._mounts))
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert said == "1 -1"
    assert threading.current_thread() is threading.main_thread()
