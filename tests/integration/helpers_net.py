"""Helpers of the address, outage and timeout tests: a timing client, event filters, hosts files.

The client is a file run as `sys.executable CLIENT ...`, not `python -c`: the
kernel records at most 255 bytes of each argument, and a test compares the
event's command line with the exact argv it ran.

`private_hosts` gives a fenced run its own /etc/hosts without touching the
machine's: the run happens in a fresh thread that unshares its mount
namespace (only that thread's) and bind-mounts a file over /etc/hosts there.
The fence reads /etc/hosts from the thread that calls `run()`, and the fenced
process inherits that thread's view.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pytest

from pytest_depfence import plugin

if TYPE_CHECKING:
    from pytest_depfence import EgressEvent, FenceResult

PY = sys.executable
#: dig asking the lab resolver itself (the fence sends it to its proxy), never the machine's.
DIG = ["dig", "@10.77.0.53", "+time=1", "+tries=1"]

# connect() (TCP) or sendto() (UDP) to HOST PORT, COUNT times, each with an optional
# timeout; prints one JSON line: per attempt the errno (or "timeout"/null) and the
# seconds the call took, measured around that call alone.
CLIENT = """\
import json, socket, sys, time
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
timeout = float(sys.argv[4]) if sys.argv[4] != "-" else None
count = int(sys.argv[5])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
attempts = []
for _ in range(count):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        start = time.perf_counter()
        try:
            if proto == "tcp":
                sock.connect(address)
            else:
                sock.sendto(b"x", address)
            error = None
        except socket.timeout:
            error = "timeout"
        except OSError as exc:
            error = exc.errno
        attempts.append({"error": error, "seconds": time.perf_counter() - start})
print(json.dumps({"address": address[0], "attempts": attempts}))
"""


def client_argv(
    tmp_path: Path,
    host: str,
    port: int = 80,
    *,
    proto: str = "tcp",
    timeout: float | None = None,
    count: int = 1,
) -> list[str]:
    """The argv that runs CLIENT against host:port (the script is written to tmp_path)."""
    script = tmp_path / "netclient.py"
    if not script.exists():
        script.write_text(CLIENT)
    return [
        PY,
        str(script),
        host,
        str(port),
        proto,
        "-" if timeout is None else str(timeout),
        str(count),
    ]


def connections(result: FenceResult, protocol: str = "tcp") -> list[EgressEvent]:
    """The events of connections (not DNS queries) over `protocol`.

    glibc's getaddrinfo connects a UDP socket to each answer address to sort
    them, so a name lookup can add udp events to port 80; tests look at tcp.
    """
    return [e for e in result.events if e.address is not None and e.protocol == protocol]


# --------------------------------------------------------------------------- hosts files

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18

T = TypeVar("T")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_hosts(hosts_file: Path, call: Callable[[], T]) -> T:
    """Run `call()` in a thread whose mount namespace shows `hosts_file` as /etc/hosts.

    Nothing outside that thread (and what it starts) sees the change; the
    namespace goes away with the thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            # Private first, so the bind mount cannot propagate back to the machine.
            _check(
                libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /"
            )
            _check(
                libc.mount(str(hosts_file).encode(), b"/etc/hosts", None, _MS_BIND, None),
                "mount --bind HOSTS /etc/hosts",
            )
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name="depfence-test-private-hosts")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def skip_or_fail(config: pytest.Config, exc: Exception) -> NoReturn:
    """What a fenced test does when no fence can be built: the plugin's reason, skipped,
    or failed under --depfence-require."""
    message = plugin.UNAVAILABLE.format(reason=exc)
    if config.stash[plugin.SETTINGS_KEY].require:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class AllowAll:
    """Stands in for the fence's judge in tests of the DNS proxy itself: every query
    allowed, nothing observed."""

    class Verdict:
        blocked = False
        rcode = None

    def query(self, query: object) -> Verdict:
        return self.Verdict()

    def sender(self, query: object) -> None:
        pass

    def answer(self, query: object, reply: bytes, verdict: Verdict) -> Verdict:
        return verdict

    def observe(self, query: object, verdict: Verdict) -> None:
        pass
