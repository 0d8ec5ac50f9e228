"""What naming a local listener costs, against one plain loopback connection.

`LocalPeers.listener("tcp", 127.0.0.1, port)` for a socket listening in this
process, warm (the holder cached: a sock_diag dump, one readlink, the
holder's cmdline and cgroup) and cold (a fresh LocalPeers: /proc/PID/fd
searched in pid order up to this process; the header says how many come first).
The baseline, measured in the same run: one connect() + close() to that same
listener, whose queue is drained between batches, untimed. The variants run
in interleaved rounds, the order alternating each round; each round times a
batch of operations, and the figure is the median per operation over the
rounds, with the min-max of the rounds.

Run:  .venv/bin/python bench/bench_local_lookup.py [--rounds N] [--ops N]
(as root, every process's fds are searched; as another user, only one's own).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import statistics
import sys
import time
from typing import Callable

from pytest_depfence.local import LocalPeers

LOOPBACK = ipaddress.ip_address("127.0.0.1")
#: A cold lookup costs milliseconds; its batches are this much smaller.
COLD_DIVISOR = 10


def drain(listener: socket.socket) -> None:
    """Accept and close what the baseline's connections left in the queue."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.close()


def variants(listener: socket.socket) -> dict[str, tuple[Callable[[], object], int]]:
    """Name -> (one operation, batch divisor)."""
    port = listener.getsockname()[1]
    warm = LocalPeers()

    def connect_close() -> None:
        with socket.create_connection(("127.0.0.1", port)):
            pass

    def lookup(peers: LocalPeers) -> None:
        found = peers.listener("tcp", LOOPBACK, port)
        if found is None or found.pid != os.getpid():
            raise SystemExit(f"the lookup found {found}, not this process ({os.getpid()})")

    return {
        "connect()+close() (baseline)": (connect_close, 1),
        "listener() warm": (lambda: lookup(warm), 1),
        "listener() cold": (lambda: lookup(LocalPeers()), COLD_DIVISOR),
    }


def measure(listener: socket.socket, rounds: int, ops: int) -> dict[str, list[float]]:
    """Seconds per operation, one value per round; the first round is a warm-up."""
    table = variants(listener)
    samples: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    for round_no in range(rounds + 1):
        for name in names if round_no % 2 else names[::-1]:
            operation, divisor = table[name]
            count = max(1, ops // divisor)
            start = time.perf_counter()
            for _ in range(count):
                operation()
            elapsed = (time.perf_counter() - start) / count
            drain(listener)
            if round_no:
                samples[name].append(elapsed)
    return samples


def census() -> tuple[int, int]:
    """Processes a cold lookup looks through before this one, and their fds."""
    processes = fds = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) < os.getpid():
            processes += 1
            try:
                fds += len(os.listdir(f"/proc/{name}/fd"))
            except OSError:
                pass
    return processes, fds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--ops", type=int, default=200, help="operations per batch (default 200)")
    args = parser.parse_args()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listener.setblocking(False)
        samples = measure(listener, args.rounds, args.ops)
    processes, fds = census()
    print(
        f"median of {args.rounds} interleaved rounds of {args.ops} operations "
        f"({args.ops // COLD_DIVISOR} cold); a cold lookup searches {processes} processes "
        f"({fds} fds) before this one; uid {os.geteuid()}, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    base_name = next(iter(samples))
    base = statistics.median(samples[base_name])
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"  {name:30} {median * 1e6:9.1f} us/op   ratio {median / base:7.2f}x   "
            f"(min {min(values) * 1e6:.1f} / max {max(values) * 1e6:.1f} us)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
