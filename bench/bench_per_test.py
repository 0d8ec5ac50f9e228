"""What each further fence costs a test: open + run `true` + close, against a bare cgroup cycle.

The baseline, measured in the same process and run: what any cgroup-based
fence must do at the least — mkdir a cgroup (beside the fences' tree, so that it
has no programs but its own), attach the same already-loaded programs to it
(bpf_link each), spawn `true` in it (a shell step that moves into the cgroup: how
any tool can, and how a fenced command starts where depfence-enter cannot be built;
with it, the move and the cgroup namespace take one exec of a small static
program, confine.py), wait, close the links, rmdir. Where depfence-enter is built, a
second bare cycle spawns `true` through it instead (the stricter baseline: a bare
cycle as cheap to enter as a fence's), and the ratios against it are printed too. (A fence links
its programs once, to its session's directory, which each run's cgroup inherits.)
The figure: `Fence(...)` opened, `run(["true"])`, closed (the programs already
loaded: it is not the process's first fence), plus, apart, `run(["true"])` on an
open fence (what a second run of a test costs). Both run in interleaved rounds,
the order alternating; each round times a batch; the figures are medians per
cycle over the rounds, with min-max. Everything runs inside the lab's network
namespace.

Spaced like tests: the same cycles, each after an untimed pause (`--pause-ms`, a
test's own work), timed one by one, the variants taking turns cycle by cycle (a
round of each variant in turn swung with the machine: 1.44-1.74x between runs of
one build here, against 1.49-1.53x taking turns). A run's first step moves it into its cgroup,
and from kernel 6.0 on such a migration waits for an RCU grace period when none
happened in the last few milliseconds, unless the cgroup2 mount has
`favordynmods`, which a fence turns on (confine.py): back-to-back cycles never
wait, spaced ones would (16-17 ms a run here before the fence turned it on; from
6.18 the kernel cannot turn it off again, so a machine measures the "before" once).

Run as root:  .venv/bin/python bench/bench_per_test.py [--rounds N] [--batch N] [--pause-ms N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

from pytest_depfence import Fence, Policy, confine, enter, kernel
from pytest_depfence.cgroup import cgroup2_mount

POLICY = Policy.no_egress("github.com")


def bare_cycle(programs: kernel.Programs, helper: str | None = None) -> Callable[[], None]:
    """The bare cycle; with `helper` (depfence-enter), `true` enters through it instead
    of the shell step."""
    path = cgroup2_mount() / f"depfence-bench-bare-{os.getpid()}"
    procs = str(path / "cgroup.procs")
    argv = ["/bin/sh", "-c", 'echo 0 > "$0" && exec true', procs]
    if helper is not None:
        argv = [helper, procs, "--", "true"]

    def cycle() -> None:
        path.mkdir()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        links = programs.attach(fd)
        subprocess.run(argv, check=True)
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


def spaced_rounds(
    variants: dict[str, Callable[[], None]], rounds: int, batch: int, pause: float
) -> dict[str, list[float]]:
    """Like rounds_of, each cycle after an untimed `pause` and timed alone, the variants
    taking turns cycle by cycle (the order alternating), so that each sees the machine as
    the others do a moment apart; a round's figure is the median of its `batch` cycles."""
    per_cycle: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(rounds + 1):  # round 0 warms up
        times: dict[str, list[float]] = {name: [] for name in names}
        for turn in range(batch):
            for name in names if (round_no + turn) % 2 else names[::-1]:
                time.sleep(pause)
                start = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - start) * 1000)
        if round_no:
            for name in names:
                per_cycle[name].append(statistics.median(times[name]))
    return per_cycle


def show(title: str, per_cycle: dict[str, list[float]]) -> None:
    print(title)
    for name, values in per_cycle.items():
        print(
            f"  {name:45} {statistics.median(values):6.2f} ms"
            f"  (min {min(values):.2f}, max {max(values):.2f})"
        )
    base, whole, run, *entered = (statistics.median(v) for v in per_cycle.values())
    print(f"  ratio: fence cycle {whole / base:.2f}x bare, a run alone {run / base:.2f}x bare")
    if entered:
        print(
            f"  against the bare cycle entering through depfence-enter: fence cycle "
            f"{whole / entered[0]:.2f}x, a run alone {run / entered[0]:.2f}x"
        )


def main() -> None:
    from pytest_depfence.lab import Lab

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--pause-ms", type=float, default=30.0)
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
            helper = enter.helper()
            if helper is not None:
                variants["bare, entering through depfence-enter"] = bare_cycle(programs, helper)
            per_cycle = rounds_of(variants, args.rounds, args.batch)
            spaced = spaced_rounds(
                variants, args.rounds, max(1, args.batch // 2), args.pause_ms / 1000
            )
            mount = confine.read_cgroup2_mount()
    load = f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs"
    show(f"per-test cost, back to back: medians of {args.rounds} interleaved rounds of "
         f"{args.batch} cycles ({load})", per_cycle)  # fmt: skip
    show(f"spaced like tests, {args.pause_ms:.0f} ms apart: medians of {args.rounds} rounds of "
         f"{max(1, args.batch // 2)} cycles each timed alone", spaced)  # fmt: skip
    if mount is not None and mount.favordynmods:
        print("  cgroup2 mount: favordynmods on (a spaced migration waits for no grace period)")
    else:
        print("  cgroup2 mount: no favordynmods (a kernel before 6.0 has none, and needs none)")


if __name__ == "__main__":
    main()
