"""One fenced run: its members, what the kernel and the proxy report about them, its teardown.

A run has **members**, each a cgroup keyed by its id: the command's cgroup,
the fence's services (`service.py`) and the cgroups adopted for the run.
Events from the kernel and the proxy are attributed to the member they came
from and judged by the fence's `Judge`. A contact with a local service
(loopback, a local address, a unix socket) names the process listening there
(`local.LocalPeers`); when that is a service of the fence, the contact is a
call, and the service's own events in the run name the run's process that
called it last before them (`EgressEvent.called_by`), so the chain reads
script -> curl -> service -> github.com.

Everything a run sets up is undone by a `Teardown` stack in which every step
runs even when an earlier one raised. User callbacks (`on_event`) run on a
thread of their own, fed by a queue, so a slow reader never stalls the DNS
proxy or the kernel-event thread.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cgroup import pids_of
from .events import EgressEvent
from .judge import OWNERLESS, DnsVerdict, Judge
from .local import LocalListener, LocalPeers, socket_path
from .procinfo import Attribution, attribute, cmdline_of, read_proc_cmdline

if TYPE_CHECKING:
    from .dnsproxy import Query
    from .kernel import BypassEvent, ConnEvent, EscapeEvent, Owner, Programs, UnixEvent
    from .kernel.abi import ContactKey

#: Why a query names no process when two programs sent with its port and DNS id at once.
CLASH = (
    "two programs sent a query from this port with this DNS id at once (one socket, "
    "shared across a fork or an exec): which of them asked this one is not known"
)
#: The listener of a local contact when nothing listens there by the time it is looked up.
NO_LISTENER = "nothing listens there now (the connection was refused, or its listener closed)"


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


def _from_proc(pid: int) -> Attribution | None:
    """A live process as /proc names it (no ancestry); None when /proc has no command line."""
    argv = read_proc_cmdline(pid)
    return Attribution(pid, shlex.join(argv), ()) if argv else None


@dataclass
class Member:
    """A cgroup whose processes belong to the run: the command's, a service's, an adopted one."""

    name: str
    cgroup_id: int
    #: The cgroup's directory.
    dir: Path
    #: Its path from the cgroup v2 root ("/depfence/..."), as /proc/PID/cgroup says it.
    path: str
    #: Where ancestry stops: the member's first process.
    root_pid: int | None = None
    #: A service (fenced or adopted): its events carry its name, its callers are traced.
    service: bool = False
    #: Events the kernel could not report for it, as counted at the last run's end.
    lost: int = 0

    def holds(self, cgroup_path: str | None) -> bool:
        """Whether a process in cgroup `cgroup_path` is in this member (or below it)."""
        return cgroup_path is not None and (
            cgroup_path == self.path or cgroup_path.startswith(self.path.rstrip("/") + "/")
        )


@dataclass
class Contact:
    """A permitted contact as the kernel counts it (one `ContactKey`), seen by a run."""

    #: The key of the run's record it counts towards (`Run._records`); None: none (nothing
    #: listened at a local UDP destination, so it was not recorded).
    record: object = None
    #: Its messages the kernel reported since its count was last taken: the first one,
    #: and, while the kernel's map was full, every one.
    reported: int = 0
    #: Its messages counted so far.
    connections: int = 0


class ProxyJudge:
    """The proxy's `DnsJudge`: the fence's judge, and the run that records the query.

    A query's sender is looked up in the kernel's flow map before its reply is sent
    (`sender`; a forwarded query's while the upstream works on it) and kept until it is
    observed (after the upstream's answer, its failure, or drain()):
    by then the flow entry may name another query's sender or be gone.
    """

    def __init__(self, judge: Judge, recorder: Callable[[], Run]) -> None:
        self._judge = judge
        self._recorder = recorder
        #: id(query) -> (query, its sender): the query kept so that its id stays its own.
        self._owners: dict[int, tuple[Query, Owner | None]] = {}

    def query(self, query: Query) -> DnsVerdict:
        return self._judge.query(query.name)

    def sender(self, query: Query) -> None:
        try:
            owner = self._recorder().query_owner(query)
        except Exception:  # noqa: BLE001 - looked up again when observed; that one is kept
            return
        self._owners[id(query)] = (query, owner)

    def answer(self, query: Query, reply: bytes, verdict: DnsVerdict) -> DnsVerdict:
        return self._judge.answer(query.name, reply, verdict)

    def observe(self, query: Query, verdict: DnsVerdict) -> None:
        kept = self._owners.pop(id(query), None)
        if kept is not None and kept[0] is query:
            self._recorder().on_query_from(query, verdict, kept[1])
        else:
            self._recorder().on_query(query, verdict)


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A callback of the kernel's or the proxy's thread: an error in it is kept (and raised
    by the run in the caller's thread), never lost in a thread that prints and goes on."""

    @functools.wraps(method)
    def call(self: Run, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:  # noqa: BLE001 - raised by raise_errors, in the run's thread
            with self._lock:
                self.errors.append(exc)

    return call


@dataclass
class Run:
    """What one run saw, attributed to its members and judged."""

    programs: Programs
    judge: Judge
    #: Who listens at local destinations (the fence's, shared by its runs).
    peers: LocalPeers = field(default_factory=LocalPeers)
    on_event: Callable[[EgressEvent], None] | None = None
    members: dict[int, Member] = field(default_factory=dict)
    #: (monotonic ns, member cgroup id or None, event)
    _events: list[tuple[int, int | None, EgressEvent]] = field(default_factory=list)
    #: Calls of services: (monotonic ns, service name, who called).
    _calls: list[tuple[int, str, Attribution]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Packet-level reports already made: TCP retransmits a dropped segment, and an
    #: ownerless socket's every packet would repeat the same event.
    _reported: set[tuple[object, ...]] = field(default_factory=set)
    _delivery: Delivery | None = None
    #: Errors of the callbacks the kernel's and the proxy's threads call (`raise_errors`).
    errors: list[Exception] = field(default_factory=list)
    #: Once finished: where events that still come go (the fence's recorder of its
    #: services, which runs outside any run).
    _after: Run | None = None
    _finished: bool = False
    #: Permitted contacts reported by the kernel, by its key (the count comes at the end).
    _contacts: dict[ContactKey, Contact] = field(default_factory=dict)
    #: The event recorded for each permitted contact, by record key (a contact's `record`).
    _records: dict[object, EgressEvent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_event is not None:
            self._delivery = Delivery(self.on_event)

    def add_member(self, member: Member) -> None:
        with self._lock:
            self.members = {**self.members, member.cgroup_id: member}  # readers hold the old

    def remove_member(self, cgroup_id: int) -> None:
        """Forget a member and the events recorded of it (a stopped service's)."""
        with self._lock:
            self.members = {k: m for k, m in self.members.items() if k != cgroup_id}
            self._events = [e for e in self._events if e[1] != cgroup_id]

    def member_holding(self, listener: LocalListener) -> Member | None:
        return next((m for m in self.members.values() if m.holds(listener.cgroup)), None)

    def service_pids(self) -> list[int]:
        """Where a local listener is looked for first: the services' processes."""
        return [pid for m in self.members.values() if m.service for pid in pids_of(m.dir)]

    # -- attribution -----------------------------------------------------------------
    def who(
        self, pid: int, cgroup_id: int, at_ns: int | None = None, by_socket: bool = False
    ) -> Attribution:
        """The process `pid` of member `cgroup_id`, its command line and ancestry (as they
        were at `at_ns`, CLOCK_MONOTONIC, when given); `by_socket`: `pid` is the socket's
        owner, not surely the sender. Pid 0: the kernel knew no process (OWNERLESS)."""
        if not pid:
            return Attribution(None, None, (), OWNERLESS)
        member = self.members.get(cgroup_id)
        if member is None:
            return Attribution(None, None, (), f"sent from another cgroup (id {cgroup_id})")
        who = attribute(self.programs, pid, cgroup_id, member.root_pid, at_ns)
        if by_socket and who.pid is not None:
            who = dataclasses.replace(who, by_socket=True)
        if who.pid is None and member.service:
            # An adopted service's processes started before the run: the kernel never saw
            # their exec, but they are alive (the event is theirs): /proc names them.
            return _from_proc(pid) or who
        return who

    # -- what the proxy and the kernel report ------------------------------------------
    def query_owner(self, query: Query) -> Owner | None:
        """The fenced socket's owner that sent `query` (the kernel's flow map); None: none."""
        return self.programs.flow_owner(
            query.transport, query.listen_port, query.client, query.txid
        )

    @_guarded
    def on_query(self, query: Query, verdict: DnsVerdict) -> None:
        """A query observed, its sender looked up now."""
        self._query_event(query, verdict, self.query_owner(query))

    @_guarded
    def on_query_from(self, query: Query, verdict: DnsVerdict, owner: Owner | None) -> None:
        """A query observed, sent by `owner`, looked up when the query arrived: an upstream
        slow to answer, or never answering, leaves the kernel's flow entry time to be
        reused by another query (same port and id) or evicted meanwhile."""
        self._query_event(query, verdict, owner)

    def _query_event(self, query: Query, verdict: DnsVerdict, owner: Owner | None) -> None:
        if owner is None:
            who = Attribution(None, None, (), "no fenced socket sent this message")
        elif owner.clash:
            who = Attribution(None, None, (), CLASH)
        else:
            who = self.who(owner.pid, owner.cgroup_id, owner.time_ns or None, owner.by_socket)
        event = self.judge.dns_event(query, verdict, who)
        # The query's time, not its observation's (after the client had its answer).
        at = query.received_ns or time.monotonic_ns()
        self.add(at, event, owner.cgroup_id if owner else None)

    @_guarded
    def on_connection(self, conn: ConnEvent) -> None:
        if conn.where == "packet" and not self.first_report(
            ("packet", conn.pid, conn.address, conn.port, conn.protocol)
        ):
            return  # every packet of a raw socket to a refused address: one event
        contact = None
        if conn.action == "allowed":
            # The kernel reports the first message of a key and counts the rest; it reports
            # every one when its map is full: those are counted here instead.
            with self._lock:
                seen = conn.contact in self._contacts
                contact = self._contacts.setdefault(conn.contact, Contact())
                contact.reported += 1
            if seen:
                return
        who = self.who(conn.pid, conn.cgroup_id, conn.time_ns, conn.by_socket)
        if contact is not None and self.peers.is_local(conn.address):
            # One record per process and local endpoint, as for unix sockets (the kernel's
            # key also has the hook: a connect and a datagram are counted apart).
            record = ("local", conn.pid, conn.protocol, conn.address, conn.port)
            if not self.first_report(record):
                self._record(contact, record, None)
                return
            where = self.peers.listener(
                conn.protocol, conn.address, conn.port, candidates=self.service_pids()
            )
            if where is None and conn.protocol != "tcp":
                return  # no UDP socket there (glibc's address-sorting probe sends nothing)
            address = str(conn.address)
            event = self._local(
                conn.time_ns, conn.cgroup_id, who, where, address, conn.port, conn.protocol
            )
            self._record(contact, record, event)
            return
        event = self.add(conn.time_ns, self.judge.connection(conn, who), conn.cgroup_id)
        if contact is not None:
            self._record(contact, conn.contact, event)

    def _record(self, contact: Contact, record: object, event: EgressEvent | None) -> None:
        """`event`, recorded by this run, is where `contact`'s count goes."""
        with self._lock:
            contact.record = record
            if event is not None:
                self._records[record] = event

    @_guarded
    def on_unix(self, contact: UnixEvent) -> None:
        """A connect() to a unix socket: on record when it reached a listener."""
        if not contact.reached or not self.first_report(("unix", contact.pid, contact.path)):
            return
        who = self.who(contact.pid, contact.cgroup_id)
        path = socket_path(contact.pid, contact.path)
        where = self.peers.listener("unix", path, candidates=self.service_pids())
        self._local(contact.time_ns, contact.cgroup_id, who, where, path, None, "unix")

    def _local(
        self,
        when_ns: int,
        cgroup_id: int,
        who: Attribution,
        where: LocalListener | None,
        address: str,
        port: int | None,
        protocol: str,
    ) -> EgressEvent | None:
        """A contact with a local service: a call when a service of the fence listens there;
        nothing when the listener is in the run itself (its own traffic). `where` None:
        nothing listens there by the time we look (the connection was refused, or the
        listener closed at once): on record all the same, judged as an outside service.
        Returns the event as recorded (None: none)."""
        member = self.member_holding(where) if where is not None else None
        if member is not None and not member.service:
            return None
        listener = where.describe() if where is not None else NO_LISTENER
        if member is not None:
            listener = f"service {member.name}: {listener}"
            with self._lock:
                self._calls.append((when_ns, member.name, who))
        event = self.judge.local_contact(
            who,
            address=address,
            port=port,
            protocol=protocol,
            listener=listener,
            service=member.name if member is not None else None,
        )
        return self.add(when_ns, event, cgroup_id)

    @_guarded
    def on_bypass(self, query: BypassEvent) -> None:
        key = (query.pid, query.name, query.address, query.port, query.protocol, query.txid)
        if self.first_report(("bypass", *key)):
            who = self.who(query.pid, query.cgroup_id, query.time_ns, query.by_socket)
            self.add(query.time_ns, self.judge.bypass(query, who), query.cgroup_id)

    @_guarded
    def on_escape(self, escape: EscapeEvent) -> None:
        """A process of a member was moved out of the fence (and killed: kernel.Listener)."""
        who = self.who(escape.pid, escape.cgroup_id)
        if who.pid is None:
            # Its record is gone (more processes came since than the kernel keeps), but
            # the kernel named the pid itself; /proc may still have its command line.
            who = _from_proc(escape.pid) or Attribution(escape.pid, None, (), who.unattributed)
        mover = None if escape.writer == escape.pid else self.describe(escape.writer)
        self.add(escape.time_ns, self.judge.escape(escape, who, mover), escape.cgroup_id)

    def describe(self, pid: int) -> str:
        """`pid N command` for any process: the kernel's record when it is a fenced one."""
        record = self.programs.process(pid)
        if record is not None and not record.exited and record.cgroup_id in self.members:
            return f"pid {pid} {cmdline_of(record)}"
        alive = _from_proc(pid)
        return f"pid {pid} {alive.cmdline}" if alive else f"pid {pid}"

    # -- events ------------------------------------------------------------------------
    def add(
        self, when_ns: int, event: EgressEvent, cgroup_id: int | None = None
    ) -> EgressEvent | None:
        """Record an event of member `cgroup_id` (a service's carries its name). Once the
        run has finished, a service's event goes where `finish` said. Returns the event
        as this run recorded it (None: it went elsewhere)."""
        member = self.members.get(cgroup_id) if cgroup_id is not None else None
        if member is not None and member.service:
            event = dataclasses.replace(event, service=member.name)
        with self._lock:
            finished, late = self._finished, self._after
            if not finished:
                self._events.append((when_ns, cgroup_id, event))
        if finished:
            if late is not None:
                late.add(when_ns, event, cgroup_id)
            return None
        if self._delivery is not None:
            self._delivery.put(event)
        return event

    def first_report(self, key: tuple[object, ...]) -> bool:
        with self._lock:
            if key in self._reported:
                return False
            self._reported.add(key)
            return True

    def in_order(self, cgroup_id: int | None = None) -> tuple[EgressEvent, ...]:
        """Every event by time (of member `cgroup_id` only, if given); a service's names
        the run's process that called it last before it (the call is a connect, so it
        comes before what the service does)."""
        with self._lock:
            events = sorted(self._events, key=lambda entry: entry[0])
            calls = sorted(self._calls, key=lambda call: call[0])
        return tuple(
            self._chained(when, event, calls)
            for when, member, event in events
            if cgroup_id is None or member == cgroup_id
        )

    def count_lost(self) -> None:
        """A violation for the events the kernel could not report for a member since the
        last count (`Judge.lost`). After the last events are consumed, before the members
        are forgotten by the kernel (their counts with them)."""
        for member in self.members.values():
            lost = self.programs.lost(member.cgroup_id)
            if lost > member.lost:
                event = self.judge.lost(lost - member.lost, member.name)
                self.add(time.monotonic_ns(), event, member.cgroup_id)
                member.lost = lost

    def count_contacts(self, cgroup_ids: set[int] | None = None) -> None:
        """Put on each permitted contact the connections the kernel counted
        (`EgressEvent.connections`), taking the counts of members `cgroup_ids` (default:
        all) out of its map: their next message of each is reported again. After the last
        events are consumed, before the members are forgotten by the kernel."""
        ids = set(self.members) if cgroup_ids is None else cgroup_ids
        with self._lock:
            if not any(key[0] in ids for key in self._contacts):
                return  # nothing to count on (what the kernel may hold goes at unregister)
        taken = self.programs.take_contacts(ids)
        with self._lock:
            counted_now = set()
            for key, contact in self._contacts.items():
                if key[0] in ids and contact.record in self._records:
                    counted = taken.get(key, 0)
                    # What the kernel counted (the first of which it reported too), and what
                    # it reported instead while its map was full.
                    both = 1 if counted and contact.reported else 0
                    contact.connections += counted + contact.reported - both
                    contact.reported = 0
                    counted_now.add(contact.record)
            totals: dict[object, int] = {}
            for contact in self._contacts.values():
                if contact.record in counted_now:
                    totals[contact.record] = totals.get(contact.record, 0) + contact.connections
            counted_events = {id(self._records[record]): record for record in totals}
            for index, (when, member, event) in enumerate(self._events):
                record = counted_events.get(id(event))
                if record is not None:
                    event = dataclasses.replace(event, connections=totals[record])
                    self._records[record] = event
                    self._events[index] = (when, member, event)

    def finish(self, after: Run | None) -> tuple[EgressEvent, ...]:
        """The run's events, final: what its services do from now on goes to `after`."""
        with self._lock:
            self._finished, self._after = True, after
        return self.in_order()

    def raise_errors(self) -> None:
        """The first error a callback of this run raised on another thread, raised here."""
        with self._lock:
            errors = list(self.errors)
        if errors:
            raise errors[0]

    @staticmethod
    def _chained(
        when: int, event: EgressEvent, calls: list[tuple[int, str, Attribution]]
    ) -> EgressEvent:
        if event.service is None:
            return event
        callers = [who for at, name, who in calls if name == event.service and at <= when]
        if not callers:
            return event
        caller = callers[-1]
        if caller.pid is None or caller.cmdline is None:
            return event
        chain = ((caller.pid, caller.cmdline), *caller.ancestry)
        return dataclasses.replace(event, called_by=chain)

    def finish_delivery(self) -> None:
        """Every event delivered to `on_event`; its first exception raised here."""
        if self._delivery is not None:
            self._delivery.close()
            if self._delivery.error is not None:
                raise self._delivery.error
