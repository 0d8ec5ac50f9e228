"""Events the kernel could not report make the run a violation: nothing missed silently.

A ring buffer that is full drops what the programs try to report. One of the
dropped events may have been a forbidden attempt, so the fence counts every
drop (map `lost_events`, by fence cgroup) and a run with any fails, in every
mode. To fill the connection ring for real, the test makes the events thread
stop consuming once the fenced client has started (it says "ready" and waits
on a FIFO), until the client has sent one datagram to each of more
destinations than the ring has room for (the kernel reports a process's first
message to each destination, and only counts the rest: bpf/sockaddr.c).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from pytest_depfence import EgressViolation, Policy
from pytest_depfence.kernel import load

#: More first contacts than conn_events (256 pages of 64-byte records) holds: one
#: datagram to each of this many ports of a lab address (nothing listens there).
PORTS = 20000
FLOOD = """
import socket, sys
print("ready", flush=True)
open(sys.argv[1]).read()
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for port in range(1024, 1024 + int(sys.argv[3])):
        s.sendto(b"x", (sys.argv[2], port))
print("done", flush=True)
"""


def test_a_full_ring_buffer_fails_the_run(fences, lab, monkeypatch, tmp_path: Path) -> None:
    fence = fences(Policy.no_egress("github.com"))
    bpf = load()._bpf
    consume = bpf.ring_buffer_consume
    release = threading.Event()

    def stalled() -> None:
        release.wait(120)  # the events thread waits here (consuming nothing) until "done"
        consume()

    go = tmp_path / "go"
    os.mkfifo(go)

    def on_output(stream: str, chunk: bytes) -> None:
        if b"ready" in chunk:
            monkeypatch.setattr(bpf, "ring_buffer_consume", stalled)
            go.write_text("go")
        if b"done" in chunk:
            release.set()
            monkeypatch.setattr(bpf, "ring_buffer_consume", consume)

    try:
        with pytest.raises(EgressViolation) as caught:
            fence.run(
                [sys.executable, "-c", FLOOD, str(go), lab.address("mirror.internal"), str(PORTS)],
                on_output=on_output,
                timeout=120,
            )
    finally:
        release.set()
    [lost] = [v for v in caught.value.violations if v.is_loss]
    assert "could not report" in str(lost.rule) and "of command" in str(lost.rule)
    assert "(events lost)" in str(caught.value)


#: Queries for an allowed name sent back to back, none of their answers read.
QUERIES = """
import socket, struct, sys
name = b"\\x06mirror\\x08internal\\x00"
query = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + name + b"\\x00\\x01\\x00\\x01"
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for txid in range(int(sys.argv[2])):
        s.sendto(struct.pack(">H", txid) + query[2:], (sys.argv[1], 53))
"""


def test_queries_the_proxy_never_read_fail_the_run(fences, lab, monkeypatch) -> None:
    """The kernel drops datagrams a socket has no room for: at the proxy, each was a query
    neither judged nor recorded. Its listeners are made with room for almost nothing here,
    so that a burst of queries overflows them for sure."""
    from pytest_depfence.dnsproxy import listeners, parking

    monkeypatch.setattr(listeners, "RECEIVE_BUFFER", 1)
    parking.release()  # a parked proxy's listeners have room: the fence makes its own
    fence = fences(Policy.no_egress("github.com"), mode="audit")
    try:
        result = fence.run([sys.executable, "-c", QUERIES, lab.RESOLVER4, "2000"], timeout=60)
    finally:
        fence.close()
        parking.release()  # its listeners, with no room, are no later fence's
    [dropped] = [v for v in result.violations if v.is_loss]
    assert "DNS queries to the fence's proxy unread" in str(dropped.rule)
    count = int(str(dropped.rule).split("dropped ")[1].split()[0])
    judged = [e for e in result.events if e.domain == "mirror.internal"]
    assert count > 0 and count + len(judged) == 2000
