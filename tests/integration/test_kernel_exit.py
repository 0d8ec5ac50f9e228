"""The process-watching programs are raw tracepoints, and nothing of them outlives the process.

A child loads the program set (`programs.load()`, as the first fence of a process does)
and holds it until its stdin closes. While it lives, bpftool lists its raw tracepoints
(and, where this kernel has BTF, no classic one: a classic tracepoint costs an RCU grace
period pair at exit, bpf/syscalls.c); once it has exited, no link or perf entry of it is
left. Timings are bench/bench_exit.py's business, not this test's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from helpers_net import skip_or_fail

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import tracing

BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"
if not shutil.which(BPFTOOL):
    pytest.skip("these tests need bpftool (apt-get install bpftool)", allow_module_level=True)

HOLDER = """
import os, sys
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import programs
try:
    programs.load()
except FenceUnavailable as exc:
    print("unavailable", exc.reason.replace("\\n", " "), flush=True)
    raise SystemExit(0)
print("ready", os.getpid(), flush=True)
sys.stdin.read()
"""

#: Every kernel: the syscall dispatch and the exit; with BTF, the three that read structs.
ALWAYS_RAW = {"sys_enter", "sys_exit", "sched_process_exit"}
RAW_WITH_BTF = {"sched_process_fork", "cgroup_attach_task"}


def _bpftool(*args: str) -> Any:
    out = subprocess.run([BPFTOOL, "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def _perf_of(pid: int) -> list[dict[str, Any]]:
    return [entry for entry in _bpftool("perf") if entry.get("pid") == pid]


def test_the_tracepoints_are_raw_and_gone_when_the_process_is(pytestconfig: pytest.Config) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        said = holder.stdout.readline().split(maxsplit=1)
        if said and said[0] == "unavailable":
            skip_or_fail(pytestconfig, FenceUnavailable(said[1]))
        assert said and said[0] == "ready", said
        pid = int(said[1])
        alive = _perf_of(pid)
        kinds = {entry["fd_type"] for entry in alive}
        raw = {entry["tracepoint"] for entry in alive if entry["fd_type"] == "raw_tracepoint"}
        prog_ids = {entry["prog_id"] for entry in alive}
        assert ALWAYS_RAW <= raw, alive
        if tracing.btf_offsets() is not None:
            assert RAW_WITH_BTF <= raw, alive
            assert kinds == {"raw_tracepoint"}, alive
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert _perf_of(pid) == []
    # Detached: no link and no perf entry. (The program objects themselves may outlive the
    # process by an RCU grace period: the kernel frees them after it, attached to nothing.)
    assert [link for link in _bpftool("link") if link.get("prog_id") in prog_ids] == []
