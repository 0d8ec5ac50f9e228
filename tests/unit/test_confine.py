"""How a command enters its fence: the exec chain, and the remount that turns nsdelegate (and
favordynmods) on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_depfence import confine, options, seccomp
from pytest_depfence.errors import ConfigError, FenceUnavailable

TOOLS = confine.Tools(unshare="/usr/bin/unshare")
PROCS = Path("/sys/fs/cgroup/depfence/1-2/run-1/cgroup.procs")
HYBRID = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
SYSTEMD = (
    "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
HAND = "50 24 0:30 / /cg ro,nosuid,noatime - cgroup2 none rw,memory_localevents,favordynmods\n"
V1 = "30 24 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def test_the_chain_moves_in_then_unshares() -> None:
    argv = confine.entry_argv(TOOLS, [PROCS], ["./deploy.sh", "-x"])

    assert argv[:4] == ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(PROCS)]
    assert argv[4:] == ["/usr/bin/unshare", "--cgroup", "--", "./deploy.sh", "-x"]


def test_each_cgroup_is_entered_in_order_the_fence_last() -> None:
    mirror = Path("/sys/fs/cgroup/memory/depfence/1-2/run-1/cgroup.procs")
    argv = confine.entry_argv(TOOLS, [mirror, PROCS], ["true"])
    move = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"']
    unshare = ["/usr/bin/unshare", "--cgroup", "--"]
    assert argv == [*move, str(mirror), *move, str(PROCS), *unshare, "true"]


def test_depfence_enter_takes_every_cgroup_then_the_command() -> None:
    mirror = Path("/sys/fs/cgroup/memory/depfence/1-2/run-1/cgroup.procs")
    tools = confine.Tools(unshare=None, enter="/root/.cache/pytest-depfence/depfence-enter-x")
    argv = confine.entry_argv(tools, [mirror, PROCS], ["./deploy.sh", "--", "-x"])
    assert argv == [tools.enter, str(mirror), str(PROCS), "--", "./deploy.sh", "--", "-x"]


def capabilities(status: str, cap: int = confine.CAP_NET_RAW) -> dict[str, bool]:
    """Whether each set in /proc/PID/status text holds `cap`."""
    return {
        line.split(":")[0]: bool(int(line.split()[1], 16) >> cap & 1)
        for line in status.splitlines()
        if line.startswith("Cap")
    }


def status_of_a_child(*, raw_sockets: bool) -> str:
    child = confine.start(
        lambda: subprocess.Popen(["cat", "/proc/self/status"], stdout=subprocess.PIPE, text=True),
        raw_sockets=raw_sockets,
        protect=[],
    )
    out, _ = child.communicate(timeout=10)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root holds CAP_NET_RAW to drop")
def test_a_child_started_without_raw_sockets_never_holds_cap_net_raw_and_its_starter_keeps_it():
    mine = capabilities(Path("/proc/thread-self/status").read_text())
    assert mine["CapBnd"] and mine["CapEff"]

    assert capabilities(status_of_a_child(raw_sockets=False)) == {
        name: False for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    }
    assert capabilities(status_of_a_child(raw_sockets=True))["CapEff"]
    # CAP_SYS_PTRACE goes either way: the owner's memory is closed to the command.
    for raw_sockets in (False, True):
        status = status_of_a_child(raw_sockets=raw_sockets)
        assert not any(capabilities(status, confine.CAP_SYS_PTRACE).values())
    # The calling thread, and so the test process, keeps it.
    assert capabilities(Path("/proc/thread-self/status").read_text()) == mine


def test_what_starting_raises_is_raised_in_the_callers_thread() -> None:
    with pytest.raises(FileNotFoundError):
        confine.start(
            lambda: subprocess.Popen(["/nonexistent/depfence-x"]), raw_sockets=False, protect=[]
        )


def test_a_command_found_before_and_gone_since_is_not_found(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "depfence-test-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    env = {"PATH": str(tool.parent)}
    assert confine.command([tool.name], None, env)[0] == [tool.name]
    assert confine.command([tool.name], None, env)[0] == [tool.name]  # as found before
    tool.unlink()
    with pytest.raises(FileNotFoundError):
        confine.command([tool.name], None, env)
    other = tmp_path / "other" / tool.name  # found again, elsewhere on PATH
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    env = {"PATH": f"{tool.parent}:{other.parent}"}
    assert confine.command([tool.name], None, env)[0] == [tool.name]


def mountinfo(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(lines))
    return str(path)


def test_the_cgroup2_line_is_found_among_v1_mounts(tmp_path: Path) -> None:
    mount = confine.read_cgroup2_mount(mountinfo(tmp_path, V1, HYBRID))
    assert mount == confine.Cgroup2Mount(
        Path("/sys/fs/cgroup/unified"), ("rw", "relatime"), ("rw",)
    )
    assert not mount.nsdelegate
    assert confine.read_cgroup2_mount(mountinfo(tmp_path, V1)) is None


@pytest.mark.parametrize(
    ("line", "flags", "data"),
    [
        (HYBRID, confine.MS_REMOUNT | 1 << 21, "nsdelegate"),
        # nosuid, nodev, noexec, relatime kept; memory_recursiveprot kept; nsdelegate once
        (SYSTEMD, confine.MS_REMOUNT | 2 | 4 | 8 | 1 << 21, "memory_recursiveprot,nsdelegate"),
        # read-only, noatime; no atime word would mean strictatime
        (
            HAND,
            confine.MS_REMOUNT | confine.MS_RDONLY | 2 | 1024,
            "memory_localevents,favordynmods,nsdelegate",
        ),
    ],
)
def test_the_remount_keeps_every_other_option(
    tmp_path: Path, line: str, flags: int, data: str
) -> None:
    mount = confine.read_cgroup2_mount(mountinfo(tmp_path, line))
    assert mount is not None
    assert mount.remount_request() == (flags, data)


def test_without_an_atime_word_the_remount_keeps_strictatime(tmp_path: Path) -> None:
    line = "50 24 0:30 / /cg rw - cgroup2 none rw\n"
    mount = confine.read_cgroup2_mount(mountinfo(tmp_path, line))
    assert mount is not None
    assert mount.remount_request() == (confine.MS_REMOUNT | confine.MS_STRICTATIME, "nsdelegate")


def test_favordynmods_is_asked_for_with_nsdelegate_and_every_other_option_kept(
    tmp_path: Path,
) -> None:
    mount = confine.read_cgroup2_mount(mountinfo(tmp_path, SYSTEMD))
    assert mount is not None and not mount.favordynmods
    assert mount.remount_request("favordynmods") == (
        confine.MS_REMOUNT | 2 | 4 | 8 | 1 << 21,
        "nsdelegate,memory_recursiveprot,favordynmods",
    )


def test_options_already_on_need_no_remount(tmp_path: Path) -> None:
    # Any remount would be tried on the path in this file: with both options on, none is.
    both = SYSTEMD.replace("memory_recursiveprot", "memory_recursiveprot,favordynmods")
    confine.ensure_mount_options(mountinfo(tmp_path, V1, both))


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize("value", [True, False])
def test_raw_sockets_takes_a_bool(value: bool) -> None:
    assert options.validate("raw_sockets", value, "marker at t.py:3") is value


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_raw_sockets_rejects_anything_else_naming_where(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        options.validate("raw_sockets", value, "marker at t.py:3")
    expected = ConfigError(repr(value), "raw_sockets must be True or False", "marker at t.py:3")
    assert str(info.value) == str(expected)


def test_raw_sockets_is_a_fence_marker_setting() -> None:
    assert "raw_sockets" in options.FENCE_OPTIONS
    assert "CAP_NET_RAW" in options.RAW_SOCKETS.help


def test_the_library_and_the_cli_check_it_too() -> None:
    from pytest_depfence.cli import _parser, plan
    from pytest_depfence.fence import Fence
    from pytest_depfence.policy import Policy

    with pytest.raises(ConfigError, match=r"'yes'\" from Fence\(raw_sockets=\)"):
        Fence(Policy("no_egress", ()), upstream="10.0.0.53", raw_sockets="yes")  # type: ignore[arg-type]
    assert Fence(Policy("no_egress", ()), upstream="10.0.0.53").raw_sockets is False

    args = _parser().parse_args(["run", "--raw-sockets", "--", "true"])
    assert plan(args).raw_sockets is True
    assert plan(_parser().parse_args(["run", "--", "true"])).raw_sockets is False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setpriv drops CAP_SETPCAP from it")
def test_a_starter_that_may_not_drop_cap_net_raw_says_so_and_starts_nothing(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    marker = tmp_path / "started"
    code = (
        "import subprocess, sys\n"
        "from pytest_depfence import confine\n"
        "from pytest_depfence.errors import FenceUnavailable\n"
        "try:\n"
        f"    touch = lambda: subprocess.Popen(['touch', {str(marker)!r}])\n"
        "    confine.start(touch, raw_sockets=False, protect=[])\n"
        "except FenceUnavailable as exc:\n"
        "    print(exc.reason, '|', exc.fix)\n"
    )
    done = subprocess.run(
        [setpriv, "--bounding-set", "-setpcap", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cannot take CAP_NET_RAW out of the bounding set" in done.stdout
    assert "Operation not permitted" in done.stdout and "raw_sockets=True" in done.stdout
    assert not marker.exists()


def test_a_mount_that_cannot_take_nsdelegate_makes_the_fence_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file names a directory that is no mount at all: the remount fails (EINVAL as
    # root, EPERM otherwise), and nothing on the machine changes.
    monkeypatch.setattr(confine, "_no_favordynmods", False)
    line = f"50 24 0:30 / {tmp_path} rw - cgroup2 none rw\n"
    with pytest.raises(FenceUnavailable) as info:
        confine.ensure_mount_options(mountinfo(tmp_path, line))
    assert f"cgroup2 at {tmp_path} is mounted without nsdelegate" in str(info.value)
    assert info.value.fix == f"on the host: mount -o remount,nsdelegate {tmp_path}"
    assert not confine._no_favordynmods  # not asked for while nsdelegate is missing


def test_a_refused_favordynmods_is_not_asked_for_again_and_the_fence_stays_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confine, "_no_favordynmods", False)
    line = f"50 24 0:30 / {tmp_path} rw - cgroup2 none rw,nsdelegate\n"
    confine.ensure_mount_options(mountinfo(tmp_path, line))
    assert confine._no_favordynmods


def test_a_filter_over_the_kernels_limit_is_said_before_anything_starts() -> None:
    # A process with about a thousand threads: each is protected by name in the filter,
    # which would pass the kernel's 4096 instructions (it would refuse it: EINVAL).
    protect = list(range(100_000, 101_000))
    with pytest.raises(FenceUnavailable, match="over the kernel's 4096") as raised:
        confine.enter_options(raw_sockets=False, protect=protect)
    assert raised.value.fix == "open fences from a process with fewer threads"
    # The chain's thread puts the same filter on itself: it is said the same way, before
    # the kernel is asked (a thread of its own all the same: a filter never comes off).
    said: list[BaseException] = []
    thread = threading.Thread(target=lambda: _keep_error(said, seccomp.install, protect))
    thread.start()
    thread.join()
    assert [type(e) for e in said] == [FenceUnavailable] and str(said[0]) == str(raised.value)
    assert confine.enter_options(raw_sockets=True, protect=protect[:10])[:2] == ["-c", "19"]


def _keep_error(kept: list[BaseException], call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except BaseException as exc:
        kept.append(exc)
