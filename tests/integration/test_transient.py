"""Transient dependencies: the services a fenced script calls are on record, and can be fenced.

Real services (examples/tools/migrations-service, examples/tools/forward-proxy,
a unix-socket daemon) in the lab, called by real clients (curl) from a fence:
- outside the fence, the contact names the listener (pid, command line, cgroup);
  under egress_only it is a violation unless allowed (`local:PORT`, `unix:PATH`);
- started with `fence.service(...)`, the service's own egress is judged and named
  with the call chain (script -> curl -> service -> github.com);
- adopted for a run (`Fence(services=[cgroup])`), its egress is judged during the
  run, and only then.
Services are synchronised on their "listening on" line, never by sleeping.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_depfence import EgressViolation, Fence, FenceResult, Policy, ServiceNotReady
from pytest_depfence.cgroup import cgroup2_mount, kill_all
from pytest_depfence.run import NO_LISTENER

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
if not shutil.which("curl"):
    pytest.skip("these tests need curl", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "examples" / "tools" / "migrations-service"
PROXY = ROOT / "examples" / "tools" / "forward-proxy"
TRANSIENT = ROOT / "examples" / "deploy" / "transient.sh"
LISTENING = re.compile(rb"listening on (\S+)")


def _listening(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """The address a service prints once it accepts connections (with a deadline)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        found = LISTENING.search(seen)
        if found:
            return found.group(1).decode()
    raise AssertionError(f"the service did not say where it listens: {seen!r}")


@pytest.fixture
def outside(lab: Lab) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    """Start a service outside any fence; it is stopped by its pid at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: object, cgroup: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
        def enter() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.Popen(
            [sys.executable, *map(str, argv)], stdout=subprocess.PIPE, preexec_fn=enter
        )
        started.append(proc)
        return proc, _listening(proc)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _local_events(result, protocol: str | None = None) -> list:  # noqa: ANN001
    return [e for e in result.events if e.is_local and protocol in (None, e.protocol)]


# --------------------------------------------------------------------------- outside the fence


def test_forward_proxy_outside_the_fence_is_named(fences, outside) -> None:
    proxy, address = outside(PROXY, "--listen", "127.0.0.1:0")
    port = int(address.rsplit(":", 1)[1])
    fence = fences(Policy.no_egress("github.com"))
    result = fence.run(["curl", "-sS", "-m", "10", "-x", f"http://{address}", "http://github.com/"])
    assert result.returncode == 0, result.stderr
    [contact] = _local_events(result, "tcp")
    assert (contact.address, contact.port, contact.verdict) == ("127.0.0.1", port, "allowed")
    assert not contact.forbidden, "no_egress puts a local contact on record, it does not forbid it"
    assert contact.listener is not None and f"pid {proxy.pid} " in contact.listener
    assert "forward-proxy" in contact.listener
    assert contact.cmdline is not None and contact.cmdline.startswith("curl ")


def test_forward_proxy_outside_is_a_violation_under_egress_only(fences, outside) -> None:
    _, address = outside(PROXY, "--listen", "127.0.0.1:0")
    port = int(address.rsplit(":", 1)[1])
    fence = fences(Policy.egress_only("mirror.internal"))
    with pytest.raises(EgressViolation) as caught:
        fence.run(["curl", "-sS", "-m", "10", "-x", f"http://{address}", "http://github.com/"])
    text = str(caught.value)
    assert f"127.0.0.1:{port}/tcp" in text
    assert f'allow "local:{port}"' in text
    # Allowed explicitly: on record, not a violation.
    allowed = fences(Policy.egress_only("mirror.internal", f"local:{port}"))
    result = allowed.run(["curl", "-sS", "-m", "10", "-x", f"http://{address}", "http://x/"])
    [contact] = _local_events(result, "tcp")
    assert not contact.forbidden


def test_unix_socket_daemon_outside_the_fence_is_named(fences, outside, tmp_path) -> None:
    sock = tmp_path / "daemon.sock"
    daemon, _ = outside(MIGRATIONS, "--unix", sock)
    fence = fences(Policy.no_egress("github.com"))
    result = fence.run(
        ["curl", "-sS", "-m", "10", "--unix-socket", str(sock), "-X", "POST", "http://d/migrate"]
    )
    assert result.returncode == 0, result.stderr
    [contact] = _local_events(result, "unix")
    assert contact.address == str(sock) and contact.port is None
    assert contact.listener is not None and f"pid {daemon.pid} " in contact.listener
    assert "migrations-service" in contact.listener
    assert contact.cmdline is not None and "--unix-socket" in contact.cmdline
    # The daemon fetched github.com from outside the fence: no event can show that.
    assert not [e for e in result.events if e.domain == "github.com"]
    # egress_only: a violation naming the socket and how to allow it.
    strict = fences(Policy.egress_only())
    with pytest.raises(EgressViolation, match=re.escape(f'allow "unix:{sock}"')):
        strict.run(["curl", "-sS", "-m", "10", "--unix-socket", str(sock), "http://d/migrate"])


#: Connects to the unix socket argv[1] argv[2] times, closing each connection at once.
UNIX_CONNECTS = """\
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.close()
"""


def test_a_loop_of_unix_connects_is_one_contact_and_loses_nothing(fences, tmp_path) -> None:
    """20,000 connects in a tight loop, faster than userspace can take an event each: one
    event reaches userspace (the kernel reports a process's first connect to a path per
    run), so the ring buffer never fills and the run is vouched for."""
    sock = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(512)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            server.accept()[0].close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        fence = fences(Policy.no_egress("github.com"))
        result = fence.run([sys.executable, "-c", UNIX_CONNECTS, str(sock), "20000"], check=False)
    finally:
        stop.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
            waker.connect(str(sock))  # wakes accept()
        acceptor.join(10)
        server.close()
    assert result.returncode == 0 and not result.violations, result.events
    assert [e.address for e in _local_events(result, "unix")] == [str(sock)]


# Sends argv[2] datagrams to the unix socket argv[1] with sendto() and one to argv[3] with
# sendmsg(), never connecting: each path is one contact of this process. (Fewer than
# net.unix.max_dgram_qlen, 10 by default: the receiver reads them afterwards.)
DATAGRAMS = """\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"line %d" % i, sys.argv[1])
s.sendmsg([b"notify"], [], 0, sys.argv[3])
"""


def test_unix_datagrams_sent_without_connect_are_on_record(fences, tmp_path) -> None:
    log, notify = tmp_path / "log.sock", tmp_path / "notify.sock"
    receivers = []
    for path in (log, notify):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(path))
        receivers.append(receiver)
    try:
        argv = [sys.executable, "-c", DATAGRAMS, str(log), "8", str(notify)]
        result = fences(Policy.no_egress("github.com")).run(argv)
        contacts = {e.address: e for e in _local_events(result, "unix")}
        assert sorted(contacts) == sorted([str(log), str(notify)]), result.events
        for contact in contacts.values():
            assert contact.listener is not None and f"pid {os.getpid()} " in contact.listener
            assert contact.cmdline is not None and contact.cmdline.startswith(sys.executable)
        assert len(_local_events(result)) == 2  # 9 datagrams, one record per path
        assert sum(1 for _ in iter(lambda: _receive(receivers[0]), None)) == 8

        strict = fences(Policy.egress_only())
        with pytest.raises(EgressViolation, match=re.escape(f'allow "unix:{log}"')):
            strict.run(argv)
    finally:
        for receiver in receivers:
            receiver.close()


#: One datagram to the unix path $1, without connect(); prints the sender's pid.
ONE_DATAGRAM = (
    "import os, socket, sys; print(os.getpid());"
    "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', sys.argv[1])"
)


def test_a_pid_a_later_run_reuses_is_a_new_sender(fences, tmp_path) -> None:
    """The kernel reports each process's first datagram to a path once (map `unix_reached`);
    a later run's process that gets the same pid (pids wrap: 32,768 of them by default)
    must be on record all the same. Before the fence's cgroup was in that map's key, it
    was not, and a run that reached a service only that way went green."""
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    fence = fences(Policy.no_egress("github.com"))
    argv = [sys.executable, "-c", ONE_DATAGRAM, str(path)]
    try:
        first = fence.run(argv)
        pid = int(first.stdout)
        assert [e.address for e in _local_events(first, "unix")] == [str(path)], first.events
        for _ in range(50):  # the next pid the kernel hands out: the next fork's, mostly
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            again = fence.run(argv)
            if int(again.stdout) == pid:
                break
        else:
            pytest.fail(f"no fenced run got pid {pid} again in 50 tries")
        assert [e.address for e in _local_events(again, "unix")] == [str(path)], again.events
    finally:
        receiver.close()


def _receive(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def test_nothing_listening_is_no_contact(fences, tmp_path) -> None:
    fence = fences(Policy.egress_only())
    result = fence.run(
        ["curl", "-sS", "-m", "5", "--unix-socket", str(tmp_path / "none.sock"), "http://d/"],
        check=False,
    )
    assert result.returncode != 0
    assert not _local_events(result), result.events


# --------------------------------------------------------------------------- fenced services


def _migrations(fence: Fence, *extra: str):  # noqa: ANN202
    return fence.service(
        [sys.executable, str(MIGRATIONS), "--listen", "127.0.0.1:18080", *extra],
        name="migrations",
        ready=18080,
    )


def test_fenced_service_violation_names_the_chain(fences, tmp_path) -> None:
    fence = fences(Policy.no_egress("github.com"))
    service = _migrations(fence)
    env = {**os.environ, "MIGRATIONS_URL": "http://127.0.0.1:18080"}
    with pytest.raises(EgressViolation) as caught:
        fence.run([str(TRANSIENT)], env=env)
    github, *_ = [v for v in caught.value.violations if v.domain == "github.com"]
    assert github.service == "migrations"
    assert github.cmdline is not None and "migrations-service" in github.cmdline
    caller_pid, caller = github.called_by[0]
    assert caller.startswith("curl ") and "/migrate" in caller
    assert any("transient.sh" in cmd for _, cmd in github.called_by[1:])
    text = str(caught.value)
    assert "in service migrations" in text
    assert f"called by pid {caller_pid} curl" in text
    assert service.events == [], "nothing happened outside the run"
    # check=False: the same, as a result.
    result = fence.run([str(TRANSIENT)], env=env, check=False)
    assert result.returncode != 0  # the service answered 502: its fetch was blocked
    assert {v.service for v in result.violations if v.domain == "github.com"} == {"migrations"}


def test_fenced_service_violating_at_start_up(fences) -> None:
    fence = fences(Policy.no_egress("github.com"))
    service = fence.service(
        [sys.executable, str(MIGRATIONS), "--listen", "127.0.0.1:18081", "--fetch-at-start"],
        name="starts-with-github",
    )
    service_exit = _wait_exit(service)
    assert service_exit == 1  # it could not start without GitHub
    violation, *_ = [v for v in service.violations if v.domain == "github.com"]
    assert violation.service == "starts-with-github" and violation.called_by == ()


def _wait_exit(service, timeout: float = 20.0) -> int:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while service.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.returncode is not None, "the service did not exit"
    return service.returncode


def test_service_not_ready_is_a_clear_error(fences) -> None:
    fence = fences(Policy.no_egress("github.com"))
    with pytest.raises(ServiceNotReady, match="service never did not accept connections on"):
        fence.service(["sh", "-c", "echo starting >&2; exit 3"], name="never", ready=18082)


def test_egress_only_with_the_service_fenced_judges_its_own_egress(fences) -> None:
    fence = fences(Policy.egress_only())
    fence.service(
        [sys.executable, str(MIGRATIONS), "--listen", "127.0.0.1:18083"],
        name="migrations",
        ready=18083,
    )
    result = fence.run(
        ["curl", "-sS", "-m", "10", "-X", "POST", "http://127.0.0.1:18083/migrate"], check=False
    )
    contacts = _local_events(result, "tcp")
    assert contacts and not any(c.forbidden for c in contacts), contacts
    assert contacts[0].listener is not None and contacts[0].listener.startswith(
        "service migrations:"
    )
    github = [v for v in result.violations if v.domain == "github.com"]
    assert github and github[0].service == "migrations"


# --------------------------------------------------------------------------- adopted cgroups


@pytest.fixture
def service_cgroup(lab: Lab) -> Iterator[Path]:
    path = cgroup2_mount() / f"depfence-test-adopted-{os.getpid()}"
    path.mkdir()
    yield path
    kill_all(path)
    path.rmdir()


def test_adopted_cgroup_is_judged_during_the_run_only(lab, fences, outside, service_cgroup) -> None:
    daemon, address = outside(MIGRATIONS, "--listen", "127.0.0.1:0", cgroup=service_cgroup)
    fences(Policy.no_egress("github.com"))  # skips (or fails) when no fence can be built
    fence = Fence(
        Policy.no_egress("github.com"), upstream=lab.upstream, services=[str(service_cgroup)]
    )
    with fence:
        result = fence.run(
            ["curl", "-sS", "-m", "10", "-X", "POST", f"http://{address}/migrate"], check=False
        )
    github = [v for v in result.violations if v.domain == "github.com"]
    assert github, result.events
    assert github[0].service == str(service_cgroup)
    assert github[0].called_by and github[0].called_by[0][1].startswith("curl ")
    # After the run: the daemon is untouched, and nothing of the fence is on its cgroup.
    assert daemon.poll() is None
    if not shutil.which("bpftool"):
        pytest.skip("bpftool is needed to see what is attached to a cgroup")
    attached = subprocess.run(
        ["bpftool", "cgroup", "show", str(service_cgroup)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert attached.stdout.strip() == "", attached.stdout


def test_unknown_service_is_a_clear_error(lab) -> None:
    from pytest_depfence import ConfigError

    with pytest.raises(ConfigError, match=r"no-such\.service.*Fence\(services=\)"):
        Fence(Policy.no_egress("github.com"), upstream=lab.upstream, services=["no-such.service"])


def _adopted_runs_at_once(lab: Lab, jobs: list[tuple[Path, str]], wait: float) -> list[FenceResult]:
    """For each (cgroup, address), at once, each in a thread of its own: a fence that
    adopts the cgroup runs `curl -X POST http://ADDRESS/migrate`; the results in order,
    all within `wait` seconds (an error in a thread is raised here)."""
    results: list[FenceResult | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def deploy(n: int, cgroup: Path, address: str) -> None:
        try:
            policy, services = Policy.no_egress("github.com"), [str(cgroup)]
            with Fence(policy, upstream=lab.upstream, services=services) as fence:
                results[n] = fence.run(
                    ["curl", "-sS", "-m", "10", "-X", "POST", f"http://{address}/migrate"],
                    check=False,
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(n, *job)) for n, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(wait)
    assert not errors, errors
    assert all(result is not None for result in results), f"a run did not end in {wait} s"
    return [result for result in results if result is not None]


@pytest.fixture
def two_service_cgroups(lab: Lab) -> Iterator[tuple[Path, Path]]:
    paths = tuple(cgroup2_mount() / f"depfence-test-adopted-{os.getpid()}-{n}" for n in (1, 2))
    for path in paths:
        path.mkdir()
    yield paths  # type: ignore[misc]
    for path in paths:
        kill_all(path)
        path.rmdir()


def test_two_fences_adopt_different_services_at_once(
    lab, fences, outside, two_service_cgroups
) -> None:
    fences(Policy.no_egress("github.com"))  # skips (or fails) when no fence can be built
    addresses = [
        outside(MIGRATIONS, "--listen", "127.0.0.1:0", cgroup=cgroup)[1]
        for cgroup in two_service_cgroups
    ]
    results = _adopted_runs_at_once(lab, list(zip(two_service_cgroups, addresses)), wait=60)
    for n, cgroup in enumerate(two_service_cgroups):
        result = results[n]
        github = [v for v in result.violations if v.domain == "github.com"]
        assert github, result
        assert {v.service for v in github} == {str(cgroup)}
        assert {v.called_by[0][1] for v in github} == {
            f"curl -sS -m 10 -X POST http://{addresses[n]}/migrate"
        }


def test_an_adopted_process_leaving_its_cgroup_is_not_killed(
    lab, fences, service_cgroup, tmp_path
) -> None:
    """Adopted services belong to their manager, which moves their processes as it likes:
    the fence's escape detection (which kills a fenced process that leaves) spares them.
    The fenced command asks the adopted process to move and waits (a FIFO) until it has."""
    fences(Policy.no_egress("github.com"))
    away = service_cgroup.parent / f"{service_cgroup.name}-away"
    away.mkdir()
    moved, go = tmp_path / "moved", tmp_path / "go"
    os.mkfifo(moved)
    os.mkfifo(go)
    # The child that moves is started during the run: a process the fence has a record of.
    child = f"echo $$ > {away}/cgroup.procs && echo $$ > {moved}; exec sleep 60"
    mover = subprocess.Popen(
        ["sh", "-c", f"read x < {go}; sh -c '{child}'"],
        preexec_fn=lambda: (service_cgroup / "cgroup.procs").write_text(str(os.getpid())),
    )
    try:
        services = [str(service_cgroup)]
        with Fence(Policy.no_egress("github.com"), upstream=lab.upstream, services=services) as f:
            result = f.run(["sh", "-c", f"echo go > {go}; read x < {moved}; echo $x"], timeout=20)
        moved_pid = int(result.stdout)
        assert (away / "cgroup.procs").read_text().split() == [str(moved_pid)], (
            "the adopted process was killed for leaving its cgroup"
        )
        assert not [e for e in result.events if e.is_escape]
    finally:
        mover.kill()
        mover.wait()
        kill_all(away)
        away.rmdir()


def test_cli_names_a_service_that_does_not_exist(lab) -> None:
    depfence = Path(sys.executable).with_name("depfence")
    done = subprocess.run(
        [depfence, "run", "--lab", "--service", "no-such.service", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 125
    assert "'no-such.service' from CLI flag --service: no such systemd unit" in done.stderr


# --------------------------------------------------------------------------- what must not pass

ONE_SHOT = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print("listening on 127.0.0.1:%d" % server.getsockname()[1], flush=True)
conn, _ = server.accept()
server.close()  # like `nc -l`: nobody listens any more, the connection lives on
conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nhi")
conn.recv(1)  # until the client closes: the connection stays open on this side
open(sys.argv[1]).read()  # holds the connection until the fixture stops it
"""


def test_a_one_shot_listener_is_named_and_judged(fences, outside, tmp_path) -> None:
    script, done = tmp_path / "one_shot.py", tmp_path / "done"
    script.write_text(ONE_SHOT)
    os.mkfifo(done)
    server, address = outside(script, done)
    fence = fences(Policy.egress_only())
    result = fence.run(["curl", "-sS", "-m", "10", f"http://{address}/"], check=False)
    [found] = _local_events(result, "tcp")
    assert found.forbidden, "a one-shot service outside the fence passed egress_only"
    assert found.listener is not None and f"pid {server.pid} " in found.listener


def test_a_refused_local_connection_is_on_record(fences) -> None:
    with socket.socket() as taken:  # a port nobody listens on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        fence = fences(Policy.egress_only())
        result = fence.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{port}/"], check=False)
    assert result.returncode != 0
    [found] = _local_events(result, "tcp")
    assert found.listener == NO_LISTENER and found.forbidden  # fail closed


def test_unix_rules_match_through_symlinks(fences, outside, tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    _, _ = outside(MIGRATIONS, "--unix", real / "d.sock")
    fence = fences(Policy.no_egress(f"unix:{real / 'd.sock'}"))
    result = fence.run(
        [
            "curl",
            "-sS",
            "-m",
            "10",
            "--unix-socket",
            str(tmp_path / "link" / "d.sock"),
            "http://d/",
        ],
        check=False,
    )
    [found] = _local_events(result, "unix")
    assert found.address == str(real / "d.sock") and found.forbidden


def test_a_service_name_used_again_starts_with_no_events(fences) -> None:
    fence = fences(Policy.no_egress("github.com"))
    first = fence.service(["getent", "hosts", "github.com"], name="m")
    _wait_exit(first)
    first.stop()
    assert first.violations
    second = fence.service(["sleep", "30"], name="m")
    assert second.events == []
    second.stop()


def test_ready_does_not_trust_another_listener(fences, outside) -> None:
    stranger, address = outside(PROXY, "--listen", "127.0.0.1:0")
    port = int(address.rsplit(":", 1)[1])
    fence = fences(Policy.no_egress("github.com"))
    with pytest.raises(
        ServiceNotReady, match=rf"another process listens there: pid {stranger.pid} "
    ):
        fence.service(["sleep", "30"], name="late", ready=port, ready_timeout=1.0)


@pytest.mark.parametrize("spec", ["/", "own"])
def test_the_fence_cannot_adopt_its_own_cgroup(lab, spec) -> None:
    from pytest_depfence import ConfigError
    from pytest_depfence.adopt import own_cgroup

    name = own_cgroup() if spec == "own" else spec
    with pytest.raises(ConfigError, match="cannot adopt"):
        Fence(Policy.no_egress("github.com"), upstream=lab.upstream, services=[name])


def test_two_fences_adopting_one_service_take_turns(lab, fences, outside, service_cgroup) -> None:
    fences(Policy.no_egress("github.com"))
    _, address = outside(MIGRATIONS, "--listen", "127.0.0.1:0", cgroup=service_cgroup)
    results = _adopted_runs_at_once(lab, [(service_cgroup, address)] * 2, wait=90)
    for n in (0, 1):
        github = [v for v in results[n].violations if v.domain == "github.com"]
        assert github and {v.service for v in github} == {str(service_cgroup)}
