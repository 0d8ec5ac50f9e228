"""What a fence costs a process at exit: the time from its last line to its reaping.

Each variant is a child Python process that does its work, prints
CLOCK_MONOTONIC and returns normally (atexit handlers run: bcc's cleanup
detaches what it attached); the parent takes the time at waitpid(). Variants,
interleaved round by round (the order alternating; a warm-up round dropped):

- python, imports nothing: the floor of any process exit;
- bcc, 1 raw tracepoint: a bare bcc program attached to sched_process_exit
  (the baseline of the target: what a raw tracepoint's detach costs);
- bcc, 15 classic tracepoints: the same empty program on the 15 classic
  tracepoints the fence's programs used before issue 11 (each detach waits
  for an RCU grace period pair);
- after a fence: pytest_depfence opens a Fence in the lab, runs `true`,
  closes it (the programs stay loaded, as in a pytest session) and ends.

Printed: median and min-max of each, and the fence's ratio to the raw
tracepoint baseline and to the classic one.

What the raw tracepoints cost instead: raw_syscalls:sys_enter/sys_exit run a
program for every syscall on the machine while the programs are loaded.
Timed while another process holds nothing, the fence's programs, or the 15
classic tracepoints (empty programs), interleaved the same way: `dd bs=1`
from /dev/zero to /dev/null, a read() and a write() per byte, best of 3, in
ns per syscall.

Timings only; exits 0. Nothing leaves the machine: the fence's child runs in
the lab's namespace.

Run as root:  .venv/bin/python bench/bench_exit.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from pytest_depfence.lab import Lab

_BCC = "from pytest_depfence.kernel import machine; bcc = machine.import_bcc()\n"
_END = "import time; print(time.monotonic(), flush=True)\n"

CLASSIC = [
    "syscalls:sys_enter_execve",
    "syscalls:sys_enter_execveat",
    "syscalls:sys_exit_execve",
    "syscalls:sys_exit_execveat",
    "sched:sched_process_fork",
    "sched:sched_process_exit",
    "syscalls:sys_exit_mount",
    "syscalls:sys_exit_move_mount",
    "syscalls:sys_exit_chroot",
    "syscalls:sys_exit_pivot_root",
    "syscalls:sys_exit_setns",
    "cgroup:cgroup_attach_task",
    "syscalls:sys_exit_clone3",
    "syscalls:sys_enter_connect",
    "syscalls:sys_exit_connect",
]
_CLASSIC_TEXT = "".join(
    f"TRACEPOINT_PROBE({tp.split(':')[0]}, {tp.split(':')[1]}) {{ return 0; }}\n" for tp in CLASSIC
)

VARIANTS = {
    "python, imports nothing": _END,
    "bcc, 1 raw tracepoint": _BCC
    + 'b = bcc.BPF(text=b"RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }")\n'
    + "assert len(b.raw_tracepoint_fds) == 1\n"
    + _END,
    f"bcc, {len(CLASSIC)} classic tracepoints": _BCC
    + f"b = bcc.BPF(text={_CLASSIC_TEXT.encode()!r})\n"
    + f"assert b.num_open_tracepoints() == {len(CLASSIC)}\n"
    + _END,
    "after a fence": "import sys\n"
    + "from pytest_depfence import Fence, Policy\n"
    + 'with Fence(Policy.no_egress("github.com"), upstream=sys.argv[1]) as fence:\n'
    + '    fence.run(["true"])\n'
    + _END,
}
FENCE, RAW, CLASSIC_NAME = "after a fence", "bcc, 1 raw tracepoint", list(VARIANTS)[2]

_HOLD = "print('ready', flush=True)\nimport sys\nsys.stdin.read()\n"
HOLDERS = {
    "nothing loaded": None,
    "the fence's programs": "from pytest_depfence.kernel import programs\nprograms.load()\n"
    + _HOLD,
    f"{len(CLASSIC)} classic tracepoints": _BCC
    + f"b = bcc.BPF(text={_CLASSIC_TEXT.encode()!r})\n"
    + _HOLD,
}
#: dd copying one byte at a time: a read() and a write() per byte, a C loop of cheap
#: syscalls (coreutils is everywhere, no compiler needed).
DD_BYTES = 500_000
DD = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={DD_BYTES}", "status=none"]


def syscall_ns(holder: str | None) -> float:
    """ns per syscall of `dd` (best of 3) while `holder` runs in another process."""
    held = None
    if holder is not None:
        held = subprocess.Popen(
            [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert held.stdout is not None and held.stdin is not None
        if held.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the holder failed: {holder[:60]}...")
    try:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(DD, check=True)
            best = min(best, time.perf_counter() - start)
    finally:
        if held is not None:
            held.communicate(b"")
    return best / (2 * DD_BYTES) * 1e9


def syscall_cost(rounds: int) -> None:
    samples: dict[str, list[float]] = {name: [] for name in HOLDERS}
    names = list(HOLDERS)
    for round_no in range(rounds):
        for name in names if round_no % 2 else names[::-1]:
            samples[name].append(syscall_ns(HOLDERS[name]))
    base = statistics.median(samples[names[0]])
    print(f"a syscall elsewhere on the machine (dd bs=1: read + write per byte), {rounds} rounds:")
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"  {name:32} {median:8.0f} ns  (min {min(values):.0f}, max {max(values):.0f})"
            f"  +{median - base:.0f} ns"
        )


def exit_ms(code: str, upstream: str) -> float:
    """Milliseconds from the child's last line to its reaping."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, upstream], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    said = proc.stdout.readline()
    proc.wait()
    reaped = time.monotonic()
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0 or not said.strip():
        raise SystemExit(f"a child failed ({proc.returncode}):\n{err}")
    return (reaped - float(said)) * 1000


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ms  (min {min(values):.1f}, max {max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    with Lab() as lab:
        for round_no in range(args.rounds + 1):
            for name in names if round_no % 2 else names[::-1]:
                ms = exit_ms(VARIANTS[name], lab.upstream)
                if round_no:  # round 0 warms the caches up
                    samples[name].append(ms)
    print(
        f"process exit, from its last line to its reaping: median of {args.rounds} "
        f"interleaved rounds (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)"
    )
    for name, values in samples.items():
        print(f"  {name:32} {spread(values)}")
    fence = statistics.median(samples[FENCE])
    raw = statistics.median(samples[RAW])
    classic = statistics.median(samples[CLASSIC_NAME])
    print(
        f"after a fence: {fence:.1f} ms, ratio {fence / raw:.2f}x the raw-tracepoint baseline "
        f"(+{fence - raw:.1f} ms), {fence / classic:.3f}x the {len(CLASSIC)} classic tracepoints"
    )
    syscall_cost(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
