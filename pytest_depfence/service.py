"""Fenced services: long-running processes a test starts inside its fence.

`Fence.service(cmd, name=..., ready=...)` starts a process in a cgroup of its
own (named after it, registered with the fence like a run's cgroup), where it
stays for the rest of the fence's life or until `Service.stop()`. The policy
applies to it: its egress during a run is part of that run's result, named
`in service NAME` with the run's process that called it (`run.py`); its
egress outside any run (start-up, between runs) is in `Service.events`, and
the plugin fails the test at teardown when one of those is forbidden.

`ready=` waits until the service accepts connections: a TCP port on
127.0.0.1 (`8080`), `HOST:PORT` (`[V6]:PORT`), or `unix:PATH`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from .cgroup import pids_of
from .errors import ConfigError, ServiceNotReady
from .events import EgressEvent, FenceResult
from .local import LocalPeers
from .output import Output
from .render import failure_text
from .run import Member, Run, Teardown

#: Seconds `ready=` waits for a service by default.
READY_TIMEOUT = 10.0
#: Seconds between two connection attempts while waiting for `ready=`.
READY_POLL = 0.02
#: The command of a service's result: what it did outside any run (`Fence.results`).
SERVICE_RESULT = "service {name} (outside any run): {command}"


@dataclass(frozen=True)
class ReadyCheck:
    """Where a service accepts connections once it is ready."""

    family: int
    address: str | tuple[str, int]

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def accepts(self) -> bool:
        with socket.socket(self.family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.address)
            except OSError:
                return False
            return True


def ready_check(ready: int | str, where: str) -> ReadyCheck:
    """`ready=`: a port of 127.0.0.1, HOST:PORT, [V6]:PORT, or unix:PATH."""
    if isinstance(ready, int) and not isinstance(ready, bool):
        host, port = "127.0.0.1", str(ready)
    elif isinstance(ready, str) and ready.startswith("unix:") and len(ready) > 5:
        return ReadyCheck(socket.AF_UNIX, ready[5:])
    elif isinstance(ready, str) and ":" in ready:
        host, _, port = ready.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    else:
        raise ConfigError(repr(ready), "ready= is a port, HOST:PORT or unix:PATH", where)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(repr(ready), f"port {port!r} is not in 1..65535", where)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return ReadyCheck(family, (host, int(port)))


class Service:
    """A process fenced for the rest of the test (see the module docstring).

    `teardown` undoes its start (kills its cgroup, detaches the programs);
    `recorder` is the fence's record of what its services do outside runs, and
    `on_result` takes what this one did there once it is stopped.
    """

    def __init__(
        self,
        name: str,
        command: str,
        proc: subprocess.Popen[bytes],
        output: Output,
        member: Member,
        teardown: Teardown,
        recorder: Run,
        on_result: Callable[[FenceResult], None],
    ) -> None:
        self.name = name
        self.command = command
        self.pid = proc.pid
        self._proc = proc
        self._output = output
        self._member = member
        self._teardown = teardown
        self._recorder = recorder
        self._on_result = on_result
        self._started = time.monotonic()
        self.stopped = False
        #: Once stopped: what it did outside any run, as a result (None: nothing), also
        #: in `Fence.results`, so reports and contracts have it.
        self.result: FenceResult | None = None

    @property
    def events(self) -> list[EgressEvent]:
        """What the service did outside any run (start-up, between runs), in order."""
        if self.result is not None:
            return list(self.result.events)
        return list(self._recorder.in_order(self._member.cgroup_id))

    @property
    def violations(self) -> list[EgressEvent]:
        return [e for e in self.events if e.is_violation]

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def output(self) -> tuple[str, str]:
        """What it wrote so far to stdout and stderr."""
        return self._output.text()

    def stop(self) -> None:
        """Kill the service and everything it started, and forget its cgroup. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self._teardown.close()
        finally:  # what it did outside any run is reported like a run's result
            events = self._recorder.in_order(self._member.cgroup_id)
            self._recorder.remove_member(self._member.cgroup_id)
            if events:
                out, err = self._output.text()
                code = self._proc.returncode
                self.result = FenceResult(
                    SERVICE_RESULT.format(name=self.name, command=self.command),
                    code if code is not None else -9,
                    out,
                    err,
                    events=events,
                    duration=time.monotonic() - self._started,
                )
                self._on_result(self.result)

    def wait_ready(self, check: ReadyCheck, timeout: float, peers: LocalPeers) -> None:
        """Return once the service itself accepts connections at `check` (not something
        else listening there); ServiceNotReady when it exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        stranger = None
        while True:
            if check.accepts():
                stranger = self._stranger(check, peers)
                if stranger is None:
                    return
            if self._proc.poll() is not None:
                self._not_ready(check, f"it exited first ({self._exit()})", stranger)
            if time.monotonic() >= deadline:
                self._not_ready(check, f"not within {timeout:g} s", stranger)
            time.sleep(READY_POLL)  # polling a port with a deadline: nothing to wait on

    def _stranger(self, check: ReadyCheck, peers: LocalPeers) -> str | None:
        """Who else accepts at `check`, when that is not a process of this service."""
        if isinstance(check.address, str):
            found = peers.listener("unix", check.address, candidates=pids_of(self._member.dir))
        else:
            host, port = check.address
            found = peers.listener("tcp", host, port, candidates=pids_of(self._member.dir))
        if found is None or self._member.holds(found.cgroup):
            return None
        return found.describe()

    def _exit(self) -> str:
        return failure_text(self.command, self._proc.returncode or 0, "", None)

    def _not_ready(self, check: ReadyCheck, why: str, stranger: str | None) -> None:
        stderr = self.output()[1].rstrip("\n").splitlines()[-10:]
        tail = "".join(f"\n  {line}" for line in stderr)
        if stranger is not None:
            why += f"; another process listens there: {stranger}"
        self.stop()
        raise ServiceNotReady(
            f"service {self.name} did not accept connections on {check}: {why}"
            + (f"\nits stderr (last {len(stderr)} lines):{tail}" if stderr else "")
        )

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"Service(name={self.name!r}, pid={self.pid}, {state}, command={self.command!r})"
