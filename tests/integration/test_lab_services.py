"""The services behind transient dependencies, checked as tools: examples/tools/migrations-service,
examples/tools/forward-proxy and examples/deploy/transient.sh, run unfenced in the lab.

The fence's own tests of transient dependencies run these same tools fenced; here they are
only checked to do what their help says, against the lab's fake github.com.

Every process is forked from the test's thread, so it lives in the lab. A service resolves
names with the system resolver, as a real one does: it runs in its own mount namespace in which
/etc/resolv.conf names the lab's resolver (`unshare --mount`, then a bind mount; the machine's
file is untouched, and the machine's resolver is unreachable from the lab anyway).

Tests synchronise on a tool's `listening on` line, read with a deadline, never on a sleep; each
process started is stopped by its pid at teardown (SIGTERM, then SIGKILL after a deadline).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest

from pytest_depfence.lab.content import _make_tool_archive

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

_missing = [tool for tool in ("curl", "unshare", "mount") if shutil.which(tool) is None]
if _missing:
    pytest.skip(
        f"the lab service tests need {', '.join(_missing)} (apt-get install curl util-linux mount)",
        allow_module_level=True,
    )

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOOLS = EXAMPLES / "tools"
TRANSIENT = EXAMPLES / "deploy" / "transient.sh"
RELEASE = "/org/tool/releases/latest/download/tool.tgz"
SOURCE = f"http://github.com{RELEASE}"  # the migrations service's default
ARCHIVE = _make_tool_archive()  # byte-stable: what the lab's github.com serves at RELEASE
NXDOMAIN_SOURCE = "http://nothere.github.com/tool.tgz"  # the lab answers NXDOMAIN
MISSING_SOURCE = "http://mirror.internal/missing.tgz"  # the lab answers 404

pytestmark = pytest.mark.usefixtures("clean_env")


class Service:
    """A tool started in the background, once its `listening on ADDRESS` line is read."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, stderr: Path) -> None:
        self.proc = proc
        self.address = address  # as printed: HOST:PORT, [IPv6]:PORT or unix:PATH
        self.stderr = stderr

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; SIGKILL if it is still there after `timeout`. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


#: `start(tool, *args)`: see the `start` fixture.
Start = Callable[..., Service]


def read_line(stream: IO[bytes], timeout: float) -> str | None:
    """The first line of `stream`, or None at end of file; TimeoutError past the deadline."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN)
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no line within {timeout}s (so far: {data!r})")
        if poller.poll(remaining * 1000):
            chunk = os.read(stream.fileno(), 1)  # byte by byte: nothing past the line is taken
            if not chunk:
                return None
            data += chunk
    return data.decode().rstrip("\n")


@pytest.fixture(scope="module")
def lab_resolver(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """An argv prefix: run the rest with /etc/resolv.conf naming the lab's resolver."""
    from pytest_depfence.lab import Lab

    conf = tmp_path_factory.mktemp("resolver") / "resolv.conf"
    conf.write_text(f"nameserver {Lab.RESOLVER4}\n")
    # No --fork: unshare, then sh, exec the tool, so the tool keeps the pid Popen knows.
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(conf)]


@pytest.fixture
def start(lab: Lab, lab_resolver: list[str], tmp_path: Path) -> Iterator[Start]:
    """`start(tool, *args)`: run examples/tools/TOOL in the lab until the test ends."""
    started: list[Service] = []

    def start(tool: str, *args: str, timeout: float = 30.0) -> Service:
        stderr = tmp_path / f"{tool}.{len(started)}.stderr"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [*lab_resolver, str(TOOLS / tool), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        service = Service(proc, "", stderr)
        started.append(service)
        assert proc.stdout is not None
        line = read_line(proc.stdout, timeout)
        if line is None:
            status = proc.wait(timeout)
            pytest.fail(f"{tool} exited {status} before listening: {service.log()}")
        match = re.fullmatch(rf"{tool}: listening on (\S+)", line)
        assert match, f"{tool} printed {line!r}, not its listening line"
        service.address = match[1]
        return service

    yield start
    for service in started:
        service.stop()


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def served(lab: Lab) -> list[tuple[str, str, str]]:
    """The lab's HTTP log with each address as its lab name (a client may pick v4 or v6)."""
    names = {a: h.name for h in lab.hosts.values() for a in (h.ipv4, h.ipv6)}
    return [(names.get(address, address), host, path) for address, host, path in lab.http_log()]


#: How the lab's log shows one download of the release from github.com.
FETCHED = ("github.com", "github.com", RELEASE)


def migrated(source: str = SOURCE) -> str:
    return f"migrated: {len(ARCHIVE)} bytes from {source}\n"


# --------------------------------------------------------------------------- migrations-service


def test_migrate_fetches_the_release_from_the_labs_github(lab: Lab, start: Start) -> None:
    service = start("migrations-service", "--listen", "127.0.0.1:0")
    host, port = service.address.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    lab.clear_http_log()
    for method in ("POST", "GET"):
        done = curl("-fsS", "-X", method, f"{service.url}/migrate")
        assert (done.returncode, done.stdout) == (0, migrated()), done.stderr
    assert served(lab) == [FETCHED] * 2
    assert '"POST /migrate HTTP/1.1" 200' in service.log()


@pytest.mark.parametrize(
    ("source", "error"),
    [(NXDOMAIN_SOURCE, r"\[Errno -?\d+\] .+"), (MISSING_SOURCE, "HTTP Error 404: Not Found")],
    ids=["nxdomain", "404"],
)
def test_a_failing_source_answers_502_quickly(start: Start, source: str, error: str) -> None:
    service = start("migrations-service", "--listen", "127.0.0.1:0", "--source", source)
    began = time.monotonic()
    done = curl("-sS", "-w", "%{http_code}", "-X", "POST", f"{service.url}/migrate")
    took = time.monotonic() - began
    body, _, status = done.stdout.rpartition("\n")
    assert status == "502", done
    assert re.fullmatch(f"migration failed: {error}", body), body
    # The lab answers these at once: well inside the service's 5 s fetch timeout.
    assert took < 4.0, f"the 502 took {took:.1f}s"


def test_listens_on_ipv6(start: Start) -> None:
    service = start("migrations-service", "--listen", "[::1]:0")
    assert re.fullmatch(r"\[::1\]:[1-9]\d*", service.address), service.address
    done = curl("-gfsS", "-X", "POST", f"{service.url}/migrate")
    assert (done.returncode, done.stdout) == (0, migrated()), done.stderr
    other = curl("-gsS", "-o", "/dev/null", "-w", "%{http_code}", f"{service.url}/elsewhere")
    assert other.stdout == "404"


def test_unix_socket_serves_curl_and_is_removed_on_sigterm(start: Start, tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    service = start("migrations-service", "--unix", str(sock))
    assert service.address == f"unix:{sock}"
    done = curl("-fsS", "--unix-socket", str(sock), "-X", "POST", "http://x/migrate")
    assert (done.returncode, done.stdout) == (0, migrated()), done.stderr
    assert '"POST /migrate HTTP/1.1" 200' in service.log()
    assert service.stop() == 0
    assert not sock.exists()


def test_fetch_at_start_fetches_before_listening(lab: Lab, start: Start) -> None:
    lab.clear_http_log()
    service = start("migrations-service", "--listen", "127.0.0.1:0", "--fetch-at-start")
    assert served(lab) == [FETCHED]
    done = curl("-fsS", "-X", "POST", f"{service.url}/migrate")
    assert (done.returncode, done.stdout) == (0, migrated()), done.stderr
    assert served(lab) == [FETCHED] * 2


def test_fetch_at_start_without_its_source_never_listens(lab: Lab, lab_resolver: list[str]) -> None:
    tool = TOOLS / "migrations-service"
    argv = [str(tool), "--listen", "127.0.0.1:0", "--fetch-at-start", "--source", NXDOMAIN_SOURCE]
    done = subprocess.run(
        [*lab_resolver, *argv], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"migrations-service: cannot start: fetching {NXDOMAIN_SOURCE}")


# --------------------------------------------------------------------------- forward-proxy


def test_forward_proxy_relays_to_the_labs_github(lab: Lab, start: Start) -> None:
    proxy = start("forward-proxy", "--listen", "127.0.0.1:0")
    lab.clear_http_log()
    index = curl("-fsS", "-x", proxy.url, "http://github.com/")
    assert (index.returncode, index.stdout) == (0, "lab:github.com\n"), index.stderr
    release = subprocess.run(
        ["curl", "-fsS", "-x", proxy.url, SOURCE], capture_output=True, timeout=30, check=True
    )
    assert release.stdout == ARCHIVE
    head = curl("-fsSI", "-x", proxy.url, SOURCE)
    assert f"content-length: {len(ARCHIVE)}" in head.stdout.lower(), head
    assert served(lab) == [("github.com", "github.com", "/"), FETCHED, FETCHED]
    assert '"GET http://github.com/ HTTP/1.1" 200' in proxy.log()


def test_forward_proxy_refuses_connect_and_answers_502_for_unknown_hosts(start: Start) -> None:
    proxy = start("forward-proxy", "--listen", "127.0.0.1:0")
    quiet = ("-s", "-o", "/dev/null", "-x", proxy.url)
    tunnel = curl(*quiet, "--proxytunnel", "-w", "%{http_connect}", "http://github.com/")
    assert tunnel.stdout == "501"
    unknown = curl(*quiet, "-w", "%{http_code}", NXDOMAIN_SOURCE)
    assert unknown.stdout == "502"


@pytest.mark.parametrize("tool", ["migrations-service", "forward-proxy"])
def test_sigterm_stops_the_tool_cleanly(start: Start, tool: str) -> None:
    service = start(tool, "--listen", "127.0.0.1:0")
    # The pid that gets SIGTERM is the tool's own: unshare and sh exec'd it.
    argv = Path(f"/proc/{service.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert str(TOOLS / tool).encode() in argv
    assert service.stop() == 0
    assert "Traceback" not in service.log()


# --------------------------------------------------------------------------- transient.sh


def run_transient(service_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRANSIENT)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MIGRATIONS_URL": service_url},
    )


def test_transient_deploy_migrates_through_the_service(lab: Lab, start: Start) -> None:
    service = start("migrations-service", "--listen", "127.0.0.1:0")
    lab.clear_http_log()
    done = run_transient(service.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"transient.sh: running the migrations through {service.url}",
        migrated().rstrip("\n"),
        "transient.sh: deployed",
    ]
    # The script never named GitHub; the service it called fetched from there.
    assert served(lab) == [FETCHED]


def test_transient_deploy_fails_when_the_service_cannot_migrate(start: Start) -> None:
    service = start("migrations-service", "--listen", "127.0.0.1:0", "--source", NXDOMAIN_SOURCE)
    done = run_transient(service.url)
    assert done.returncode == 22  # curl -f: the service answered 502
    assert "502" in done.stderr
    assert "transient.sh: deployed" not in done.stdout
