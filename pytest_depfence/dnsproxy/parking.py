"""A closed fence's DNS proxy, kept for the next fence in the same network namespace.

Starting a proxy binds four listeners and an upstream socket and starts serving them
(~0.15 ms, most of what a fence's open and close cost besides its run:
`bench/bench_per_test.py`). So a fence's close parks its proxy (`park`): the proxy
stops serving (`DnsProxy.park`: off the loop, every connection cut and its thread
joined, every query still open dropped, as `stop` drops them) and keeps its sockets.
The next fence opened in the same network namespace, with the same upstream, takes it
(`take`) and serves its own judge on it; anything that reached the port meanwhile is
thrown away unread. One proxy is parked at a time: a later one replaces it, and a proxy
that recorded an error is stopped, never parked (so is the proxy of a fence that adopted
a service, which lives on: `Fence.close`).

A parked proxy's sockets keep its network namespace alive, as the threads a process's
first fence starts keep theirs: `release()` stops it. `pytest_depfence.lab` does so for
its namespace when a lab closes, and so does this process's exit; a forked child
forgets it (its copies of the sockets close at its exec).
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from .proxy import _NETNS, DnsProxy
from .types import DnsJudge

_lock = threading.Lock()
_parked: DnsProxy | None = None


def take(upstream: tuple[str, int], judge: DnsJudge[Any]) -> DnsProxy:
    """A serving proxy for `judge` in the calling thread's network namespace: the parked
    one when it is that namespace's and asks `upstream` (should it fail to serve again, it
    is stopped), else a new one."""
    global _parked
    netns = os.stat(_NETNS).st_ino
    with _lock:
        proxy = _parked
        if proxy is None or (proxy.netns_id, proxy.upstream) != (netns, upstream):
            proxy = None
        else:
            _parked = None
    if proxy is not None:
        try:
            return proxy.resume(judge)
        except Exception:  # noqa: BLE001 - a proxy of its own then, as without one parked
            proxy.stop()
    return DnsProxy(upstream=upstream, judge=judge).start()


def park(proxy: DnsProxy) -> None:
    """Keep `proxy` for the next fence (the one parked before it is stopped), or stop it
    when it cannot be kept."""
    global _parked
    if not proxy.park():
        proxy.stop()
        return
    with _lock:
        replaced, _parked = _parked, proxy
    if replaced is not None:
        replaced.stop()


def release(netns: int | None = None) -> None:
    """Stop the parked proxy, if any (`netns`: only one parked in the network namespace of
    that inode): its sockets go, and the namespace with them unless something else holds it."""
    global _parked
    with _lock:
        proxy = _parked
        if proxy is None or (netns is not None and proxy.netns_id != netns):
            return
        _parked = None
    proxy.stop()


def _forget_in_child() -> None:
    global _parked, _lock
    _parked, _lock = None, threading.Lock()


atexit.register(release)
os.register_at_fork(after_in_child=_forget_in_child)
