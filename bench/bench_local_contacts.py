"""What putting local contacts on record costs a fenced process, per connection.

A listener outside the fence (a subprocess in the lab: a TCP server on
127.0.0.1 and a unix stream server, both accepting and closing) and a client
that opens N connections to one of them, one after another (connect + close),
run fenced (`Fence.run`) and, as the baseline measured in the same run,
unfenced (`subprocess.run` in the same lab). Fenced, a process's first TCP
message to an endpoint is reported by the kernel and the rest are counted in
a map (bpf/sockaddr.c `contacts`), while each unix connect is reported; the
fence's event thread keeps one contact per process and endpoint and names its
listener once (`Run.on_connection`/`Run.on_unix` -> `LocalPeers.listener`),
so a client that reconnects is one contact: N TCP connections cost one kernel
event (N unix connects, N) and one lookup.

Three figures per kind, each the median over interleaved rounds (the order
alternates each round; a warm-up round is dropped) with the min-max:
- the client's own loop, per connection (timed inside the client);
- the whole run's wall time, `Fence.run` returning after its teardown, which
  drains the kernel's events: every listener lookup is in it;
- all-in per connection: (whole run of N - whole run of 0 connections) / N,
  paired within a round, so the fixed cost of a run (Python's start, the
  fence's cgroup) drops out and the events' processing stays in.
The local contact events of each fenced run are counted and printed, not checked.

Run as root:  .venv/bin/python bench/bench_local_contacts.py [--rounds N] [--connections N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pytest_depfence import Fence, Policy
from pytest_depfence.lab import Lab

LISTENER = r"""
import socket, sys, threading
def serve(sock):
    while True:
        conn, _ = sock.accept()
        conn.close()
tcp = socket.socket()
tcp.bind(("127.0.0.1", 0))
tcp.listen(4096)
unix = socket.socket(socket.AF_UNIX)
unix.bind(sys.argv[1])
unix.listen(4096)
threading.Thread(target=serve, args=(unix,), daemon=True).start()
print(tcp.getsockname()[1], flush=True)
serve(tcp)
"""

CLIENT = r"""
import socket, sys, time
kind, where, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "tcp":
    family, address = socket.AF_INET, ("127.0.0.1", int(where))
else:
    family, address = socket.AF_UNIX, where
start = time.perf_counter()
for _ in range(n):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect(address)
    s.close()
print(time.perf_counter() - start)
"""


@dataclass
class Samples:
    """One kind's (tcp, unix) seconds per round: whole runs, client loops, event counts."""

    wall: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    loop: dict[bool, list[float]] = field(default_factory=dict)
    local_events: list[int] = field(default_factory=list)
    listener: str | None = None


def client(kind: str, where: str, n: int) -> list[str]:
    # -S: no site import; the client needs only the standard library.
    return [sys.executable, "-S", "-c", CLIENT, kind, where, str(n)]


def one_run(fence: Fence, cmd: list[str], fenced: bool, samples: Samples) -> tuple[float, str]:
    """Wall seconds of the whole run, and the client's output."""
    start = time.perf_counter()
    if fenced:
        result = fence.run(cmd)
        wall, out = time.perf_counter() - start, result.stdout
        local = [e for e in result.events if e.is_local]
        if int(cmd[-1]):
            samples.local_events.append(len(local))
            samples.listener = samples.listener or (local[0].listener if local else None)
    else:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall, out = time.perf_counter() - start, done.stdout
    return wall, out


def measure(fence: Fence, targets: dict[str, str], rounds: int, n: int) -> dict[str, Samples]:
    """Every kind, fenced and not, N and 0 connections, interleaved; round 0 is a warm-up."""
    samples = {kind: Samples() for kind in targets}
    plan = [
        (kind, fenced, count) for kind in targets for fenced in (False, True) for count in (n, 0)
    ]
    for round_no in range(rounds + 1):
        for kind, fenced, count in plan if round_no % 2 else plan[::-1]:
            s = samples[kind]
            wall, out = one_run(fence, client(kind, targets[kind], count), fenced, s)
            if not round_no:
                continue
            s.wall.setdefault((fenced, count), []).append(wall)
            if count:
                s.loop.setdefault(fenced, []).append(float(out) / count)
        if not round_no:
            for s in samples.values():
                s.local_events.clear()
    return samples


def spread(values: list[float], scale: float, unit: str) -> str:
    return (
        f"{statistics.median(values) * scale:8.1f} {unit} "
        f"({min(values) * scale:.1f}-{max(values) * scale:.1f})"
    )


def row(label: str, plain: list[float], fenced: list[float], scale: float, unit: str) -> str:
    ratio = statistics.median(fenced) / statistics.median(plain)
    ratios = [f / p for p, f in zip(plain, fenced)]
    return (
        f"    {label:30} unfenced {spread(plain, scale, unit)}   "
        f"fenced {spread(fenced, scale, unit)}   ratio {ratio:5.2f}x "
        f"(per round {min(ratios):.2f}-{max(ratios):.2f})"
    )


def report(kind: str, s: Samples, n: int) -> None:
    def all_in(fenced: bool) -> list[float]:
        return [(a - b) / n for a, b in zip(s.wall[fenced, n], s.wall[fenced, 0])]

    print(f"  {kind}:")
    print(row("client loop, per connection", s.loop[False], s.loop[True], 1e6, "us"))
    print(row(f"whole run, {n} connections", s.wall[False, n], s.wall[True, n], 1e3, "ms"))
    print(row("whole run, 0 connections", s.wall[False, 0], s.wall[True, 0], 1e3, "ms"))
    print(row("all-in, per connection", all_in(False), all_in(True), 1e6, "us"))
    print(
        f"    local contact events per fenced run of {n}: "
        f"{min(s.local_events)}-{max(s.local_events)}; listener: {s.listener}"
    )


def with_listener(body: Callable[[dict[str, str]], None]) -> None:
    """Start the listener in the lab (outside any fence) and call body with its addresses."""
    with tempfile.TemporaryDirectory() as tmp:
        path, script = os.path.join(tmp, "listener.sock"), os.path.join(tmp, "listener.py")
        with open(script, "w") as f:
            f.write(LISTENER)  # a file, so the listener's command line (printed) stays short
        proc = subprocess.Popen(
            [sys.executable, "-S", script, path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            port = proc.stdout.readline().strip()
            body({"tcp": port, "unix": path})
        finally:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--connections", type=int, default=2000, help="connections per run (default 2000)"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    with Lab() as lab, Fence(Policy.no_egress("github.com"), upstream=lab.upstream) as fence:

        def body(targets: dict[str, str]) -> None:
            samples = measure(fence, targets, args.rounds, args.connections)
            load_after = os.getloadavg()
            print(
                f"median of {args.rounds} interleaved rounds (min-max), {args.connections} "
                f"connect()+close() per run, one after another, to a listener outside the "
                f"fence; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average "
                f"{load_before[0]:.2f} before / {load_after[0]:.2f} after "
                f"(5 min {load_after[1]:.2f})"
            )
            for kind, s in samples.items():
                report(kind, s, args.connections)

        with_listener(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
