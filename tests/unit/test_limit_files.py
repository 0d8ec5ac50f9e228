"""Limits without a kernel: where each controller is found, the texts, what is read back.

The cgroup files are stand-ins written to a temporary directory (the kernel's
files have the same flat-keyed format); the real enforcement is
tests/integration/test_limits.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_depfence.cli import LIMIT_EXIT, exit_code
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.events import FenceResult
from pytest_depfence.limits import Applied, Limits, Usage, where_enforced
from pytest_depfence.render import limits_text

V2 = "41 31 0:38 / {path} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MEMORY = "30 24 0:26 / {path} rw,relatime - cgroup cgroup rw,memory\n"
V1_CPU = "31 24 0:27 / {path} rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"


def mountinfo(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(lines))
    return str(path)


def v2_root(tmp_path: Path, controllers: str) -> Path:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    return root


def test_a_controller_in_v2_is_used_there_else_its_v1_hierarchy(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "pids")
    info = mountinfo(tmp_path, V2.format(path=root), V1_MEMORY.format(path="/cg/memory"),
                     V1_CPU.format(path="/cg/cpu,cpuacct"))  # fmt: skip

    placed = where_enforced(root, Limits(memory=1 << 30, cpus=1.5, pids=64), info)

    assert placed == {"memory": Path("/cg/memory"), "cpu": Path("/cg/cpu,cpuacct"), "pids": None}


def test_a_controller_the_machine_lacks_is_named_with_the_fix(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "cpu")
    info = mountinfo(tmp_path, V2.format(path=root))

    with pytest.raises(FenceUnavailable) as raised:
        where_enforced(root, Limits(memory=64 << 20), info)

    assert "the memory controller is neither in cgroup v2" in raised.value.reason
    assert raised.value.fix is not None and "cgroup_enable=memory" in raised.value.fix


def test_no_limits_need_nothing(tmp_path: Path) -> None:
    assert where_enforced(tmp_path / "absent", Limits(), "/nonexistent") == {}


def test_limits_are_shown_as_written() -> None:
    limits = Limits(memory=512 << 20, cpus=1.5, pids=256)
    assert [limits.describe(n) for n in ("memory", "cpus", "pids")] == [
        "memory=512M", "cpus=1.5", "pids=256",
    ]  # fmt: skip
    assert Limits(memory=3 << 30).shown("memory") == "3G"
    assert Limits(memory=(1 << 20) + 1).shown("memory") == str((1 << 20) + 1)


def test_the_text_names_the_limit_and_each_victim() -> None:
    usage = Usage(
        limits=Limits(memory=64 << 20, pids=16),
        oom_kills=2,
        oom_victims=((812, "python3 build.py"),),
        forks_refused=3,
    )

    assert limits_text(usage) == (
        "hit its memory limit (memory=64M): the kernel killed pid 812 python3 build.py, "
        "1 process of the run (the kernel's log did not say which) (out of memory); "
        "hit its pids limit (pids=16): the kernel refused 3 forks"
    )
    assert limits_text(Usage()) == ""


def test_usage_is_read_from_the_v2_files(tmp_path: Path) -> None:
    run = tmp_path / "depfence" / "1-2" / "run-1"
    run.mkdir(parents=True)
    applied = Applied.__new__(Applied)  # the files stand in for a kernel's cgroup
    applied.limits, applied.path, applied.mirrors, applied._kmsg = (
        Limits(memory=64 << 20, pids=8), run, {}, None,
    )  # fmt: skip
    (run / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    (run / "memory.peak").write_text("67108864\n")
    (run / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    (run / "pids.events").write_text("max 4\n")

    usage = applied.usage(lambda pid: None)  # no kernel log here: no victim to name

    assert (usage.cpu_seconds, usage.peak_memory, usage.oom_kills, usage.forks_refused) == (
        1.5, 64 << 20, 1, 4,
    )  # fmt: skip
    assert usage.hit


def test_a_limit_hit_is_its_own_exit_code_after_the_commands_and_violations() -> None:
    hit = Usage(limits=Limits(pids=8), forks_refused=1)
    assert exit_code(FenceResult("x", 0, "", "", usage=hit)) == LIMIT_EXIT
    assert exit_code(FenceResult("x", 2, "", "", usage=hit)) == 2
    assert exit_code(FenceResult("x", 0, "", "")) == 0
