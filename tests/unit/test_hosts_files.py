"""Reading a hosts file (addresses.read_hosts): its lines, which inode it is as the kernel
names it, and what is never read (a FIFO would block the reader forever)."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

from pytest_depfence.addresses import mount_dev, parse_hosts, read_hosts

MOUNTINFO = (
    "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "98 22 0:52 /tmp/x/private.list /etc/hosts rw - tmpfs tmpfs rw\n"
    "99 22 259:1048577 / /big rw - btrfs /dev/nvme0n1p1 rw,subvol=/\n"
)


def test_lines_give_addresses_and_normalized_names() -> None:
    text = (
        "# comment\n"
        "127.0.0.1 localhost\n"
        "10.77.1.2   API.GitHub.com. api  # trailing comment\n"
        "fe80::1%eth0 linklocal.test\n"
        "not-an-address github.com\n"
        "10.77.1.1\n"
    )
    assert parse_hosts(text) == [
        (ipaddress.ip_address("127.0.0.1"), ("localhost",)),
        (ipaddress.ip_address("10.77.1.2"), ("api.github.com", "api")),
        (ipaddress.ip_address("fe80::1"), ("linklocal.test",)),
    ]


def test_a_mount_gives_its_device_in_the_kernels_encoding() -> None:
    assert mount_dev(MOUNTINFO, 22) == 254 << 20 | 1
    assert mount_dev(MOUNTINFO, 98) == 52
    assert mount_dev(MOUNTINFO, 99) == 259 << 20 | 1048577  # minor over 8 bits
    assert mount_dev(MOUNTINFO, 7) is None
    assert mount_dev("5 1 x:y / / rw - ext4 /dev/x rw\n", 5) is None


def test_a_regular_file_is_read_with_its_inode(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.77.1.2 api.github.com\n")
    read = read_hosts(str(hosts))
    assert read.entries == [(ipaddress.ip_address("10.77.1.2"), ("api.github.com",))]
    assert read.key is not None
    dev, ino = read.key
    info = hosts.stat()
    assert ino == info.st_ino
    # On ext4 and tmpfs (not btrfs subvolumes) stat() gives the superblock's device too.
    assert dev == os.major(info.st_dev) << 20 | os.minor(info.st_dev)


def test_a_fifo_a_directory_or_nothing_reads_as_no_entries(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[object] = []
    # In a thread, so a reader that blocked on the FIFO fails the test instead of hanging it.
    reader = threading.Thread(target=lambda: outcome.append(read_hosts(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock it: a writer lets its open() return
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert [(r.entries, r.key) for r in outcome] == [([], None)]  # type: ignore[attr-defined]
    assert (read_hosts(str(tmp_path)).entries, read_hosts(str(tmp_path)).key) == ([], None)
    assert read_hosts(str(tmp_path / "absent")).key is None
