"""What a fence costs a script's own traffic, and whether many runs leak.

Each figure against its baseline measured in the same run (the same command
unfenced, in the same lab namespace), in interleaved rounds whose order
alternates; medians with min-max:

- short connections: a Python client connects to and closes a listener on a
  lab address 5,000 times (the listener is a process of its own); the client
  times its own loop, so process start and the fence's per-run cost are not in it;
- a deploy loop: 100 `curl` fetches from the lab's mirror (by address), timed as a
  whole run; twice: from the lab's own server, whose threads share this process (and
  its GIL) with the fence's event thread, and from a mirror process of its own, as a
  deploy script's mirror is;
- bulk TCP: `iperf3` for 3 s to a server on a lab address (when iperf3 is
  installed: `scripts/bootstrap.sh --bench`);
- 500 fenced runs of `true` in one process: its memory, descriptors and threads
  after the first 100 and after all 500 (flat: nothing kept per run).

Run as root:  .venv/bin/python bench/bench_traffic.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from pytest_depfence import Fence, Policy

POLICY = Policy.no_egress("github.com")
PORT = 9100
LISTENER = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1024)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.close()
"""
#: A mirror in a process of its own (a TCP server: HTTPServer's bind looks its name up).
MIRROR_PORT = 9101
MIRROR = """\
import http.server, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"x" * 1024
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
server = socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler)
print("ready", flush=True)
server.serve_forever()
"""
# Closed with a reset (SO_LINGER 0): no TIME_WAIT, so rounds of 5,000 do not run the
# namespace out of ephemeral ports (then connect() itself slows down, fenced or not).
CLIENT = """\
import socket, struct, sys, time
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)
start = time.perf_counter()
for _ in range(count):
    s = socket.create_connection((address, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
print(time.perf_counter() - start)
"""


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(rounds + 1):  # round 0 warms up
        for name in names if round_no % 2 else names[::-1]:
            value = variants[name]()
            if round_no:
                samples[name].append(value)
    return samples


def show(title: str, samples: dict[str, list[float]], unit: str, higher_is_better: bool) -> None:
    print(title)
    for name, values in samples.items():
        print(
            f"  {name:10} {statistics.median(values):10.3f} {unit}"
            f"  (min {min(values):.3f}, max {max(values):.3f})"
        )
    plain, fenced = (statistics.median(v) for v in samples.values())
    ratio = fenced / plain if higher_is_better else plain / fenced
    print(f"  fenced/unfenced throughput: {ratio:.2f}x")


def stdout_of(fence: Fence | None, argv: list[str]) -> str:
    if fence is None:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return fence.run(argv).stdout


def short_connections(fence: Fence, address: str, rounds: int) -> None:
    listener = subprocess.Popen(
        [sys.executable, "-c", LISTENER, address, str(PORT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        argv = [sys.executable, "-c", CLIENT, address, str(PORT), "5000"]
        samples = interleaved(
            {
                "unfenced": lambda: float(stdout_of(None, argv)),
                "fenced": lambda: float(stdout_of(fence, argv)),
            },
            rounds,
        )
    finally:
        listener.kill()
        listener.wait()
    show("short connections: 5,000 connect+close, the client's own loop", samples, "s", False)


def curl_loop(fence: Fence, address: str, rounds: int) -> None:
    # By address: unfenced, curl would ask the machine's resolver, which the lab cannot
    # reach (what DNS through the fence costs: bench_dns.py).
    mirror = subprocess.Popen(
        [sys.executable, "-c", MIRROR, address, str(MIRROR_PORT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert mirror.stdout is not None and mirror.stdout.readline().strip() == "ready"
        for where, url in (
            ("the lab mirror (served by this process)", f"http://{address}/"),
            ("a mirror process of its own", f"http://{address}:{MIRROR_PORT}/"),
        ):
            script = f"for i in $(seq 100); do curl -fsS -o /dev/null {url}; done"

            def plain(script: str = script) -> float:
                started = time.perf_counter()
                subprocess.run(["/bin/sh", "-c", script], check=True)
                return time.perf_counter() - started

            def fenced(script: str = script) -> float:
                started = time.perf_counter()
                fence.run(["/bin/sh", "-c", script])
                return time.perf_counter() - started

            samples = interleaved({"unfenced": plain, "fenced": fenced}, rounds)
            show(f"deploy loop: 100 curl fetches from {where}, whole run", samples, "s", False)
    finally:
        mirror.kill()
        mirror.wait()


def bulk_tcp(fence: Fence, address: str, rounds: int) -> None:
    if shutil.which("iperf3") is None:
        print("bulk TCP: iperf3 not installed (scripts/bootstrap.sh --bench): skipped")
        return
    server = subprocess.Popen(
        ["iperf3", "-s", "-B", address, "-p", str(PORT + 1)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    argv = ["iperf3", "-c", address, "-p", str(PORT + 1), "-t", "3", "-J"]

    def gbits(fenced: bool) -> float:
        # The server may not listen yet at the first round, and it takes one test at a
        # time: a client can come while it still ends the last one (then iperf3 has
        # exited 0 with a report of no transfer, no "sum_received", here once).
        for _ in range(50):
            out = (
                fence.run(argv, check=False)
                if fenced
                else subprocess.run(argv, capture_output=True, text=True)
            )
            if out.returncode == 0:
                received = json.loads(out.stdout).get("end", {}).get("sum_received")
                if received is not None:
                    return received["bits_per_second"] / 1e9
            time.sleep(0.1)
        raise SystemExit(f"iperf3 failed: {out.stdout}{out.stderr}")

    try:
        samples = interleaved(
            {"unfenced": lambda: gbits(False), "fenced": lambda: gbits(True)}, rounds
        )
    finally:
        server.kill()
        server.wait()
    show("bulk TCP: iperf3, 3 s", samples, "Gbit/s", True)


def footprint() -> tuple[float, int, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return (
        int(fields["VmRSS"].split()[0]) / 1024,
        len(os.listdir("/proc/self/fd")),
        int(fields["Threads"]),
    )


def many_runs(fence: Fence) -> None:
    for _ in range(100):
        fence.run(["true"])
    rss, fds, threads = footprint()
    for _ in range(400):
        fence.run(["true"])
    rss2, fds2, threads2 = footprint()
    print("500 fenced runs in one process: after 100 -> after 500")
    print(f"  memory {rss:.1f} -> {rss2:.1f} MiB ({rss2 - rss:+.1f}), descriptors {fds} -> {fds2}, "
          f"threads {threads} -> {threads2}")  # fmt: skip


def main() -> None:
    from pytest_depfence.lab import Lab

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with Lab() as lab, Fence(POLICY, upstream=lab.upstream, label="bench") as fence:
        address = lab.address("mirror.internal")
        print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
        short_connections(fence, address, args.rounds)
        curl_loop(fence, address, args.rounds)
        bulk_tcp(fence, address, max(1, args.rounds // 2))
        many_runs(fence)


if __name__ == "__main__":
    main()
