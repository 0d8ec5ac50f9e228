"""What a ranges file of GitHub's size (5,000 ranges) costs: reading it, and a fence's open+close.

Baselines, measured in the same run: a fence opened and closed without ranges;
reading is shown alone (it happens once per file and session). The two fence
variants run in interleaved rounds, the order alternating; the figures are
medians with min-max. Everything runs inside the lab's network namespace.

Run as root:  .venv/bin/python bench/bench_ranges.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pytest_depfence import Fence, Policy
from pytest_depfence.ranges import load

POLICY = Policy.no_egress("github.com")


def meta_file(directory: str, copy: int) -> Path:
    path = Path(directory) / f"meta-{copy}.txt"
    path.write_text(
        "".join(f"20.{i // 256}.{i % 256}.0/24\n" for i in range(4800))
        + "".join(f"2a01:111:f{i:03x}::/48\n" for i in range(200))
    )
    return path


def main() -> None:
    from pytest_depfence.lab import Lab

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, Lab() as lab:
        reads = []
        for copy in range(args.rounds):  # a new file each time: a file is read once
            path = meta_file(directory, copy)
            started = time.perf_counter()
            read = load(str(path), "bench")
            reads.append((time.perf_counter() - started) * 1000)
        Fence(POLICY, upstream=lab.upstream).open().close()  # the first fence: compile, load
        variants = {"without ranges": (), "with 5,000 ranges": (read,)}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_no in range(args.rounds + 1):  # round 0 warms up
            for name in names if round_no % 2 else names[::-1]:
                started = time.perf_counter()
                Fence(POLICY, upstream=lab.upstream, ranges=variants[name]).open().close()
                if round_no:
                    samples[name].append((time.perf_counter() - started) * 1000)
    print(
        f"ranges: {args.rounds} interleaved rounds (load average {os.getloadavg()[0]:.1f}, "
        f"{os.cpu_count()} CPUs)"
    )
    print(f"  reading 5,000 ranges {statistics.median(reads):8.1f} ms  (min {min(reads):.1f})")
    for name, values in samples.items():
        print(
            f"  fence open+close {name:18} {statistics.median(values):7.1f} ms"
            f"  (min {min(values):.1f}, max {max(values):.1f})"
        )
    without, with_ranges = (statistics.median(samples[name]) for name in names)
    print(f"  ratio {with_ranges / without:.2f}x (+{with_ranges - without:.1f} ms per fence)")


if __name__ == "__main__":
    main()
