"""One fenced run: its members, what the kernel and the proxy report about them, its teardown.

A run has **members**, each a cgroup keyed by its id: the command's cgroup
today, fenced services later. Events from the kernel and the proxy are
attributed to the member they came from and judged by the fence's `Judge`.
Everything a run sets up is undone by a `Teardown` stack in which every step
runs even when an earlier one raised. User callbacks (`on_event`) run on a
thread of their own, fed by a queue, so a slow reader never stalls the DNS
proxy or the kernel-event thread.
"""

from __future__ import annotations

import queue
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cgroup import FenceCgroup
from .events import EgressEvent
from .judge import OWNERLESS, DnsVerdict, Judge
from .procinfo import Attribution, attribute, cmdline_of, read_proc_cmdline

if TYPE_CHECKING:
    from .dnsproxy import Query
    from .kernel import BypassEvent, ConnEvent, EscapeEvent, Programs


class Teardown:
    """Undo steps, last first; every step runs, and the first error is raised after all."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self._steps.append(step)

    def close(self) -> None:
        first: BaseException | None = None
        while self._steps:
            step = self._steps.pop()
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - the next steps must still run
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> Teardown:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Delivery:
    """Calls `callback(event)` for each event, in order, on a thread of its own.

    An exception from the callback stops further calls and is kept in `error`,
    for the run to raise in the caller's thread.
    """

    _END = object()

    def __init__(self, callback: Callable[[EgressEvent], None]) -> None:
        self._callback = callback
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._deliver, name="depfence-on-event", daemon=True)
        self._thread.start()

    def put(self, event: EgressEvent) -> None:
        self._queue.put(event)

    def close(self) -> None:
        """Deliver what is queued, then stop."""
        self._queue.put(self._END)
        self._thread.join()

    def _deliver(self) -> None:
        while (event := self._queue.get()) is not self._END:
            if self.error is not None:
                continue
            try:
                self._callback(event)
            except Exception as exc:  # noqa: BLE001 - raised by the run, in the caller's thread
                self.error = exc


@dataclass
class Member:
    """A cgroup whose processes belong to the run: the command's, or a service's."""

    name: str
    cgroup: FenceCgroup
    #: Where ancestry stops: the member's first process.
    root_pid: int | None = None


@dataclass
class Run:
    """What one run saw, attributed to its members and judged."""

    programs: Programs
    judge: Judge
    on_event: Callable[[EgressEvent], None] | None = None
    members: dict[int, Member] = field(default_factory=dict)
    _events: list[tuple[int, EgressEvent]] = field(default_factory=list)  # (monotonic ns, event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Packet-level reports already made: TCP retransmits a dropped segment, and an
    #: ownerless socket's every packet would repeat the same event.
    _reported: set[tuple[object, ...]] = field(default_factory=set)
    _delivery: Delivery | None = None

    def __post_init__(self) -> None:
        if self.on_event is not None:
            self._delivery = Delivery(self.on_event)

    def add_member(self, member: Member) -> None:
        self.members[member.cgroup.id] = member

    # -- attribution -----------------------------------------------------------------
    def who(self, pid: int, cgroup_id: int) -> Attribution:
        """The process `pid` of member `cgroup_id`, its command line and ancestry."""
        member = self.members.get(cgroup_id)
        if member is None:
            return Attribution(None, None, (), f"sent from another cgroup (id {cgroup_id})")
        return attribute(self.programs, pid, cgroup_id, member.root_pid)

    def who_asked(self, query: Query) -> Attribution:
        owner = self.programs.flow_owner(
            query.transport, query.listen_port, query.client[1], query.txid
        )
        if owner is None:
            return Attribution(None, None, (), "no fenced socket sent this message")
        return self.who(owner.pid, owner.cgroup_id)

    # -- what the proxy and the kernel report ------------------------------------------
    def on_query(self, query: Query, verdict: DnsVerdict) -> None:
        self.add(time.monotonic_ns(), self.judge.dns_event(query, verdict, self.who_asked(query)))

    def on_connection(self, conn: ConnEvent) -> None:
        if conn.pid:
            who = self.who(conn.pid, conn.cgroup_id)
        elif self.first_report(("ownerless", conn.address, conn.port, conn.protocol)):
            who = Attribution(None, None, (), OWNERLESS)
        else:
            return
        self.add(conn.time_ns, self.judge.connection(conn, who))

    def on_bypass(self, query: BypassEvent) -> None:
        key = (query.pid, query.name, query.address, query.port, query.protocol, query.txid)
        if self.first_report(("bypass", *key)):
            who = self.who(query.pid, query.cgroup_id)
            self.add(query.time_ns, self.judge.bypass(query, who))

    def on_escape(self, escape: EscapeEvent) -> None:
        """A process of a member was moved out of the fence (and killed: kernel.Listener)."""
        who = self.who(escape.pid, escape.cgroup_id)
        mover = None if escape.writer == escape.pid else self.describe(escape.writer)
        self.add(escape.time_ns, self.judge.escape(escape, who, mover))

    def describe(self, pid: int) -> str:
        """`pid N command` for any process: the kernel's record when it is a fenced one."""
        record = self.programs.process(pid)
        if record is not None and not record.exited and record.cgroup_id in self.members:
            return f"pid {pid} {cmdline_of(record)}"
        argv = read_proc_cmdline(pid)
        return f"pid {pid} {shlex.join(argv)}" if argv else f"pid {pid}"

    # -- events ------------------------------------------------------------------------
    def add(self, when_ns: int, event: EgressEvent) -> None:
        with self._lock:
            self._events.append((when_ns, event))
        if self._delivery is not None:
            self._delivery.put(event)

    def first_report(self, key: tuple[object, ...]) -> bool:
        with self._lock:
            if key in self._reported:
                return False
            self._reported.add(key)
            return True

    def in_order(self) -> tuple[EgressEvent, ...]:
        with self._lock:
            return tuple(e for _, e in sorted(self._events, key=lambda pair: pair[0]))

    def finish_delivery(self) -> None:
        """Every event delivered to `on_event`; its first exception raised here."""
        if self._delivery is not None:
            self._delivery.close()
            if self._delivery.error is not None:
                raise self._delivery.error
