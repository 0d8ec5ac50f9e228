"""What a fence costs a script's own traffic, and whether many runs leak.

Each figure against its baseline measured in the same run (the same command
unfenced, in the same lab namespace), in interleaved rounds whose order
alternates; medians with min-max:

- short connections: a Python client connects to and closes a listener on a
  lab address (the listener is a process of its own); the client times its own
  loop, so process start and the fence's per-run cost are not in it. Three
  variants take turns in short rounds (thirty times `--rounds`, 500 connections each:
  this machine's speed swings by more than the fence costs from one tenth of a
  second to the next): unfenced; in a cgroup of its own, as deep as a fence's, that
  holds the hooks a fence attaches, each a program that returns at once (what any
  cgroup-eBPF fence pays before its programs do anything: the floor); fenced. The
  ratios are medians of each round's own ratios. Then, apart, the same loops with the
  kernel's BPF statistics on (which slows every program a little): what each
  program run, fence's and floor's, cost per connection, a figure the machine's
  swings do not move;
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
import ctypes
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pytest_depfence import Fence, Policy
from pytest_depfence.cgroup import cgroup2_mount
from pytest_depfence.kernel import machine, toolkit
from pytest_depfence.kernel.progload import bpf

POLICY = Policy.no_egress("github.com")
PORT = 9100
#: Short connections: connections per round, rounds per `--rounds`, and per run with the
#: kernel's BPF statistics on (enough that the client's start is a small part of it).
CONNECTIONS, ROUNDS_PER, KERNEL_CONNECTIONS = 500, 30, 20000
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
# Closed with a reset (SO_LINGER 0): no TIME_WAIT, so round after round does not run the
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


#: Every hook a fence attaches (kernel/toolkit.py ATTACH_TYPES), each letting all through.
EMPTY_HOOKS = "\n".join(
    f"int {name}({context} *ctx) {{ return 1; }}"
    for name, context in (
        ("egress", "struct __sk_buff"),
        ("sock_create", "struct bpf_sock"),
        *((hook, "struct bpf_sock_addr") for hook in toolkit.ATTACH_TYPES if hook[-1] in "46"),
    )
)


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
    """Each variant's median with min-max, and each against every earlier one (the first
    is the baseline) as the median of the rounds' own ratios (a round's variants run
    moments apart), min-max."""
    print(title)
    for name, values in samples.items():
        print(
            f"  {name:12} {statistics.median(values):10.3f} {unit}"
            f"  (min {min(values):.3f}, max {max(values):.3f})"
        )
    for (base_name, base), (name, values) in itertools.combinations(samples.items(), 2):
        ratios = [v / b if higher_is_better else b / v for b, v in zip(base, values, strict=True)]
        print(
            f"  {name}/{base_name} throughput: {statistics.median(ratios):.3f}x"
            f"  (rounds {min(ratios):.3f}-{max(ratios):.3f})"
        )


def stdout_of(fence: Fence | None, argv: list[str]) -> str:
    if fence is None:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return fence.run(argv).stdout


def empty_hooks() -> tuple[Path, list[int]]:
    """A cgroup beside the fences' tree, as deep as a fence's, with EMPTY_HOOKS attached:
    its path and its links (close them to detach)."""
    compiled = machine.import_bcc().BPF(text=EMPTY_HOOKS.encode())
    path = cgroup2_mount() / f"depfence-bench-hooks-{os.getpid()}" / "run"
    path.mkdir(parents=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    links: list[int] = []
    try:
        for name in toolkit.ATTACH_TYPES:
            prog_type, attach_type = toolkit.cgroup_program_kind(name)
            fn = toolkit.load_program(compiled, name, prog_type, attach_type)
            links.append(toolkit.bpf_link_create(fn.fd, fd, attach_type))
    except BaseException:
        for link in links:
            os.close(link)
        path.rmdir()
        path.parent.rmdir()
        raise
    finally:
        os.close(fd)
    return path, links


#: bpf(2) commands and struct bpf_prog_info's run_time_ns and run_cnt (uapi/linux/bpf.h).
PROG_GET_NEXT_ID, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, ENABLE_STATS = 11, 13, 15, 32
RUN_TIME_NS, RUN_CNT, PROG_INFO_SIZE = 192 // 8, 200 // 8, 256


def program_runs() -> dict[tuple[int, str], tuple[int, int]]:
    """Every loaded program's (id, name) -> (ns run, runs), as `bpftool prog show` says."""
    runs = {}
    attr = (ctypes.c_uint32 * 4)()
    while bpf(PROG_GET_NEXT_ID, attr)[0] == 0:
        attr[0] = attr[1]  # start_id <- next_id
        fd, _ = bpf(PROG_GET_FD_BY_ID, (ctypes.c_uint32 * 4)(attr[1]))
        if fd < 0:
            continue  # gone meanwhile
        info = (ctypes.c_uint64 * (PROG_INFO_SIZE // 8))()
        get = (ctypes.c_uint64 * 2)(fd | (PROG_INFO_SIZE << 32), ctypes.addressof(info))
        if bpf(OBJ_GET_INFO_BY_FD, get)[0] == 0:
            name = bytes(info)[64:80].split(b"\0")[0].decode()
            runs[attr[1], name] = (info[RUN_TIME_NS], info[RUN_CNT])
        os.close(fd)
    return runs


def kernel_cost(variants: dict[str, Callable[[], float]], connections: int) -> None:
    """Each variant run once with the kernel's BPF statistics on: ns per connection in
    each program that ran, and the sum."""
    stats, err = bpf(ENABLE_STATS, (ctypes.c_uint32 * 1)(0))  # BPF_STATS_RUN_TIME
    if stats < 0:
        print(f"  (no BPF statistics on this kernel: {os.strerror(err)})")
        return
    try:
        print(f"in the kernel, with BPF statistics on, ns per connection ({connections}):")
        for name, run in variants.items():
            before = program_runs()
            run()
            parts: dict[str, float] = {}  # by name: the fence's and the floor's egress add up
            for key, (ns, count) in program_runs().items():
                ns_before, count_before = before.get(key, (0, 0))
                if count > count_before:
                    parts[key[1]] = parts.get(key[1], 0) + (ns - ns_before) / connections
            detail = ", ".join(f"{p} {ns:.0f}" for p, ns in sorted(parts.items()) if ns >= 1)
            print(f"  {name:12} {sum(parts.values()):6.0f}  ({detail})")
    finally:
        os.close(stats)


def short_connections(fence: Fence, address: str, rounds: int) -> None:
    hooks, links = empty_hooks()
    listener = None
    try:
        listener = subprocess.Popen(
            [sys.executable, "-c", LISTENER, address, str(PORT)], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        in_hooks = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(hooks / "cgroup.procs")]

        def variants(connections: int) -> dict[str, Callable[[], float]]:
            argv = [sys.executable, "-c", CLIENT, address, str(PORT), str(connections)]
            return {
                "unfenced": lambda: float(stdout_of(None, argv)),
                "empty hooks": lambda: float(stdout_of(None, in_hooks + argv)),
                "fenced": lambda: float(stdout_of(fence, argv)),
            }

        samples = interleaved(variants(CONNECTIONS), rounds * ROUNDS_PER)
        title = f"short connections: {CONNECTIONS} connect+close a round, the client's own loop"
        show(title, samples, "s", False)
        kernel_cost(variants(KERNEL_CONNECTIONS), KERNEL_CONNECTIONS)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        for link in links:
            os.close(link)
        hooks.rmdir()
        hooks.parent.rmdir()


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
