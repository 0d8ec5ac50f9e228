"""What each further fence costs a test: open + run `true` + close, against a bare cgroup cycle.

The baseline, measured in the same process and run: what any cgroup-based
fence must do at the least — mkdir a cgroup (beside the fences' tree, so that it
has no programs but its own), attach the same already-loaded programs to it
(bpf_link each), spawn `true` in it (the shell step that moves into the cgroup,
as every fenced command starts), wait, close the links, rmdir. (A fence links
its programs once, to its session's directory, which each run's cgroup inherits.)
The figure: `Fence(...)` opened, `run(["true"])`, closed (the programs already
loaded: it is not the process's first fence), plus, apart, `run(["true"])` on an
open fence (what a second run of a test costs). Both run in interleaved rounds,
the order alternating; each round times a batch; the figures are medians per
cycle over the rounds, with min-max. Everything runs inside the lab's network
namespace.

Run as root:  .venv/bin/python bench/bench_per_test.py [--rounds N] [--batch N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

from pytest_depfence import Fence, Policy, kernel
from pytest_depfence.cgroup import cgroup2_mount

POLICY = Policy.no_egress("github.com")


def bare_cycle(programs: kernel.Programs) -> Callable[[], None]:
    path = cgroup2_mount() / f"depfence-bench-bare-{os.getpid()}"

    def cycle() -> None:
        path.mkdir()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        links = programs.attach(fd)
        subprocess.run(
            ["/bin/sh", "-c", 'echo 0 > "$0" && exec true', str(path / "cgroup.procs")],
            check=True,
        )
        for link in links:
            os.close(link)
        os.close(fd)
        path.rmdir()

    return cycle


def fence_cycle(upstream: str) -> Callable[[], None]:
    def cycle() -> None:
        with Fence(POLICY, upstream=upstream, label="bench") as fence:
            fence.run(["true"])

    return cycle


def rounds_of(
    variants: dict[str, Callable[[], None]], rounds: int, batch: int
) -> dict[str, list[float]]:
    per_cycle: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(rounds + 1):  # round 0 warms up
        for name in names if round_no % 2 else names[::-1]:
            start = time.perf_counter()
            for _ in range(batch):
                variants[name]()
            if round_no:
                per_cycle[name].append((time.perf_counter() - start) / batch * 1000)
    return per_cycle


def main() -> None:
    from pytest_depfence.lab import Lab

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    with Lab() as lab:
        programs = kernel.load()
        with Fence(POLICY, upstream=lab.upstream, label="bench") as fence:
            fence.run(["true"])  # the process's first fence: compile, load, guardian
            variants = {
                "bare: mkdir + attach + spawn true + rmdir": bare_cycle(programs),
                "fence: open + run(true) + close": fence_cycle(lab.upstream),
                "run(true) on an open fence": lambda: fence.run(["true"]),
            }
            per_cycle = rounds_of(variants, args.rounds, args.batch)
    print(
        f"per-test cost: medians of {args.rounds} interleaved rounds of {args.batch} cycles "
        f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)"
    )
    for name, values in per_cycle.items():
        print(
            f"  {name:45} {statistics.median(values):6.2f} ms"
            f"  (min {min(values):.2f}, max {max(values):.2f})"
        )
    base, whole, run = (statistics.median(v) for v in per_cycle.values())
    print(f"  ratio: fence cycle {whole / base:.2f}x bare, a run alone {run / base:.2f}x bare")


if __name__ == "__main__":
    main()
