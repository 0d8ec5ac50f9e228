"""The fence: run commands in their own cgroup, DNS through a policy proxy, and report.

`Fence` owns, for its lifetime, one DNS proxy, one `Judge` (the policy and what
has been learned of addresses), a refuser port (with the "reset" outage only), and its
fenced services (`service()`: each in a cgroup of its own, for the fence's
life); each `run()` is a `Run` with a fresh cgroup, the shared eBPF programs
attached (to the adopted services' cgroups too, for the run's duration), the
command entering it as `confine` says (its own cgroup namespace, no
CAP_NET_RAW unless `raw_sockets=True`), and a `Teardown` that kills everything
the run started and removes the cgroup before `run()` returns, by its deadline
even when a process outside the cgroup holds the command's pipes. What the
services do outside any run is recorded by a `Run` of their own that never ends.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import IO, Any

from . import confine, kernel, options
from .addresses import AddressBook, HostsFile, read_hosts, read_own_hosts, resolve
from .adopt import Adopted
from .cgroup import CgroupTree, FenceCgroup, close_all
from .contract import check_name, program_of
from .dnsproxy import DnsProxy, parking
from .errors import CommandFailed, ConfigError, EgressViolation, LimitExceeded
from .events import EgressEvent, FenceResult
from .judge import Judge
from .limits import Limits, where_enforced
from .local import LocalPeers
from .output import Output
from .policy import Policy
from .ranges import Ranges
from .refuser import Refuser
from .render import failure_text, format_violations, limits_text
from .run import Member, ProxyJudge, Run, Teardown
from .service import READY_TIMEOUT, Service, ready_check

#: Seconds the command's own process may live on after its cgroup was killed (it can
#: only have left the cgroup) before it is killed by its pid: it is our child.
REAP_GRACE = 1.0

_fence_ids = itertools.count(1)
_tree_lock = threading.Lock()
_tree: CgroupTree | None = None


def _session_tree() -> CgroupTree:
    global _tree
    with _tree_lock:
        if _tree is None:
            tree = CgroupTree()
            tree.ensure()
            atexit.register(tree.remove)
            _tree = tree
        return _tree


def _load_programs_while(prepare: Callable[[], CgroupTree]) -> tuple[kernel.Programs, CgroupTree]:
    """`kernel.load()`, and `prepare()` meanwhile. The first load compiles: most of a
    second, in bcc's C code, which lets go of the GIL; the first `prepare()` makes the
    session's cgroup and starts its guardian (another process; ~0.1 s). A failed load is
    raised first: it was the first thing tried before they overlapped."""
    if kernel.loaded():
        return kernel.load(), prepare()
    with ThreadPoolExecutor(1, thread_name_prefix="depfence-load") as pool:
        loading = pool.submit(kernel.load)
        try:
            tree = prepare()
        finally:
            programs = loading.result()  # its failure, if any, over prepare()'s
    return programs, tree


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
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        raw_sockets: bool = False,
        services: Sequence[str | Adopted] = (),
        ranges: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Ranges] = (),
        label: str = "run",
    ) -> None:
        #: The policy, with every range of the `ranges` files as one of its address rules.
        self.policy = policy.with_rules(
            rule
            for read in options.validate("ranges", ranges, "Fence(ranges=)")
            for rule in read.rules
        )
        self.mode = options.validate("mode", mode, "Fence(mode=)")
        self.outage = options.validate("outage", outage, "Fence(outage=)")
        self.timeout = options.validate("timeout", timeout, "Fence(timeout=)")
        self.raw_sockets = options.validate("raw_sockets", raw_sockets, "Fence(raw_sockets=)")
        #: Enforced by the kernel on each run's cgroup and each service's (`limits.py`).
        self.limits = Limits(
            memory=options.validate("memory", memory, "Fence(memory=)"),
            cpus=options.validate("cpus", cpus, "Fence(cpus=)"),
            pids=options.validate("pids", pids, "Fence(pids=)"),
        )
        #: Running services adopted for each run (their cgroups; never killed).
        self.adopted: tuple[Adopted, ...] = options.validate(
            "services", list(services), "Fence(services=)"
        )
        for adopted in self.adopted:
            adopted.directory()  # a unit or path that is not there: said now
        self.upstream = options.parse_upstream(
            upstream or options.default_upstream(), "Fence(upstream=)"
        )
        self.label = label
        self.id = next(_fence_ids)
        self._programs: kernel.Programs | None = None
        self._tools: confine.Tools | None = None
        self._judge: Judge | None = None
        self._proxy: DnsProxy | None = None
        self._refuser: Refuser | None = None
        self._peers = LocalPeers()
        self._run_lock = threading.Lock()
        self._current: Run | None = None
        #: Records what services do outside any run (a `Run` that never finishes).
        self._outside_runs: Run | None = None
        #: Every result this fence returned, in order (the plugin reports them).
        self.results: list[FenceResult] = []
        #: Every service started, running or stopped, in order.
        self.services: list[Service] = []
        self._service_members: dict[str, Member] = {}
        #: The proxy's dropped queries counted so far (`_count_dropped`).
        self._dropped = 0

    # -- lifecycle ----------------------------------------------------------------
    def open(self) -> Fence:
        """Build the fence: load the programs, start the proxy, learn the blocked addresses."""
        if self._proxy is not None:
            return self
        programs, tree = _load_programs_while(self._prepare_machine)
        self._programs = programs
        where_enforced(tree.mount, self.limits)  # a limit the machine cannot enforce: said now
        try:
            judge = Judge(self.policy, self.mode, self.outage, AddressBook(self.id, programs))
            self._judge = judge
            if judge.outage.kernel == "reset":  # where a refused connect is sent
                self._refuser = Refuser()
            self._outside_runs = Run(programs, judge, self._peers)
            self._proxy = parking.take(self.upstream, ProxyJudge(judge, self._recorder))
            self._learn_rules(programs, judge)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare_machine(self) -> CgroupTree:
        self._tools = confine.prepare()
        tree = _session_tree()
        tree.sweep()  # every open: sweep dead owners' sessions, keep the guardian
        return tree

    def _learn_rules(self, programs: kernel.Programs, judge: Judge) -> None:
        """Tell the kernel the rules: names (for DNS that skips the proxy), address rules,
        and (no_egress) the addresses the upstream gives the blocked names."""
        for name, kind in self._name_rules():
            programs.add_name(self.id, name, kind)
        judge.learn_rules()
        for name in judge.names_to_preresolve():
            judge.learn_upstream(name, resolve(name, self.upstream, timeout=1.0).addresses)

    def _name_rules(self) -> list[tuple[str, str]]:
        """(name, kind) of each name rule: what the kernel judges DNS past the proxy by."""
        return [(rule.name, rule.kind) for rule in self.policy.rules if rule.name is not None]

    def close(self) -> None:
        with Teardown() as teardown:
            if self._programs is not None:
                names = [name for name, _ in self._name_rules()]
                teardown.push(partial(self._programs.forget_names, self.id, names))
            if self._judge is not None:
                teardown.push(self._judge.book.forget)
            if self._refuser is not None:
                teardown.push(self._refuser.close)
            if self._proxy is not None:
                # Kept for the next fence in this namespace, but not after adopting a
                # service: it lives on, and a socket it connected during a run stays
                # connected to this port, where no other fence's proxy may listen.
                proxy = self._proxy
                teardown.push(proxy.stop if self.adopted else partial(parking.park, proxy))
            teardown.push(self.stop_services)  # first: they may use the proxy to the end
            self._proxy, self._refuser, self._judge = None, None, None

    def _recorder(self) -> Run:
        """Where events of the fence's services go: the current run, else the one that
        records what they do outside runs."""
        run = self._current or self._outside_runs
        assert run is not None, "the fence is not open"
        return run

    def __enter__(self) -> Fence:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

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

        stdin is `input`, else the file or fd `stdin` (the CLI passes its own), else
        empty. After `timeout` seconds everything the command started is killed.
        `check=True`: forbidden egress raises EgressViolation (block mode only), a failed
        command (non-zero exit, a signal, the timeout) CommandFailed.
        `on_output("stdout"|"stderr", chunk)` (in this thread, while run() waits) and
        `on_event(event)` (a thread of its own, in order) see output and events as they
        happen.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        self.open()
        argv, shown = confine.command(cmd, cwd, env)
        limit = self.timeout
        if timeout is not None:
            limit = options.validate("timeout", timeout, "Fence.run(timeout=)")
        data = input.encode() if isinstance(input, str) else input
        if data is not None and stdin is not None:
            raise ConfigError("input and stdin", "give one of them", "Fence.run()")
        started = time.monotonic()
        with self._run_lock:
            assert self._programs is not None and self._judge is not None
            run = Run(self._programs, self._judge, self._peers, on_event=on_event)
            with Teardown() as teardown:
                teardown.push(run.finish_delivery)
                proc, cgroup = self._start(
                    run, teardown, argv, cwd, env, subprocess.PIPE if data is not None else stdin
                )
                output = Output(proc, data, on_output)
                teardown.push(output.finish)
                teardown.push(partial(_reap, proc))
                # Whatever the script left behind (daemons, background jobs) dies with it;
                # then what it all used is read, the OOM killer's victims named while the
                # kernel still has their records.
                teardown.push(lambda: cgroup.finish(lambda pid: run.who(pid, cgroup.id).cmdline))
                timed_out = output.wait(proc, limit)
        assert self._proxy is not None
        self._proxy.raise_errors()
        run.raise_errors()
        result = FenceResult(
            shown,
            proc.returncode,
            *output.text(),
            timed_out,
            run.finish(after=self._outside_runs),
            time.monotonic() - started,
            cgroup.usage,
        )
        self.results.append(result)
        if check:
            _check(result, self.mode, limit)
        return result

    def _start(
        self,
        run: Run,
        teardown: Teardown,
        argv: list[str],
        cwd: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        stdin: int | IO[Any] | None,
    ) -> tuple[subprocess.Popen[bytes], FenceCgroup]:
        """A cgroup for the command with the programs on it, and the command started in it;
        each step's undo pushed on `teardown` (they run in reverse: rmdir last)."""
        programs, judge, proxy = self._programs, self._judge, self._proxy
        assert programs is not None and judge is not None and proxy is not None
        assert self._tools is not None
        listener = kernel.Listener(
            run.on_connection, run.on_bypass, self._view_changed, run.on_escape, run.on_unix
        )
        cgroup, member = self._fence_cgroup(teardown, self.label, "command", listener)
        run.add_member(member)
        for service in list(self._service_members.values()):
            run.add_member(service)
        for adopted in self.adopted:
            self._adopt(run, teardown, adopted, listener)
        if self._service_members:
            # What the services did since the last run is on the outside record, counted;
            # their next contacts are reported to this run.
            assert self._outside_runs is not None
            self._outside_runs.count_contacts(
                {member.cgroup_id for member in self._service_members.values()}
            )
        if self.services or self.adopted:  # between runs, only a service asks the proxy
            assert self._outside_runs is not None
            self._count_dropped(self._outside_runs)  # since the last run: its services'
        self._current = run
        teardown.push(partial(self._count_dropped, run))
        teardown.push(run.count_lost)
        teardown.push(run.count_contacts)
        teardown.push(lambda: setattr(self, "_current", None))
        teardown.push(programs.consume_events)
        teardown.push(proxy.drain)
        proc = self._spawn(cgroup, argv, cwd, env, stdin)
        member.root_pid = proc.pid
        return proc, cgroup

    def _count_dropped(self, run: Run) -> None:
        """A violation for `run` if the kernel dropped queries to the proxy since the last
        count (`Judge.dropped_queries`): after the proxy drained, every query it did not
        read was one of them."""
        assert self._proxy is not None and self._judge is not None
        dropped = self._proxy.dropped()
        if dropped > self._dropped:
            run.add(time.monotonic_ns(), self._judge.dropped_queries(dropped - self._dropped))
        self._dropped = max(dropped, self._dropped)

    def _fence_cgroup(
        self, teardown: Teardown, label: str, name: str, listener: kernel.Listener
    ) -> tuple[FenceCgroup, Member]:
        """A new cgroup of the session, inside the fence: it has the programs the session
        directory has, whose links the guardian holds (should this process die, the
        cgroup is killed before they go)."""
        tree = _session_tree()
        assert self._programs is not None
        tree.enclose(self._programs.attach)
        cgroup = FenceCgroup(tree.session, label, self.limits)
        teardown.push(cgroup.close)
        member = Member(name, cgroup.id, cgroup.path, tree.v2_path(cgroup.path))
        self._enclose(teardown, cgroup.id, cgroup.dir_fd, listener)
        return cgroup, member

    def _spawn(
        self,
        cgroup: FenceCgroup,
        argv: list[str],
        cwd: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        stdin: int | IO[Any] | None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in `cgroup`, as `confine.spawn` does; output to pipes."""
        assert self._tools is not None
        guardian = _session_tree().guardian_pid()
        return confine.spawn(
            self._tools, cgroup.procs, argv, cwd=cwd, env=env, stdin=stdin,
            raw_sockets=self.raw_sockets, guardian=guardian,
        )  # fmt: skip

    def _enclose(
        self,
        teardown: Teardown,
        cgroup_id: int,
        dir_fd: int,
        listener: kernel.Listener,
        *,
        adopted: bool = False,
    ) -> None:
        """Put a cgroup inside the fence: registered, its events to `listener`, and (an
        adopted service's, outside the session) the programs attached; undone by
        `teardown`."""
        programs, judge, proxy, refuser = self._programs, self._judge, self._proxy, self._refuser
        assert programs is not None and judge is not None
        assert proxy is not None
        config = kernel.KernelFence(
            fence_id=self.id,
            proxy_port=proxy.port,
            refuser_port=refuser.port if refuser is not None else 0,  # 0: not "reset"
            egress_only=self.policy.kind == "egress_only",
            audit=self.mode == "audit",
            outage=judge.outage.kernel,
            adopted=adopted,
            raw_sockets=self.raw_sockets,
        )
        programs.register(cgroup_id, config, dir_fd)
        teardown.push(lambda: programs.unregister(cgroup_id))
        if adopted:
            links = programs.attach(dir_fd)
            teardown.push(lambda: close_all(links))
        else:  # what its processes see as /etc/hosts: this thread's
            self._learn_hosts(cgroup_id, read_own_hosts())
        programs.subscribe(cgroup_id, listener)
        teardown.push(lambda: programs.unsubscribe(cgroup_id))

    def _adopt(
        self, run: Run, teardown: Teardown, adopted: Adopted, listener: kernel.Listener
    ) -> None:
        """An adopted service's cgroup, fenced for this run: judged and named, never killed
        (its links are not given to the guardian: if this process dies, they just go)."""
        directory = adopted.directory()
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        teardown.push(partial(os.close, fd))
        adopted.take_turn(fd)
        cgroup_id = os.fstat(fd).st_ino
        path = _session_tree().v2_path(directory)
        run.add_member(Member(adopted.name, cgroup_id, directory, path, service=True))
        self._enclose(teardown, cgroup_id, fd, listener, adopted=True)

    # -- services ---------------------------------------------------------------------
    def service(
        self,
        cmd: str | Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready: int | str | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> Service:
        """Start `cmd` fenced, in a cgroup of its own, for the rest of the fence's life (or
        until `Service.stop()`); see `service.py`. `ready`: wait until it accepts
        connections there (a port of 127.0.0.1, HOST:PORT, unix:PATH)."""
        self.open()
        argv, shown = confine.command(cmd, cwd, env)
        if name is None:  # the program's name: `python3 tools/migrations-service` -> its script
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", program_of(shown).split()[-1]).strip("-.")
        name = check_name(name or "service", "Fence.service(name=)")
        if name in self._service_members:
            raise ConfigError(name, "a service of this name is running already", "Fence.service()")
        check = ready_check(ready, "Fence.service(ready=)") if ready is not None else None
        # A service's events go to the run in progress, else to the record of what the
        # services do outside runs.
        recorder = self._recorder
        listener = kernel.Listener(
            lambda e: recorder().on_connection(e),
            lambda e: recorder().on_bypass(e),
            self._view_changed,
            lambda e: recorder().on_escape(e),
            lambda e: recorder().on_unix(e),
        )
        teardown = Teardown()
        try:
            cgroup, member = self._fence_cgroup(teardown, f"{self.label}.{name}", name, listener)
            member.service = True
            for run in (self._outside_runs, self._current):
                if run is not None:
                    run.add_member(member)
            self._service_members[name] = member
            teardown.push(lambda: self._service_members.pop(name, None))
            proc = self._spawn(cgroup, argv, cwd, env, None)
            member.root_pid = proc.pid
            output = Output(proc, None, None).background()
            assert self._programs is not None and self._outside_runs is not None
            teardown.push(self._outside_runs.count_lost)
            teardown.push(partial(self._outside_runs.count_contacts, {cgroup.id}))
            teardown.push(self._programs.consume_events)  # what it did last, recorded
            teardown.push(output.finish)
            teardown.push(partial(_reap, proc))
            teardown.push(cgroup.kill)
        except BaseException:
            teardown.close()
            raise
        assert self._outside_runs is not None
        service = Service(
            name, shown, proc, output, member, teardown, self._outside_runs, self.results.append
        )
        self.services.append(service)
        if check is not None:
            service.wait_ready(check, ready_timeout, self._peers)
        return service

    def stop_services(self) -> None:
        """Stop every service the fence started (each records what it did outside runs)."""
        with Teardown() as teardown:
            for service in self.services:
                teardown.push(service.stop)

    def _view_changed(self, cgroup_id: int, pid: int, fd: int) -> None:
        """A fenced process changed its mounts, or wrote or made a hosts file (and waits,
        stopped): learn the hosts file it now sees, and the file at its descriptor `fd`."""
        mountinfo = f"/proc/{pid}/mountinfo"
        self._learn_hosts_file(cgroup_id, f"/proc/{pid}/root/etc/hosts", mountinfo)
        if fd >= 0:
            self._learn_hosts_file(cgroup_id, f"/proc/{pid}/fd/{fd}", mountinfo)

    def _learn_hosts_file(self, cgroup_id: int, path: str, mountinfo: str) -> None:
        self._learn_hosts(cgroup_id, read_hosts(path, mountinfo))

    def _learn_hosts(self, cgroup_id: int, read: HostsFile) -> None:
        """Learn a hosts file's addresses; then a fenced process that writes into it is
        paused until it has been read again (bpf/hostsfile.c)."""
        judge, programs = self._judge, self._programs
        if judge is None or programs is None:
            return
        judge.learn_hosts(read.entries)
        if read.key is not None:
            programs.watch_hosts_file(cgroup_id, *read.key)


def _check(result: FenceResult, mode: str, limit: float | None) -> None:
    """`check=True`: forbidden egress raises EgressViolation (block mode; audit mode leaves
    it to the caller), a limit the run hit LimitExceeded (even when the command exited 0:
    a process of it was killed, or a fork refused), and a command that failed
    CommandFailed, as `subprocess.run(check=True)` would."""
    __tracebackhide__ = True
    timed_out_after = limit if result.timed_out else None
    failed = result.returncode != 0 or result.timed_out
    if result.violations and mode == "block":
        text = format_violations(result.violations, result.command, timed_out_after=timed_out_after)
        if result.usage.hit:
            text += f"\n(and {limits_text(result.usage)})"
        elif failed and not result.timed_out:
            text += f"\n(and {failure_text(result.command, result.returncode, '', None)})"
        raise EgressViolation(text, result.violations)
    if result.usage.hit:
        text = f"{result.command}: {limits_text(result.usage)}"
        if failed:
            text += "\n" + failure_text(
                result.command, result.returncode, result.stderr, timed_out_after
            )
        raise LimitExceeded(text, result.returncode, result.stdout, result.stderr)
    if failed:
        text = failure_text(result.command, result.returncode, result.stderr, timed_out_after)
        raise CommandFailed(text, result.returncode, result.stdout, result.stderr)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the command once its cgroup was killed; if it outlives that, it left the
    cgroup: kill it by its pid (our child, so the pid cannot have been reused)."""
    try:
        proc.wait(timeout=REAP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
