"""The fence: run a command in its own cgroup, DNS through a policy proxy, and report.

`Fence` owns one DNS proxy for its lifetime; each `run()` gets a fresh cgroup
with the shared eBPF programs attached, and everything the run started is
killed and the cgroup removed before `run()` returns.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from . import loader
from .cgroup import CgroupTree, FenceCgroup
from .dnsproxy import DnsProxy, Query
from .errors import ConfigError, EgressViolation
from .events import EgressEvent, FenceResult, format_violations
from .policy import Decision, Policy
from .procinfo import Attribution, attribute

MODES = ("block", "audit")
OUTAGES = ("nxdomain", "servfail", "refused", "timeout")
RESOLV_CONF = "/etc/resolv.conf"

# The child moves itself into the fence cgroup, then becomes the command: nothing
# the command runs is ever outside. A shell rather than preexec_fn, because
# running Python in a forked child of a threaded process is not safe.
_ENTER = ("/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"')

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
    root_pid: int | None = None
    events: list[EgressEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        self._run_lock = threading.Lock()
        self._current: _Run | None = None

    # -- lifecycle ----------------------------------------------------------------
    def open(self) -> Fence:
        if self._proxy is not None:
            return self
        self._programs = loader.load()
        _session_tree()
        self._proxy = DnsProxy(
            upstream=self.upstream,
            decide=self._decide,
            observer=self._observe,
            outage=self.outage,
        ).start()
        return self

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None

    def __enter__(self) -> Fence:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- DNS decisions and attribution (proxy threads) ------------------------------
    def _decide(self, name: str) -> Decision:
        decision = self.policy.check_name(name)
        if self.mode == "audit" and decision.blocked:
            return Decision(blocked=False, rule=decision.rule)
        return decision

    def _observe(self, query: Query, decision: Decision) -> None:
        run = self._current
        if run is None:
            return
        assert self._programs is not None
        full = self.policy.check_name(query.name)
        owner = self._programs.flow_owner(
            query.transport, query.listen_port, query.client[1], query.txid
        )
        if owner is None:
            who = Attribution(None, None, (), "no fenced socket sent this message")
        elif owner.cgroup_id != run.cgroup.id:
            who = Attribution(None, None, (), f"sent from another cgroup (id {owner.cgroup_id})")
        else:
            who = attribute(self._programs, owner.pid, run.cgroup.id, run.root_pid)
        forbidden = full.blocked
        rule = None
        if forbidden:
            rule = (
                self.policy.rule_text(full.rule)
                if full.rule is not None
                else self.policy.describe()
            )
        event = EgressEvent(
            domain=query.name,
            address=None,
            port=53,
            protocol=query.transport,
            verdict="blocked" if decision.blocked else "allowed",
            blocked_at="dns" if forbidden else None,
            rule=rule,
            pid=who.pid,
            cmdline=who.cmdline,
            ancestry=who.ancestry,
            qtype=query.qtype,
            unattributed=who.unattributed,
            forbidden=forbidden,
        )
        with run.lock:
            run.events.append(event)

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
    ) -> FenceResult:
        """Run `cmd` fenced (a str runs through /bin/sh -c) and return what happened.

        stdin is `input` when given, else empty (never the test's terminal). With
        `check=True` a run with forbidden egress raises EgressViolation.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        self.open()
        assert self._programs is not None and self._proxy is not None
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

        with self._run_lock:
            run = _Run(FenceCgroup(_session_tree().session, self.label))
            links: list[int] = []
            timed_out = False
            proc: subprocess.Popen[bytes] | None = None
            out: list[bytes] = []
            err: list[bytes] = []
            pumps: list[threading.Thread] = []
            try:
                self._programs.register(run.cgroup.id, self.id, self._proxy.port)
                links = self._programs.attach(run.cgroup.dir_fd)
                self._current = run
                proc = subprocess.Popen(
                    [*_ENTER, str(run.cgroup.path / "cgroup.procs"), *argv],
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                run.root_pid = proc.pid
                pumps = _pump(proc, data, out, err)
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
                self._current = None
                for fd in links:
                    os.close(fd)
                self._programs.unregister(run.cgroup.id)
                run.cgroup.close()
        self._proxy.raise_errors()

        assert proc is not None
        result = FenceResult(
            command=shown,
            returncode=proc.returncode,
            stdout=b"".join(out).decode(errors="replace"),
            stderr=b"".join(err).decode(errors="replace"),
            timed_out=timed_out,
            events=tuple(run.events),
        )
        if check and result.violations:
            raise EgressViolation(format_violations(result.violations, shown), result.violations)
        return result


def _pump(
    proc: subprocess.Popen[bytes], data: bytes | None, out: list[bytes], err: list[bytes]
) -> list[threading.Thread]:
    """Feed stdin and drain stdout/stderr in threads, so a full pipe never blocks the script."""

    def read(stream: IO[bytes] | None, sink: list[bytes]) -> None:
        if stream is None:
            return
        with stream:
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                sink.append(chunk)

    def write(stream: IO[bytes] | None) -> None:
        if stream is None or data is None:
            return
        try:
            with stream:
                stream.write(data)
        except BrokenPipeError:
            pass

    threads = [
        threading.Thread(target=read, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err), daemon=True),
        threading.Thread(target=write, args=(proc.stdin,), daemon=True),
    ]
    for t in threads:
        t.start()
    return threads
