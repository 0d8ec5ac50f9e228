"""How much a fence costs: first fence in a process, then each further run.

Baselines are measured in the same run: the same commands run unfenced
(plain subprocess) in the same lab, so the ratios are like for like.
Run as root:  .venv/bin/python bench/bench_fence.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from pytest_depfence import Fence, Policy
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with Lab() as lab:
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
