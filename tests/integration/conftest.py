"""Shared fixtures of the privileged suite: the session's lab, fences inside it, FIFO gates.

Every fenced test here runs inside the lab that `--depfence-lab` builds for the
whole session (a private network namespace with fake github.com, its own
resolver at 10.77.0.53 / fd77::53): a fenced client that escaped the fence
could still reach nothing but the lab. Without that flag, or without root,
the tests that need it skip and say why; they never fall back to the
machine's network or resolver.

Synchronisation with fenced scripts goes through FIFOs (`Fifo`), never sleeps:
the test holds each FIFO open read-write, so a script's `echo x > fifo` or
`read x < fifo` never blocks on open, and the test waits for a line with a
deadline instead of hanging when a script dies.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers_net import skip_or_fail

from pytest_depfence import confine, enter, plugin

if TYPE_CHECKING:
    from pytest_depfence import Fence, Policy
    from pytest_depfence.lab import Lab

HERE = Path(__file__).resolve().parent
#: The test that checks nothing was left behind runs after every other test.
LAST = (HERE / "test_cleanup.py", "test_nothing_left_behind")

NOT_ROOT = "the fence tests need root (cgroups, eBPF, a network namespace)"
NO_LAB = (
    "this test runs fenced clients and needs the session to be inside the lab: "
    "run pytest with --depfence-lab (it never touches the machine's network or resolver)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [i for i in items if (Path(str(i.path)), i.name) == LAST]
    if last:
        items[:] = [i for i in items if i not in last] + last


# --------------------------------------------------------------------------- lab, fences


@pytest.fixture(scope="session")
def lab(pytestconfig: pytest.Config) -> Lab:
    """The lab the plugin entered for this session (`--depfence-lab`); skip without it."""
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT)
    the_lab = pytestconfig.stash.get(plugin.LAB_KEY, None)
    if the_lab is None:
        pytest.skip(NO_LAB)
    return the_lab


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fenced clients inherit no HTTP proxy setting: a proxy would be unreachable in the lab."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def fenced(lab: Lab, clean_env: None, fenced: Fence) -> Fence:
    """The plugin's `fenced`, but only inside the lab (it skips before building a fence)."""
    return fenced


@pytest.fixture
def fences(
    lab: Lab, clean_env: None, pytestconfig: pytest.Config
) -> Iterator[Callable[[Policy], Fence]]:
    """Open library-API fences (`fences(policy, **Fence kwargs)`; upstream: the lab
    resolver); all are closed at teardown."""
    from pytest_depfence import Fence
    from pytest_depfence.errors import FenceUnavailable
    from pytest_depfence.kernel import load

    try:
        load()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)
    opened: list[Fence] = []

    def make(policy: Policy, **kwargs: Any) -> Fence:
        fence = Fence(policy, upstream=lab.upstream, **{"label": "lib", **kwargs}).open()
        opened.append(fence)
        return fence

    yield make
    for fence in opened:
        fence.close()


# --------------------------------------------------------------------------- FIFO gates


class Fifo:
    """A named pipe held open read-write by the test, so scripts never block opening it.

    A script signals with `echo line > PATH` and the test waits with
    `read_line()`; the test releases a script waiting in `read x < PATH` with
    `write_line()`.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def __str__(self) -> str:
        return str(self.path)

    def read_line(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line on {self.path} within {timeout}s")
            if poller.poll(remaining * 1000):
                try:
                    self._buffer += os.read(self.fd, 4096)
                except BlockingIOError:
                    pass
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def write_line(self, text: str = "go") -> None:
        os.write(self.fd, text.encode() + b"\n")

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Callable[[str], Fifo]]:
    """Make FIFOs in tmp_path (`fifo("ready")`); closed at teardown."""
    made: list[Fifo] = []

    def make(name: str) -> Fifo:
        made.append(Fifo(tmp_path / name))
        return made[-1]

    yield make
    for f in made:
        f.close()


@pytest.fixture(params=["depfence-enter", "sh + unshare"])
def entry(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """What fenced commands enter through (confine.py): depfence-enter, or the chain used
    where it cannot be built. Asked for before `fenced`, which opens the fence.
    depfence-enter drops the capabilities and takes the seccomp filter itself; for the
    chain, the thread that starts it does (confine.start)."""
    if request.param == "sh + unshare":
        monkeypatch.setattr(confine, "_tools", confine.Tools(unshare=shutil.which("unshare")))
    elif confine.prepare().enter is None:
        assert shutil.which("cc") is None, enter.reason()  # a compiler whose build failed
        pytest.skip(f"no depfence-enter here: {enter.reason()}")
    return request.param
