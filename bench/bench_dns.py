"""What depfence's DNS proxy costs a fenced process, against real DNS tools.

Everything runs inside the lab's network namespace (pytest_depfence.lab): no
packet leaves this machine, and the machine's resolver is never asked.

Three resolvers are measured with dnsperf, interleaved (each repetition runs
every target once, in a rotating order), for two figures each:
- qps with 20 queries outstanding (``dnsperf -q 20``), and the queries lost;
- latency with 1 outstanding (``dnsperf -q 1``, a closed loop): the figure is
  what each resolver adds over asking the upstream directly, measured in the
  same repetition.

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
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pytest_depfence import Fence, Policy
from pytest_depfence.lab import Lab

UPSTREAM_PORT = 5354
FORWARDER_PORT = 5355
LOOPBACK = "127.0.0.1"
NAMES = ("mirror.internal", "pypi.internal", "migrations.internal", "dns.google")


@dataclass
class Sample:
    qps: float
    latency_ms: float
    sent: int
    completed: int
    lost: int
    attributed: int | None = None  # depfence only: events naming dnsperf's pid
    events: int | None = None


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
                    measure(fence, lab, datafile, args.reps, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_target(
    target: str, fence: Fence, lab: Lab, datafile: str, outstanding: int, seconds: float
) -> Sample:
    if target == "direct":
        argv = dnsperf_argv(LOOPBACK, UPSTREAM_PORT, datafile, outstanding, seconds)
    elif target == "dnsmasq":
        argv = dnsperf_argv(LOOPBACK, FORWARDER_PORT, datafile, outstanding, seconds)
    else:
        # Port 53 of the lab resolver: the kernel sends it to the fence's proxy instead.
        argv = dnsperf_argv(lab.RESOLVER4, 53, datafile, outstanding, seconds)
    if target != "depfence":
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        return parse(out.stdout)
    result = fence.run(argv, check=False)
    sample = parse(result.stdout)
    dns = [e for e in result.events if e.port == 53 and e.domain]
    pids = {e.pid for e in dns}
    sample.events = len(dns)
    sample.attributed = sum(1 for e in dns if e.pid is not None and "dnsperf" in (e.cmdline or ""))
    if len(pids) > 1:
        print(f"  note: DNS events name {len(pids)} pids: {sorted(map(str, pids))}")
    return sample


def measure(fence: Fence, lab: Lab, datafile: str, reps: int, seconds: float) -> None:
    targets = ["direct", "dnsmasq", "depfence"]
    qps: dict[str, list[Sample]] = {t: [] for t in targets}
    lat: dict[str, list[Sample]] = {t: [] for t in targets}
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    for rep in range(reps):
        order = targets[rep % 3 :] + targets[: rep % 3]
        for target in order:
            qps[target].append(run_target(target, fence, lab, datafile, 20, seconds))
        for target in order:
            lat[target].append(run_target(target, fence, lab, datafile, 1, seconds))
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
    print(f"  depfence / dnsmasq (same rep): {spread(ratios, '{:.2f}')}x   (target >= 0.5x)")
    attributed(qps["depfence"] + lat["depfence"])

    print(f"\nDNS added latency over direct, 1 outstanding (dnsperf -q 1), min–max of {reps} reps:")
    direct = [s.latency_ms for s in lat["direct"]]
    print(f"  direct    {spread(direct, '{:.3f}'):>17} ms average latency")
    for target in ("dnsmasq", "depfence"):
        added = [s.latency_ms - d.latency_ms for s, d in zip(lat[target], lat["direct"])]
        ratio = [s.latency_ms / d.latency_ms for s, d in zip(lat[target], lat["direct"])]
        lost = sum(s.lost for s in lat[target])
        print(
            f"  {target:9} +{spread(added, '{:.3f}'):>16} ms   ({spread(ratio, '{:.2f}')}x direct)"
            f"   lost {lost}"
        )
    print("  target: depfence <= +0.100 ms")


def attributed(samples: list[Sample]) -> None:
    events = sum(s.events or 0 for s in samples)
    named = sum(s.attributed or 0 for s in samples)
    completed = sum(s.completed for s in samples)
    sent = sum(s.sent for s in samples)
    print(
        f"  depfence events (all runs): {events} DNS events for {sent} queries sent "
        f"({completed} answered), {named} attributed to dnsperf's pid and command line"
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it never fails the suite
        print(f"bench_dns: could not measure: {exc!r}", file=sys.stderr)
