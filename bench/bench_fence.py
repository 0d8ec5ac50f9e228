"""How much a fence costs: first fence in a process, then each further run.

First fence: a child process that imports pytest_depfence, opens a Fence
(compile, load, attach) and prints how long that took from its first line;
once with the programs bcc compiled in an earlier process cached
(kernel/progcache.py: every process after the machine's first; the dropped
warm-up round fills the cache), once with the cache off (DEPFENCE_PROGRAM_CACHE=off:
bcc compiles them all). The baseline, in the same shape and interleaved with them
(order alternating, a warm-up round dropped), is a child that imports bcc and loads a
trivial bcc program attached to one raw tracepoint. Median and min-max of each.

Each further run: the same commands run fenced and unfenced (plain
subprocess) in the same lab, so the ratios are like for like.
Run as root:  .venv/bin/python bench/bench_fence.py [--runs N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from pytest_depfence import Fence, Policy
from pytest_depfence.kernel import progcache
from pytest_depfence.lab import Lab

COMMANDS = {
    "true": ["true"],
    "dig (1 allowed name)": ["dig", "+short", "mirror.internal"],
    "dig (1 blocked name)": ["dig", "+short", "github.com"],
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_START = "import time; t0 = time.monotonic()\n"
_DONE = "print(time.monotonic() - t0, flush=True)\n"
FIRST_FENCE = {
    "bcc trivial program (import, compile, load, attach)": _START
    + "from pytest_depfence.kernel import machine\n"
    + "bcc = machine.import_bcc()\n"
    + 'b = bcc.BPF(text=b"RAW_TRACEPOINT_PROBE(sched_process_exit) { return 0; }")\n'
    + _DONE,
}
_FENCE = (
    "import sys\n"
    + "from pytest_depfence import Fence, Policy\n"
    + 'fence = Fence(Policy.no_egress("github.com"), upstream=sys.argv[1])\n'
    + "fence.open()\n"
    + _DONE
    + "fence.close()\n"
)
FIRST_FENCE["first fence, programs cached (import, maps, load, attach)"] = _START + _FENCE
FIRST_FENCE["first fence, nothing cached (import, compile, load, attach)"] = (
    _START + f"import os; os.environ[{progcache.CACHE_ENV!r}] = 'off'\n" + _FENCE
)


def first_fence(upstream: str, rounds: int) -> None:
    """The first fence of a process against a trivial bcc program, in fresh processes.

    Both import their modules from byte code, as an installed package does (pip and the
    distro compile it at install): the children may write it to a cache of their own,
    which the dropped warm-up round fills, whatever PYTHONDONTWRITEBYTECODE says here.
    """
    samples: dict[str, list[float]] = {name: [] for name in FIRST_FENCE}
    names = list(FIRST_FENCE)
    with tempfile.TemporaryDirectory(prefix="depfence-bench-pyc-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        for round_no in range(rounds + 1):
            for name in names if round_no % 2 else names[::-1]:
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_FENCE[name], upstream],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr}")
                if round_no:
                    samples[name].append(float(out.stdout.split()[0]) * 1000)
    print(
        f"first fence in a process: median of {rounds} interleaved rounds, fresh processes "
        f"importing from byte code (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)"
    )
    width = max(map(len, samples))
    for name, values in samples.items():
        print(
            f"  {name:{width}} {statistics.median(values):7.0f} ms"
            f"  (min {min(values):.0f}, max {max(values):.0f})"
        )
    base, *fences = (statistics.median(samples[name]) for name in names)
    for name, fence in zip(names[1:], fences):
        print(f"  {name.split(' (')[0]}: {fence / base:.2f}x the trivial bcc program "
              f"(+{fence - base:.0f} ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="first-fence rounds (default 5)")
    args = parser.parse_args()
    with Lab() as lab:
        first_fence(lab.upstream, args.rounds)
        fence = Fence(Policy.no_egress("github.com"), upstream=lab.upstream)
        first_open = timed(fence.open)
        with fence:
            first_run = timed(lambda: fence.run(["true"]))
            print(
                f"first fence in a process: open (compile + load) {first_open * 1000:.0f} ms, "
                f"first run {first_run * 1000:.1f} ms"
            )
            for name, cmd in COMMANDS.items():
                # Unfenced, dig asks the lab resolver directly (fenced, the proxy is in between).
                plain_cmd = [*cmd[:2], f"@{lab.RESOLVER4}", *cmd[2:]] if cmd[0] == "dig" else cmd
                plain = [
                    timed(lambda: subprocess.run(plain_cmd, capture_output=True))
                    for _ in range(args.runs)
                ]
                fenced = [timed(lambda: fence.run(cmd, check=False)) for _ in range(args.runs)]
                p, f = statistics.median(plain), statistics.median(fenced)
                print(
                    f"{name:26} unfenced {p * 1000:7.2f} ms   fenced {f * 1000:7.2f} ms   "
                    f"ratio {f / p:5.2f}x   (+{(f - p) * 1000:.2f} ms per run, "
                    f"median of {args.runs})"
                )


if __name__ == "__main__":
    main()
