"""`depfence doctor` run by an unprivileged user names the true cause: no root.

Run as `nobody` (setpriv drops uid, gid and supplementary groups, and with
them every capability), the doctor must fail the privileges check with its
fix, and skip (not fail, not blame) what only root can see: the cgroup tree's
writability, tracefs and the compile-and-attach step. Checks that need no
privileges (kernel, bcc, headers) must read as they do for root. Nothing here
touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pytest_depfence.cgroup import cgroup2_mount
from pytest_depfence.doctor import FAILED_EXIT, NEEDS_ROOT, as_root_command

NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")
DOCTOR = [sys.executable, "-m", "pytest_depfence", "doctor"]
#: Checks whose answer does not depend on privileges.
UNPRIVILEGED = ("kernel", "bcc", "kernel headers", "limits")
#: Checks that only root can make: skipped, with what can be seen without root.
ROOT_ONLY = ("cgroup v2", "tracefs", "compile+attach")
#: Fixes that would send an unprivileged user after the wrong cause.
WRONG_FIXES = ("bpf_link", "mount -t", "mounted read-write", "linux-headers")


def statuses(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, the rest of its first line), from doctor.format_check's
    columns: status in 5, name in 15, then the detail."""
    found = {}
    for line in stdout.splitlines():
        if line[:5].strip() in ("OK", "FAIL", "SKIP"):
            found[line[6:21].strip()] = (line[:5].strip(), line[22:])
    return found


def run_doctor(*prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *DOCTOR], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def as_nobody() -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = subprocess.run(
        [setpriv, *NOBODY, sys.executable, "-c", "import pytest_depfence"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"the user nobody cannot run {sys.executable}: {probe.stderr.strip()}")
    return run_doctor(setpriv, *NOBODY)


@pytest.fixture(scope="module")
def as_root(as_nobody: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """The same checks as root (this compiles and attaches once), for comparison."""
    return statuses(run_doctor().stdout)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_unprivileged_doctor_fails_on_privileges_with_its_fix(as_nobody):
    checks = statuses(as_nobody.stdout)
    assert as_nobody.returncode == FAILED_EXIT, describe(as_nobody)
    status, detail = checks["privileges"]
    assert status == "FAIL", describe(as_nobody)
    assert "uid 65534" in detail and "lacks" in detail, describe(as_nobody)
    fix = as_nobody.stdout.split("FAIL  privileges", 1)[1].splitlines()[1].strip()
    assert fix.startswith("fix: run it as root"), describe(as_nobody)


def test_what_needs_root_is_skipped_not_blamed(as_nobody, as_root):
    checks = statuses(as_nobody.stdout)
    for name in ROOT_ONLY:
        status, detail = checks[name]
        assert status == "SKIP" and NEEDS_ROOT in detail, describe(as_nobody)
    # What is visible without root is still said: where cgroup v2 is mounted.
    assert f"mounted at {cgroup2_mount()}" in checks["cgroup v2"][1], describe(as_nobody)
    # The one failure added by running unprivileged is the privileges check itself.
    failures = [name for name, (status, _) in checks.items() if status == "FAIL"]
    root_failures = [name for name, (status, _) in as_root.items() if status == "FAIL"]
    assert failures == ["privileges", *root_failures], describe(as_nobody)
    fixes = [line.strip() for line in as_nobody.stdout.splitlines() if "fix: " in line]
    if not root_failures:  # then the one fix shown is root's
        assert len(fixes) == 1, describe(as_nobody)
    for wrong in WRONG_FIXES:
        assert not [fix for fix in fixes if wrong in fix] or root_failures, describe(as_nobody)


def test_checks_that_need_no_root_read_the_same(as_nobody, as_root):
    unprivileged = statuses(as_nobody.stdout)
    for name in UNPRIVILEGED:
        assert unprivileged[name] == as_root[name], describe(as_nobody)


def test_the_verdict_says_how_to_run_it_as_root(as_nobody):
    last = as_nobody.stdout.splitlines()[-1]
    assert last.endswith(f"the skipped ones need root: {as_root_command()}"), describe(as_nobody)
    assert as_root_command() == f"sudo {sys.executable} -m pytest_depfence doctor"


def test_root_doctor_says_how_a_datagram_sender_is_named_here() -> None:
    """compile+attach's second line: per task where cgroup_skb reads it (the probe the
    programs were compiled with), else by socket; never both, never neither."""
    if os.geteuid() != 0:
        pytest.skip("compile+attach needs root")
    from pytest_depfence.doctor import SENDERS_BY_SOCKET, SENDERS_PER_TASK
    from pytest_depfence.kernel import toolkit

    proc = run_doctor()
    per_task = "-DDEPFENCE_NO_SKB_CURRENT_TASK=1" not in toolkit.kernel_cflags()
    expected, other = (
        (SENDERS_PER_TASK, SENDERS_BY_SOCKET) if per_task else (SENDERS_BY_SOCKET, SENDERS_PER_TASK)
    )
    assert expected in proc.stdout and other not in proc.stdout, describe(proc)


def test_root_doctor_says_which_fence_options_the_cgroup2_mount_lacks(as_root):
    from pytest_depfence.confine import read_cgroup2_mount

    status, detail = as_root["cgroup v2"]
    mount = read_cgroup2_mount()
    assert status == "OK" and mount is not None, detail
    missing = [o for o in ("nsdelegate", "favordynmods") if o not in mount.super_options]
    if missing:
        assert f"without {' and '.join(missing)}: a fence turns" in detail, detail
    else:
        assert detail == f"mounted at {cgroup2_mount()}, with nsdelegate and favordynmods"
