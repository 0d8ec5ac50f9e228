"""The fence: run a command in its own cgroup, DNS through a policy proxy, and report.

`Fence` owns one DNS proxy for its lifetime; each `run()` gets a fresh cgroup
with the shared eBPF programs attached, and everything the run started is
killed and the cgroup removed before `run()` returns.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import itertools
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from dnslib import QTYPE

from . import loader
from .addresses import (
    FROM_DNS,
    FROM_HOSTS,
    FROM_RULE,
    FROM_UPSTREAM,
    AddressBook,
    hosts_entries,
    parse_answer,
    resolve,
)
from .cgroup import CgroupTree, FenceCgroup
from .dnsproxy import DnsProxy, Query
from .errors import ConfigError, EgressViolation
from .events import BlockedAt, EgressEvent, FenceResult, format_violations
from .policy import Decision, Policy
from .procinfo import Attribution, attribute

MODES = ("block", "audit")
#: What a blocked name's query gets from the proxy (the name never resolves).
DNS_OUTAGES = ("nxdomain", "servfail", "refused", "timeout")
#: Every outage: with reset and blackhole the name resolves and its connections fail.
OUTAGES = (*DNS_OUTAGES, "reset", "blackhole")
RESOLV_CONF = "/etc/resolv.conf"

# The child moves itself into the fence cgroup, then becomes the command: nothing
# the command runs is ever outside. A shell rather than preexec_fn, because
# running Python in a forked child of a threaded process is not safe.
_ENTER = ("/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"')

#: Why a packet the backstop dropped names no process.
OWNERLESS = "a raw or ICMP socket: the kernel records no process for its packets"

_fence_ids = itertools.count(1)
_tree_lock = threading.Lock()
_tree: CgroupTree | None = None


def parse_upstream(value: str, source: str = "upstream") -> tuple[str, int]:
    """`HOST[:PORT]`, `[V6]:PORT` or a bare IPv6 address; HOST must be an IP address."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(value, "expected [IPV6]:PORT", source)
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            value, "the upstream must be an IP address (HOST[:PORT])", source
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(value, f"port {port!r} is not in 1..65535", source)
    return host, int(port)


def default_upstream(resolv_conf: str = RESOLV_CONF) -> str:
    try:
        with open(resolv_conf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    raise ConfigError(
        resolv_conf,
        "no nameserver found; pass upstream= or --depfence-upstream",
        "default upstream",
    )


def _session_tree() -> CgroupTree:
    global _tree
    with _tree_lock:
        if _tree is None:
            tree = CgroupTree()
            tree.ensure()
            atexit.register(tree.remove)
            _tree = tree
        return _tree


@dataclass
class _Run:
    cgroup: FenceCgroup
    on_event: Callable[[EgressEvent], None] | None = None
    root_pid: int | None = None
    events: list[tuple[int, EgressEvent]] = field(default_factory=list)  # (monotonic ns, event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Packet-level reports already made: TCP retransmits a dropped segment, and an
    #: ownerless socket's every packet would repeat the same event.
    reported: set[tuple[object, ...]] = field(default_factory=set)

    #: An exception from on_event, raised in the caller's thread after the run.
    callback_error: BaseException | None = None

    def add(self, when_ns: int, event: EgressEvent) -> None:
        with self.lock:
            self.events.append((when_ns, event))
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as exc:  # noqa: BLE001 - re-raised by run(), in its own thread
                self.callback_error = self.callback_error or exc

    def first_report(self, key: tuple[object, ...]) -> bool:
        with self.lock:
            if key in self.reported:
                return False
            self.reported.add(key)
            return True

    def in_order(self) -> tuple[EgressEvent, ...]:
        with self.lock:
            return tuple(e for _, e in sorted(self.events, key=lambda pair: pair[0]))


@dataclass(frozen=True)
class _Verdict:
    """A DNS query's fate, as the proxy (`blocked`) and the report need it."""

    blocked: bool  # answered with the outage instead of the real answer
    forbidden: bool  # the policy forbids it (also in audit mode, also when it still resolves)
    rule: str | None


class _Refuser:
    """A loopback port bound but never listening: connecting to it is refused at once."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(32):
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind(("127.0.0.1", 0))
            self.port = first.getsockname()[1]
            self.sockets = [first]
            try:
                v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            except OSError:
                return  # no IPv6 here: nothing to refuse on
            try:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                v6.bind(("::1", self.port))
            except OSError as exc:
                v6.close()
                if exc.errno == errno.EADDRINUSE:
                    self.close()
                    continue
                return  # no IPv6 loopback here: nothing to refuse on
            self.sockets.append(v6)
            return
        raise OSError(errno.EADDRINUSE, "no free loopback port for refusing connections")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class Fence:
    """A policy and a DNS proxy, ready to run commands fenced. Use as a context manager."""

    def __init__(
        self,
        policy: Policy,
        *,
        upstream: str | None = None,
        mode: str = "block",
        outage: str = "nxdomain",
        timeout: float | None = None,
        label: str = "run",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(mode, f"mode must be one of {', '.join(MODES)}", "Fence(mode=)")
        if outage not in OUTAGES:
            raise ConfigError(
                outage, f"outage must be one of {', '.join(OUTAGES)}", "Fence(outage=)"
            )
        if timeout is not None and timeout <= 0:
            raise ConfigError(str(timeout), "timeout must be positive", "Fence(timeout=)")
        self.policy = policy
        self.upstream = parse_upstream(upstream or default_upstream())
        self.mode = mode
        self.outage = outage
        self.timeout = timeout
        self.label = label
        self.id = next(_fence_ids)
        self._programs: loader.Programs | None = None
        self._proxy: DnsProxy | None = None
        self._book: AddressBook | None = None
        self._refuser: _Refuser | None = None
        self._run_lock = threading.Lock()
        self._current: _Run | None = None
        #: Every result this fence returned, in order (the plugin reports them).
        self.results: list[FenceResult] = []

    # -- lifecycle ----------------------------------------------------------------
    def open(self) -> Fence:
        """Build the fence: load the programs, start the proxy, learn the blocked addresses."""
        if self._proxy is not None:
            return self
        self._programs = loader.load()
        _session_tree()
        try:
            self._book = AddressBook(self.id, self._programs)
            self._refuser = _Refuser()
            self._proxy = DnsProxy(
                upstream=self.upstream,
                decide=self._decide,
                observer=self._observe,
                review=self._review,
                outage=self.outage if self.outage in DNS_OUTAGES else "nxdomain",
            ).start()
            self._learn_rules()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._refuser is not None:
            self._refuser.close()
            self._refuser = None
        if self._book is not None:
            self._book.forget()
            self._book = None
        if self._programs is not None:
            self._programs.forget_names(self.id)

    def __enter__(self) -> Fence:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the fence knows of addresses ------------------------------------------
    @property
    def _verdict(self) -> str:
        """What a learned address of a name in the policy gets: blocked or allowed."""
        return "block" if self.policy.kind == "no_egress" else "allow"

    def _learn_rules(self) -> None:
        """Tell the kernel the rules: names (for DNS that skips the proxy), address rules,
        and (no_egress) the addresses the upstream gives the blocked names."""
        assert self._book is not None and self._programs is not None
        for rule in self.policy.rules:
            if rule.name is not None:
                self._programs.add_name(self.id, rule.name, rule.kind)
            if rule.network is not None:
                self._book.judge(rule.network, self._verdict)
            elif self.policy.kind == "no_egress" and rule.kind == "name" and rule.name:
                for address in resolve(rule.name, self.upstream, timeout=1.0).addresses:
                    self._book.learn(address, rule.name, FROM_UPSTREAM, "block")

    def _learn_hosts(self, path: str = "/etc/hosts") -> None:
        """The hosts file's addresses of names the policy names (blocked or allowed)."""
        assert self._book is not None
        for address, names in hosts_entries(path):
            if address.is_loopback:
                continue
            for name in names:
                if self.policy.check_name(name).blocked == (self.policy.kind == "no_egress"):
                    self._book.learn(address, name, FROM_HOSTS, self._verdict)
                else:
                    self._book.note(address, name, FROM_HOSTS)

    # -- DNS decisions and attribution (proxy threads) ------------------------------
    def _rule_text(self, decision: Decision) -> str:
        """The rule that decided, or (egress_only, nothing allowed it) the whole allowlist."""
        if decision.rule is not None:
            return self.policy.rule_text(decision.rule)
        sources = {rule.source for rule in self.policy.rules}
        if len(sources) == 1 and None not in sources:
            return f"{self.policy.describe()} [{sources.pop()}]"
        return self.policy.describe()

    def _denies(self, forbidden: bool) -> bool:
        """Whether a forbidden name gets the outage answer instead of resolving."""
        return forbidden and self.mode == "block" and self.outage in DNS_OUTAGES

    def _decide(self, name: str) -> _Verdict:
        decision = self.policy.check_name(name)
        rule = self._rule_text(decision) if decision.blocked else None
        return _Verdict(self._denies(decision.blocked), decision.blocked, rule)

    def _review(self, query: Query, reply: bytes) -> _Verdict | None:
        """Learn the answer's addresses before the client sees them; judge its CNAME chain."""
        assert self._book is not None
        try:
            answer = parse_answer(reply)
        except Exception:  # noqa: BLE001 - an answer dnslib cannot read passes unchanged
            return None
        for name in answer.names:
            decision = self.policy.check_name(name)
            if not decision.blocked:
                continue
            for address in answer.addresses:
                if self.policy.kind == "no_egress":
                    self._book.learn(address, name, FROM_DNS, "block")
                else:
                    self._book.note(address, name, FROM_DNS)  # refused: never allowed
            if name == answer.names[0]:
                return None  # the query's own name: `_decide` judged it already
            rule = f"{self._rule_text(decision)} via CNAME {name}"
            return _Verdict(self._denies(True), True, rule)
        # Every name of the chain is allowed.
        for address in answer.addresses:
            if self.policy.kind == "egress_only":
                self._book.learn(address, query.name, FROM_DNS, "allow")
            else:
                self._book.note(address, query.name, FROM_DNS)
        return None

    def _observe(self, query: Query, verdict: _Verdict) -> None:
        run = self._current
        if run is None:
            return
        assert self._programs is not None
        owner = self._programs.flow_owner(
            query.transport, query.listen_port, query.client[1], query.txid
        )
        if owner is None:
            who = Attribution(None, None, (), "no fenced socket sent this message")
        elif owner.cgroup_id != run.cgroup.id:
            who = Attribution(None, None, (), f"sent from another cgroup (id {owner.cgroup_id})")
        else:
            who = attribute(self._programs, owner.pid, run.cgroup.id, run.root_pid)
        event = EgressEvent(
            domain=query.name,
            address=None,
            port=53,
            protocol=query.transport,
            verdict="blocked" if verdict.blocked else "allowed",
            blocked_at="dns" if verdict.blocked else None,
            rule=verdict.rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            qtype=query.qtype,
            unattributed=who.unattributed,
            forbidden=verdict.forbidden,
            outage=self.outage if verdict.forbidden and self.mode == "block" else None,
        )
        run.add(time.monotonic_ns(), event)

    def _on_connection(self, run: _Run, conn: loader.ConnEvent) -> None:
        """A connection or datagram: refused, would-be refused (audit), or a first contact."""
        assert self._book is not None and self._programs is not None
        learned = self._book.names_of(conn.address)
        name = next((entry.name for entry in learned if entry.name), None)
        # Every way the address was learned: which one the process used is not known.
        origin = ", ".join(dict.fromkeys(entry.origin for entry in learned)) or None
        permitted = conn.action == "allowed"
        if permitted:
            rule = None
        elif self.policy.kind == "egress_only":
            rule = self._rule_text(Decision(blocked=True, rule=None))
        else:
            blocking = [
                e.name for e in learned if e.name and self.policy.check_name(e.name).blocked
            ]
            if blocking:
                name = blocking[0]
                rule = self._rule_text(self.policy.check_name(name))
            else:  # no blocked name owns it: an address rule refused it
                rule = self._rule_text(self.policy.check_address(conn.address))
                origin = FROM_RULE
        if conn.pid:
            who = attribute(self._programs, conn.pid, run.cgroup.id, run.root_pid)
        else:
            if not run.first_report(("ownerless", conn.address, conn.port, conn.protocol)):
                return
            who = Attribution(None, None, (), OWNERLESS)
        blocked = conn.action not in ("audited", "allowed")
        at: BlockedAt = (
            "packet" if conn.action == "blackhole" or conn.where == "packet" else "connect"
        )
        event = EgressEvent(
            domain=name,
            address=str(conn.address),
            port=conn.port,
            protocol=conn.protocol,
            verdict="blocked" if blocked else "allowed",
            blocked_at=at if blocked else None,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            unattributed=who.unattributed,
            forbidden=not permitted,
            outage=conn.action if blocked else None,
            learned_from=origin,
        )
        run.add(conn.time_ns, event)

    def _on_bypass(self, run: _Run, query: loader.BypassEvent) -> None:
        """A query for a forbidden name sent past the proxy, dropped in the kernel."""
        assert self._programs is not None
        key = (query.pid, query.name, query.address, query.port, query.protocol, query.txid)
        if not run.first_report(("bypass", *key)):
            return
        decision = self.policy.check_name(query.name)
        who = attribute(self._programs, query.pid, run.cgroup.id, run.root_pid)
        event = EgressEvent(
            domain=query.name,
            address=str(query.address),
            port=query.port,
            protocol=query.protocol,
            verdict="allowed" if query.audited else "blocked",
            blocked_at=None if query.audited else "packet",
            rule=self._rule_text(decision),
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            qtype=str(QTYPE.get(query.qtype, f"TYPE{query.qtype}")),
            unattributed=who.unattributed,
            forbidden=True,
            outage=None if query.audited else "dropped",
            learned_from=None,
        )
        run.add(query.time_ns, event)

    # -- running --------------------------------------------------------------------
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        input: str | bytes | None = None,
        check: bool = True,
        stdin: int | IO[Any] | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        on_event: Callable[[EgressEvent], None] | None = None,
    ) -> FenceResult:
        """Run `cmd` fenced (a str runs through /bin/sh -c) and return what happened.

        stdin is `input` when given, else the file or fd `stdin` when given (the CLI
        passes its own), else empty (never the test's terminal). After
        `timeout` seconds everything the command started is killed. With
        `check=True` a run with forbidden egress raises EgressViolation (in block
        mode; audit mode only records).
        `on_output("stdout"|"stderr", chunk)` and `on_event(event)` see output and
        events as they happen (from other threads), e.g. to stream them.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        self.open()
        assert self._programs is not None and self._proxy is not None
        assert self._refuser is not None
        if isinstance(cmd, str):
            argv, shown = ["/bin/sh", "-c", cmd], cmd
        else:
            argv, shown = [os.fspath(a) for a in cmd], shlex.join(os.fspath(a) for a in cmd)
        if not argv:
            raise ConfigError(repr(cmd), "the command is empty", "Fence.run()")
        search_path = (env or os.environ).get("PATH", os.defpath)
        if shutil.which(argv[0], path=search_path) is None and not os.path.isfile(
            os.path.join(os.fspath(cwd or "."), argv[0])
        ):
            raise FileNotFoundError(2, "command not found", argv[0])
        limit = timeout if timeout is not None else self.timeout
        data = input.encode() if isinstance(input, str) else input
        if data is not None and stdin is not None:
            raise ConfigError("input and stdin", "give one of them", "Fence.run()")

        started = time.monotonic()
        with self._run_lock:
            self._learn_hosts()
            run = _Run(FenceCgroup(_session_tree().session, self.label), on_event)
            links: list[int] = []
            timed_out = False
            proc: subprocess.Popen[bytes] | None = None
            out: list[bytes] = []
            err: list[bytes] = []
            pumps: list[threading.Thread] = []
            try:
                self._programs.register(
                    run.cgroup.id,
                    loader.KernelFence(
                        fence_id=self.id,
                        proxy_port=self._proxy.port,
                        refuser_port=self._refuser.port,
                        egress_only=self.policy.kind == "egress_only",
                        audit=self.mode == "audit",
                        outage=self.outage if self.outage in ("reset", "blackhole") else "refuse",
                    ),
                )
                self._programs.subscribe(
                    run.cgroup.id,
                    loader.Listener(
                        on_connection=lambda conn: self._on_connection(run, conn),
                        on_bypass=lambda query: self._on_bypass(run, query),
                        on_view_change=lambda pid: self._learn_hosts(f"/proc/{pid}/root/etc/hosts"),
                    ),
                )
                links = self._programs.attach(run.cgroup.dir_fd)
                self._current = run
                proc = subprocess.Popen(
                    [*_ENTER, str(run.cgroup.path / "cgroup.procs"), *argv],
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    stdin=subprocess.PIPE
                    if data is not None
                    else (stdin if stdin is not None else subprocess.DEVNULL),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                run.root_pid = proc.pid
                pumps = _pump(proc, data, out, err, on_output)
                try:
                    proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    timed_out = True
            finally:
                # Whatever the script left behind (daemons, background jobs) dies with it.
                run.cgroup.kill()
                if proc is not None:
                    proc.wait()
                for t in pumps:
                    t.join()
                self._proxy.drain()
                self._programs.consume_events()
                self._programs.unsubscribe(run.cgroup.id)
                self._current = None
                for fd in links:
                    os.close(fd)
                self._programs.unregister(run.cgroup.id)
                run.cgroup.close()
        self._proxy.raise_errors()
        if run.callback_error is not None:
            raise run.callback_error

        assert proc is not None
        result = FenceResult(
            command=shown,
            returncode=proc.returncode,
            stdout=b"".join(out).decode(errors="replace"),
            stderr=b"".join(err).decode(errors="replace"),
            timed_out=timed_out,
            events=run.in_order(),
            duration=time.monotonic() - started,
        )
        self.results.append(result)
        # Audit mode leaves the outcome to the caller's own assertions.
        if check and result.violations and self.mode == "block":
            raise EgressViolation(
                format_violations(
                    result.violations, shown, timed_out_after=limit if timed_out else None
                ),
                result.violations,
            )
        return result


def _pump(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    out: list[bytes],
    err: list[bytes],
    on_output: Callable[[str, bytes], None] | None,
) -> list[threading.Thread]:
    """Feed stdin and drain stdout/stderr in threads, so a full pipe never blocks the script."""

    def read(stream: IO[bytes] | None, sink: list[bytes], name: str) -> None:
        if stream is None:
            return
        with stream:
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                sink.append(chunk)
                if on_output is not None:
                    on_output(name, chunk)

    def write(stream: IO[bytes] | None) -> None:
        if stream is None or data is None:
            return
        try:
            with stream:
                stream.write(data)
        except BrokenPipeError:
            pass

    threads = [
        threading.Thread(target=read, args=(proc.stdout, out, "stdout"), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err, "stderr"), daemon=True),
        threading.Thread(target=write, args=(proc.stdin,), daemon=True),
    ]
    for t in threads:
        t.start()
    return threads
