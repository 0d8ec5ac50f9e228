"""The one thread that serves every `DnsProxy` of this process: an epoll loop.

A proxy adds its sockets' handlers when it starts (`Loop.add`) and takes them out
when it stops (`Loop.remove`); the thread starts with the process's first proxy and
serves every later one. A thread of its own for each proxy cost each fence about
0.45 ms of wall time here (its start and join, and the interpreter's lock passed
back and forth while it starts: `bench/bench_per_test.py`), more than its sockets.

After a round with events the loop keeps polling, without sleeping, for `SPIN`: a
query's upstream answer and a client's next query mostly come within it.

Handlers run one at a time, under the loop's lock, which `remove` takes too: once it
returns, no handler of that proxy runs or will run, so the proxy may close its
sockets. An event read before a removal may name a descriptor that another proxy has
since made again; its handler then finds nothing to read, as every handler is
non-blocking. An exception from a handler is recorded by its proxy (`errors`).

A thread starts in its creator's namespaces and keeps them: this one holds the network
namespace of the thread that started the first proxy (as the kernel's events thread,
`kernel/programs.py`, holds the one of the first fence). The sockets it serves are
each in their own namespace whatever the thread's; the threads a proxy starts to
forward TCP queries join the proxy's (`proxy.py`).
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable, Protocol

#: After a round with events the loop polls without sleeping for this long (s): the
#: upstream's answer to a lone query, and a client's next query, mostly come within it,
#: and waking a sleeping thread for each cost a query 0.045 ms here (`bench/bench_dns.py`'s
#: closed loop, +0.08 -> +0.03 ms). At most this much CPU after each round; none on one
#: CPU, where the spin would hold the CPU that the client and the upstream need.
SPIN = 100e-6 if len(os.sched_getaffinity(0)) > 1 else 0.0


class Served(Protocol):
    """What the loop asks of a proxy besides its handlers."""

    def _record(self, exc: BaseException) -> None: ...

    def _next_timeout(self, now: float) -> float | None: ...

    def _expire(self, now: float) -> None: ...


class Loop:
    """The event loop every proxy of the process is served by (`LOOP`)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Held while handlers run, and while the served set changes.
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[Served, Callable[[], None]]] = {}
        self._served: list[Served] = []
        self._thread: threading.Thread | None = None

    def _forked(self) -> None:
        """In a child forked from this process: no thread serves anything here, and the
        lock may have been held when it was forked. What the parent serves is the
        parent's; the child's first proxy starts a thread of its own."""
        self._epoll.close()
        self._reset()

    def add(self, proxy: Served, handlers: dict[int, Callable[[], None]]) -> None:
        """Serve `proxy`: each handler is called when its descriptor is readable."""
        with self._lock:
            for fd, handler in handlers.items():
                self._epoll.register(fd, select.EPOLLIN)
                self._handlers[fd] = (proxy, handler)
            self._served.append(proxy)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="depfence-dns-loop", daemon=True
                )
                self._thread.start()

    def remove(self, proxy: Served) -> None:
        """Stop serving `proxy`; when this returns, none of its handlers runs."""
        with self._lock:
            for fd, (owner, _) in list(self._handlers.items()):
                if owner is proxy:
                    del self._handlers[fd]
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass  # closed already: epoll forgot it then
            self._served = [served for served in self._served if served is not proxy]

    def _run(self) -> None:
        spin_until = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                timeouts = [t for p in self._served if (t := self._timeout(p, now)) is not None]
            events = self._epoll.poll(0 if now < spin_until else min(timeouts, default=-1))
            if events:
                spin_until = time.monotonic() + SPIN
            with self._lock:
                for fd, _ in events:
                    entry = self._handlers.get(fd)
                    if entry is None:
                        continue  # its proxy stopped meanwhile
                    proxy, handler = entry
                    try:
                        handler()
                    except Exception as exc:
                        proxy._record(exc)
                now = time.monotonic()
                for proxy in self._served:
                    try:
                        proxy._expire(now)
                    except Exception as exc:
                        proxy._record(exc)

    @staticmethod
    def _timeout(proxy: Served, now: float) -> float | None:
        try:
            return proxy._next_timeout(now)
        except Exception as exc:  # recorded, and the loop goes on for the others
            proxy._record(exc)
            return None


#: The process's loop.
LOOP = Loop()
os.register_at_fork(after_in_child=LOOP._forked)
