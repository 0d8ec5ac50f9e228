"""A hosts file written while the run goes on is read before the writer can connect.

The fence reads /etc/hosts when a run starts and each time a fenced process
changes its mounts (bpf/mounts.c). A script with a private hosts file can
still give a blocked name an address the fence never learned by writing the
line after that: `echo "10.77.1.2 api.github.com" >> /etc/hosts; curl
http://api.github.com/`. Under no_egress("github.com") only github.com's
address is resolved at open, so api.github.com's lab address 10.77.1.2 is
known from nowhere but that line. bpf/hostsfile.c pauses the writer (a write
into a hosts file the fence read, a rename or creation of a file named hosts)
until the file is read again; each attack here must end refused at connect,
named with the domain, the line it was learned from and the command line, with
nothing of the run alive or mounted afterwards.

Each runs in its own mount namespace (`unshare --mount --propagation
private`): the machine's /etc/hosts is never touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers_net import connections

from pytest_depfence.cgroup import PARENT, cgroup2_mount, session_name

if TYPE_CHECKING:
    from pytest_depfence import Fence, FenceResult
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
_missing = [t for t in ("curl", "unshare", "mount", "sed", "mkfifo") if not shutil.which(t)]
if _missing:
    pytest.skip(
        f"these tests need {', '.join(_missing)} (apt-get install curl util-linux sed)",
        allow_module_level=True,
    )

NO_GITHUB = pytest.mark.no_egress("github.com")
PRIVATE = ["unshare", "--mount", "--propagation", "private"]
LINE = "10.77.1.2 api.github.com"
CURL = "curl -sS http://api.github.com/"


def private_hosts_file(tmp_path: Path) -> Path:
    """The file a script mounts as its /etc/hosts. Not named hosts: a write through
    this path is caught by its inode alone, not by its name."""
    source = tmp_path / "private.list"
    source.write_text("127.0.0.1 localhost\n")
    return source


def assert_refused_and_named(result: FenceResult, cmdline: str) -> None:
    """The connect to api.github.com's address was refused and named: domain, where the
    address was learned, the rule and the command line that connected."""
    assert "lab:api.github.com" not in result.stdout
    events = [e for e in connections(result) if e.address == "10.77.1.2"]
    assert events, f"no connect to 10.77.1.2 on record; events: {result.events}"
    for event in events:
        assert (event.verdict, event.blocked_at, event.forbidden) == ("blocked", "connect", True)
        assert (event.domain, event.learned_from) == ("api.github.com", "hosts file")
        assert event.rule is not None and event.rule.startswith('no_egress("github.com")')
        assert event.cmdline == cmdline


def assert_nothing_left(result: FenceResult, tmp_path: Path, machine_hosts: str) -> None:
    """No process of the run alive, no run cgroup (so nothing attached to one), no mount
    of the test's files anywhere we can see, the machine's /etc/hosts as it was."""
    for pid in {e.pid for e in result.events if e.pid is not None}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    session = cgroup2_mount() / PARENT / session_name()
    if session.exists():
        assert [p.name for p in session.iterdir() if p.is_dir()] == []
    for table in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        assert str(tmp_path) not in Path(table).read_text()
    assert Path("/etc/hosts").read_text() == machine_hosts


@pytest.fixture
def machine_hosts() -> str:
    return Path("/etc/hosts").read_text()


# --------------------------------------------------------------------------- appends


@NO_GITHUB
@pytest.mark.parametrize(
    "append",
    [
        # The shell opens /etc/hosts; cat writes through the fd 1 it inherited.
        pytest.param(f'echo "{LINE}" | cat >> /etc/hosts', id="cat-inherits-fd"),
        # Through the bind mount's source: a name that is not hosts, the same inode.
        pytest.param(f'echo "{LINE}" >> "$0"', id="via-the-source-path"),
        # A descriptor opened before the mount, written after it.
        pytest.param(f'echo "{LINE}" >&3', id="fd-opened-before-the-mount"),
    ],
)
def test_a_line_appended_to_a_private_hosts_file_is_read_before_the_connect(
    fenced: Fence, lab: Lab, tmp_path: Path, machine_hosts: str, append: str
) -> None:
    source = private_hosts_file(tmp_path)
    script = f'exec 3>>"$0"; mount --bind "$0" /etc/hosts && {append} && exec {CURL}'
    lab.clear_http_log()
    result = fenced.run([*PRIVATE, "sh", "-c", script, str(source)], check=False, timeout=30)

    assert result.returncode == 7, result.stderr  # resolved from the line, then refused
    assert LINE in source.read_text()  # the write itself went through
    assert [p for where, _, p in lab.http_log() if where == "10.77.1.2"] == []
    assert_refused_and_named(result, CURL)
    assert_nothing_left(result, tmp_path, machine_hosts)


@NO_GITHUB
def test_a_write_that_is_not_closed_is_read_before_the_connect(
    fenced: Fence, lab: Lab, tmp_path: Path, machine_hosts: str
) -> None:
    # python writes the line through a file it keeps open, then connects.
    source = private_hosts_file(tmp_path)
    code = (
        "import sys, urllib.request\n"
        "f = open(sys.argv[1], 'a')\n"
        f"f.write('{LINE}\\n')\n"
        "f.flush()\n"
        "print(urllib.request.urlopen('http://api.github.com/', timeout=10).read())\n"
    )
    python = [sys.executable, "-c", code, str(source)]
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    result = fenced.run(
        [*PRIVATE, "sh", "-c", script, str(source), *python], check=False, timeout=30
    )

    assert result.returncode == 1, result.stderr
    assert "Errno 1" in result.stderr  # EPERM: refused at connect
    assert_refused_and_named(result, shlex.join(python))
    assert_nothing_left(result, tmp_path, machine_hosts)


# --------------------------------------------------------------------------- new files


@NO_GITHUB
@pytest.mark.parametrize(
    "edit",
    [
        # sed -i writes a new file and renames it over /etc/hosts.
        pytest.param(f'sed -i "\\$a {LINE}" /etc/hosts', id="sed-i-renames"),
        # A new inode under the old name: created (the open is seen), then written.
        pytest.param(f'rm /etc/hosts && echo "{LINE}" > /etc/hosts', id="rm-and-create"),
        # Written elsewhere, moved in.
        pytest.param(f'echo "{LINE}" > /etc/new && mv /etc/new /etc/hosts', id="mv"),
    ],
)
def test_a_hosts_file_replaced_by_a_new_one_is_read_before_the_connect(
    fenced: Fence, lab: Lab, tmp_path: Path, machine_hosts: str, edit: str
) -> None:
    # A bind-mounted /etc/hosts cannot be renamed over (EBUSY): this script gets a
    # private copy of the whole /etc, where /etc/hosts is an ordinary file.
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    script = f'mount --bind "$0" /etc && {edit} && exec {CURL}'
    result = fenced.run([*PRIVATE, "sh", "-c", script, str(etc)], check=False, timeout=30)

    assert result.returncode == 7, result.stderr
    assert LINE in (etc / "hosts").read_text()
    assert_refused_and_named(result, CURL)
    assert_nothing_left(result, tmp_path, machine_hosts)


# --------------------------------------------------------------------------- never stuck


@NO_GITHUB
def test_a_hosts_file_that_cannot_be_read_never_keeps_the_process_stopped(
    fenced: Fence, tmp_path: Path, machine_hosts: str
) -> None:
    # A FIFO as /etc/hosts: opening it to read would wait for a writer forever. The
    # process is paused at the mount and at the write; each time it must go on.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = (
        'mount --bind "$0" /etc/hosts && exec 3<>/etc/hosts && echo "x" >&3 '
        "&& read line <&3 && echo read:$line"
    )
    result = fenced.run([*PRIVATE, "sh", "-c", script, str(fifo)], check=False, timeout=30)

    assert not result.timed_out
    assert (result.returncode, result.stdout) == (0, "read:x\n"), result.stderr
    assert_nothing_left(result, tmp_path, machine_hosts)
