"""What depfence's DNS proxy costs a fenced process, against real DNS tools.

Everything runs inside the lab's network namespace (pytest_depfence.lab): no
packet leaves this machine, and the machine's resolver is never asked.

Three resolvers are measured, interleaved (each repetition runs every target
once, in a rotating order), for two figures each:
- qps with 20 queries outstanding (``dnsperf -q 20``), and the queries lost;
- latency with 1 outstanding: a closed loop (send, wait for the answer, send
  the next) of a small Python client (`CLOSED_LOOP`), median round trip; the
  figure is what each resolver adds over asking the upstream directly in the
  same repetition (the client's own cost is in both and cancels). Not
  ``dnsperf -q 1``: with one outstanding it paces itself to a few hundred
  queries per second or fewer, erratically, so its figure says more about
  dnsperf than about the resolver.

Targets:
- direct: the upstream itself. The lab's own DNS server is Python (dnslib) in
  this very process and would be the bottleneck of every row, so the upstream
  here is a dnsmasq answering the lab's names from its own records
  (``--address``), on 127.0.0.1 of the lab;
- dnsmasq: a dnsmasq forwarder with its cache off (``--cache-size=0``) in front
  of that upstream, the baseline;
- depfence: a real fence (``Fence(no_egress("github.com"))`` on the same
  upstream) running dnsperf as its fenced command. dnsperf asks the lab
  resolver's address on port 53; the kernel redirects every query to the
  fence's proxy, which judges it, attributes it to its sender (flow map -> pid
  -> command line), forwards it upstream, learns the answer's addresses and
  answers. Each query is an event of the run's result, so the row also says
  how many queries were attributed to dnsperf's pid.

dnsperf and dnsmasq come from the bootstrap's bench extra
(``bash scripts/bootstrap.sh --bench``). Run as root:
  .venv/bin/python bench/bench_dns.py [--reps N] [--seconds S]
Prints figures, baselines and ratios with min-max over the repetitions;
always exits 0 (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pytest_depfence import Fence, Policy
from pytest_depfence.lab import Lab

UPSTREAM_PORT = 5354
FORWARDER_PORT = 5355
LOOPBACK = "127.0.0.1"
NAMES = ("mirror.internal", "pypi.internal", "migrations.internal", "dns.google")


# One query at a time over a connected UDP socket (as glibc asks), for `count` queries;
# prints the median and mean round trip and the queries that got no answer within 1 s.
CLOSED_LOOP = r"""
import json, socket, statistics, struct, sys, time
server, port, count, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def query(name):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!5H", 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)
bodies = [query(n) for n in names]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((server, port))
sock.settimeout(1.0)
rtts, lost = [], 0
for i in range(count):
    packet = struct.pack("!H", i & 0xFFFF) + bodies[i % len(bodies)]
    start = time.perf_counter()
    sock.send(packet)
    try:
        while sock.recv(4096)[:2] != packet[:2]:
            pass
    except socket.timeout:
        lost += 1
        continue
    rtts.append(time.perf_counter() - start)
print(json.dumps({"median_ms": statistics.median(rtts) * 1000,
                  "mean_ms": statistics.mean(rtts) * 1000, "sent": count, "lost": lost}))
"""
LATENCY_QUERIES = 3000


@dataclass
class Sample:
    qps: float
    latency_ms: float
    sent: int
    completed: int
    lost: int
    attributed: int | None = None  # depfence only: events naming the client's process
    events: int | None = None
    cpu_us: float | None = None  # depfence only: the proxy threads' CPU per query


def parse(output: str) -> Sample:
    def number(label: str) -> float:
        match = re.search(rf"{label}:?\s+([0-9.]+)", output)
        if match is None:
            raise RuntimeError(f"dnsperf printed no {label!r}:\n{output}")
        return float(match.group(1))

    return Sample(
        qps=number("Queries per second"),
        latency_ms=number(r"Average Latency \(s\)") * 1000,
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
    )


def dnsperf_argv(
    server: str, port: int, datafile: str, outstanding: int, seconds: float
) -> list[str]:
    return [
        "dnsperf", "-s", server, "-p", str(port), "-d", datafile,
        "-q", str(outstanding), "-l", str(seconds), "-t", "2",
    ]  # fmt: skip


@contextlib.contextmanager
def dnsmasq(*args: str) -> Iterator[None]:
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={LOOPBACK}", "--user=root", "--pid-file=",
        *args,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_answers(port: int, name: str) -> None:
    """Until a dnsmasq just started answers (dig retries; bounded)."""
    for _ in range(50):
        out = subprocess.run(
            ["dig", f"@{LOOPBACK}", "-p", str(port), "+short", "+tries=1", "+time=1", name],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"the dnsmasq on port {port} never answered {name}")


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "dig"):
        if shutil.which(tool) is None:
            print(f"bench_dns: {tool} is missing; run: sudo bash scripts/bootstrap.sh --bench")
            return
    workdir = tempfile.mkdtemp(prefix="depfence-bench-dns-")
    datafile = os.path.join(workdir, "queries.txt")
    with open(datafile, "w") as f:
        f.writelines(f"{name} A\n" for name in NAMES)
    client = os.path.join(workdir, "closed_loop.py")
    with open(client, "w") as f:
        f.write(CLOSED_LOOP)
    try:
        with Lab() as lab:
            records = [f"--address=/{n}/{lab.address(n)}" for n in NAMES]
            with (
                dnsmasq(f"--port={UPSTREAM_PORT}", *records),
                dnsmasq(
                    f"--port={FORWARDER_PORT}",
                    "--cache-size=0",
                    f"--server={LOOPBACK}#{UPSTREAM_PORT}",
                ),
            ):
                wait_answers(UPSTREAM_PORT, NAMES[0])
                wait_answers(FORWARDER_PORT, NAMES[0])
                fence = Fence(
                    Policy.no_egress("github.com"), upstream=f"{LOOPBACK}:{UPSTREAM_PORT}"
                )
                with fence:
                    measure(fence, lab, datafile, client, args.reps, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def address_of(target: str, lab: Lab) -> tuple[str, int]:
    if target == "direct":
        return LOOPBACK, UPSTREAM_PORT
    if target == "dnsmasq":
        return LOOPBACK, FORWARDER_PORT
    # Port 53 of the lab resolver: the kernel sends it to the fence's proxy instead.
    return lab.RESOLVER4, 53


def run_target(target: str, fence: Fence, argv: list[str], read: Callable[[str], Sample]) -> Sample:
    """The sample `read` makes of the client's output; for depfence, with the run's DNS
    events counted and the proxy threads' CPU per query sent."""
    if target != "depfence":
        return read(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    cpu = proxy_cpu()
    result = fence.run(argv, check=False)
    cpu = proxy_cpu() - cpu
    sample = read(result.stdout)
    dns = [e for e in result.events if e.port == 53 and e.domain]
    sample.attributed = sum(1 for e in dns if e.pid is not None and argv[0] in (e.cmdline or ""))
    sample.events = len(dns)
    sample.cpu_us = cpu / max(sample.sent, 1) * 1e6
    return sample


def proxy_cpu() -> float:
    """CPU seconds used so far by the proxy's threads (all of this process's
    depfence-dns* threads: the loop, TCP readers, pools), user and system."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for thread in threading.enumerate():
        if not thread.name.startswith("depfence-dns") or thread.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def throughput(target: str, fence: Fence, lab: Lab, datafile: str, seconds: float) -> Sample:
    server, port = address_of(target, lab)
    return run_target(target, fence, dnsperf_argv(server, port, datafile, 20, seconds), parse)


def latency(target: str, fence: Fence, lab: Lab, client: str) -> Sample:
    server, port = address_of(target, lab)
    argv = [sys.executable, client, server, str(port), str(LATENCY_QUERIES), *NAMES]
    return run_target(target, fence, argv, closed_loop)


def closed_loop(out: str) -> Sample:
    """The sample of `CLOSED_LOOP`'s output (its JSON line)."""
    loop = json.loads(out)
    return Sample(0, loop["median_ms"], loop["sent"], loop["sent"] - loop["lost"], loop["lost"])


def measure(fence: Fence, lab: Lab, datafile: str, client: str, reps: int, seconds: float) -> None:
    targets = ["direct", "dnsmasq", "depfence"]
    qps: dict[str, list[Sample]] = {t: [] for t in targets}
    lat: dict[str, list[Sample]] = {t: [] for t in targets}
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    for rep in range(reps):
        order = targets[rep % 3 :] + targets[: rep % 3]
        for target in order:
            qps[target].append(throughput(target, fence, lab, datafile, seconds))
        for target in order:
            lat[target].append(latency(target, fence, lab, client))
        line = "  ".join(
            f"{t} {qps[t][-1].qps:,.0f} qps / {lat[t][-1].latency_ms:.3f} ms" for t in targets
        )
        print(f"rep {rep + 1}/{reps}: {line}", flush=True)
    report(qps, lat)
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


def report(qps: dict[str, list[Sample]], lat: dict[str, list[Sample]]) -> None:
    reps = len(qps["direct"])
    print(f"\nDNS qps, 20 outstanding (dnsperf -q 20), min–max of {reps} interleaved reps:")
    for target in ("direct", "dnsmasq", "depfence"):
        values = [s.qps for s in qps[target]]
        lost = sum(s.lost for s in qps[target])
        sent = sum(s.sent for s in qps[target])
        print(f"  {target:9} {spread(values, '{:,.0f}'):>17} qps   lost {lost} of {sent}")
    ratios = [d.qps / m.qps for d, m in zip(qps["depfence"], qps["dnsmasq"])]
    print(
        f"  depfence / dnsmasq (same rep): {spread(ratios, '{:.2f}')}x, median "
        f"{statistics.median(ratios):.2f}x   (target >= 0.5x)"
    )
    cpu = [s.cpu_us or 0.0 for s in qps["depfence"]]
    print(
        f"  depfence proxy threads' CPU per query: {spread(cpu, '{:.0f}')} µs "
        "(judging, attribution and the event included; moved less by the machine's load than qps)"
    )
    attributed(qps["depfence"])

    print(
        f"\nDNS added latency over direct, 1 outstanding (closed loop, median of "
        f"{LATENCY_QUERIES} queries), min–max of {reps} reps:"
    )
    direct = [s.latency_ms for s in lat["direct"]]
    print(f"  direct    {spread(direct, '{:.3f}'):>17} ms median round trip")
    for target in ("dnsmasq", "depfence"):
        added = [s.latency_ms - d.latency_ms for s, d in zip(lat[target], lat["direct"])]
        ratio = [s.latency_ms / d.latency_ms for s, d in zip(lat[target], lat["direct"])]
        lost = sum(s.lost for s in lat[target])
        middle = statistics.median(added)
        print(
            f"  {target:9} +{spread(added, '{:.3f}'):>16} ms, median +{middle:.3f}"
            f"   ({spread(ratio, '{:.2f}')}x direct)   lost {lost}"
        )
    print("  target: depfence <= +0.100 ms (the reps' median; each rep's figure is a median too)")
    cpu = [s.cpu_us or 0.0 for s in lat["depfence"]]
    print(
        f"  depfence proxy threads' CPU per query: {spread(cpu, '{:.0f}')} µs (the loop's spin "
        "after each round included: dnsproxy/loop.py SPIN)"
    )
    attributed(lat["depfence"])


def attributed(samples: list[Sample]) -> None:
    events = sum(s.events or 0 for s in samples)
    named = sum(s.attributed or 0 for s in samples)
    completed = sum(s.completed for s in samples)
    sent = sum(s.sent for s in samples)
    print(
        f"  depfence events (all runs): {events} DNS events for {sent} queries sent "
        f"({completed} answered), {named} attributed to the client's pid and command line"
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it never fails the suite
        print(f"bench_dns: could not measure: {exc!r}", file=sys.stderr)
