"""/etc/hosts at each fenced run: read each time, what it costs learned again only when
it may have changed.

`addresses.read_own_hosts` reads the file every time; it parses it again only when its
bytes changed, and looks up its superblock's device in the mount table again (two
/proc files, the costly part) only when the thread is not in the process's own mount
namespace, a mount changed there (poll() on its mountinfo), the root changed or the
file is another inode. Here a file of the test's stands in for /etc/hosts (the function
takes its path), and the look-ups and parses are counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_net import private_hosts

from pytest_depfence import addresses

if os.geteuid() != 0:
    pytest.skip("mount namespaces need root", allow_module_level=True)

V1 = "10.77.1.1 github.com\n"
V2 = "10.77.1.2 github.com\n"  # the same size


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the mount table was read and the bytes parsed, from nothing kept."""
    done = {"mount table": 0, "parse": 0}
    mount_dev, parse = addresses._mount_dev, addresses._parse

    def counted_mount_dev(fd: int, mountinfo: str) -> int | None:
        done["mount table"] += 1
        return mount_dev(fd, mountinfo)

    def counted_parse(data: bytes) -> addresses.HostsEntries:
        done["parse"] += 1
        return parse(data)

    monkeypatch.setattr(addresses, "_mount_dev", counted_mount_dev)
    monkeypatch.setattr(addresses, "_parse", counted_parse)
    monkeypatch.setattr(addresses, "_seen", None)
    return done


def names(read: addresses.HostsFile) -> list[tuple[str, tuple[str, ...]]]:
    return [(str(address), hostnames) for address, hostnames in read.entries]


def test_the_same_file_is_looked_up_and_parsed_once_and_its_changes_always_read(
    tmp_path: Path, work: dict[str, int]
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    first = addresses.read_own_hosts(str(hosts))
    assert addresses.read_own_hosts(str(hosts)) == first
    assert names(first) == [("10.77.1.1", ("github.com",))]
    assert work == {"mount table": 1, "parse": 1}

    # The same size, every time stat() shows put back: only the bytes tell.
    before = hosts.stat()
    hosts.write_text(V2)
    os.utime(hosts, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert names(addresses.read_own_hosts(str(hosts))) == [("10.77.1.2", ("github.com",))]
    assert work == {"mount table": 1, "parse": 2}

    replacement = tmp_path / "new"
    replacement.write_text(V2)
    replacement.replace(hosts)  # another inode under the name: looked up again
    again = addresses.read_own_hosts(str(hosts))
    assert work == {"mount table": 2, "parse": 2}
    assert again.key == addresses.read_hosts(str(hosts)).key != first.key


def test_a_mount_in_the_processs_namespace_makes_it_look_up_again(tmp_path: Path) -> None:
    # In a process with a mount namespace of its own (unshare -m), so nothing is mounted
    # on the machine: a tmpfs mounted anywhere there is a change poll() reports.
    hosts, mountpoint = tmp_path / "hosts", tmp_path / "mnt"
    hosts.write_text(V1)
    mountpoint.mkdir()
    script = f"""
import subprocess
from pytest_depfence import addresses
looked = []
real = addresses._mount_dev
addresses._mount_dev = lambda fd, mountinfo: (looked.append(fd), real(fd, mountinfo))[1]
read = lambda: addresses.read_own_hosts({str(hosts)!r})
read(); read()
print(len(looked))
subprocess.run(["mount", "-t", "tmpfs", "none", {str(mountpoint)!r}], check=True)
read(); read()
print(len(looked))
"""
    unshare = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script]
    done = subprocess.run(unshare, capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["1", "2"], done.stderr


def test_a_thread_in_a_mount_namespace_of_its_own_reads_it_all(
    tmp_path: Path, work: dict[str, int]
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(V1)
    view = addresses._mounts_view

    def twice() -> list[addresses.HostsFile]:
        return [addresses.read_own_hosts(), addresses.read_own_hosts()]

    got = private_hosts(hosts, twice)
    assert [names(read) for read in got] == [[("10.77.1.1", ("github.com",))]] * 2
    assert work == {"mount table": 2, "parse": 2}  # nothing kept of it
    assert addresses._seen is None and addresses._mounts_view == view


# The fork is the point (a child of a threaded process); the child runs only this
# module's code, then os._exit.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_keeps_nothing_of_its_parents(tmp_path: Path, work: dict[str, int]) -> None:
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
