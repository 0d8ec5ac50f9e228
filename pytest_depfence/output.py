"""A fenced command's pipes: stdin fed, stdout/stderr drained, by one poll() loop.

A run's loop runs in the caller's thread while it waits for the command
(`wait`: the command's exit comes as its pidfd turning readable), so a run
starts no thread for its output; a service's runs on one thread of its own
(`background()`), for the service's life. The loop waits in poll(), never in
a read or write, so `finish` always ends it by its grace, even while a process
outside the fence (escaped, or a service it called) keeps the command's pipes
open: a run returns by its deadline whoever holds its output.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

#: Seconds the output pipes may stay open once everything in the run's cgroup is dead:
#: a process outside the fence (escaped, or started through a service) that holds them
#: must not hold run() past its deadline.
OUTPUT_GRACE = 1.0
#: Bytes still taken from the pipes once their grace is over (what a holder keeps
#: writing is cut).
_DRAIN_LIMIT = 1 << 20
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLERR | select.POLLHUP


class Output:
    """stdin fed with `data`, stdout/stderr kept (and passed to `on_output` as they come),
    so a full pipe never blocks the script."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        data: bytes | None,
        on_output: Callable[[str, bytes], None] | None,
    ) -> None:
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._on_output = on_output
        self._poller = select.poll()
        #: Pipes still served: fd -> "stdout", "stderr" or "stdin".
        self._pipes: dict[int, str] = {}
        self._streams: dict[int, IO[bytes]] = {}
        for name, stream, events in (
            ("stdout", proc.stdout, _READ),
            ("stderr", proc.stderr, _READ),
            ("stdin", proc.stdin, _WRITE),  # a pipe only when there is input to give
        ):
            if stream is not None:
                fd = stream.fileno()
                os.set_blocking(fd, False)
                self._streams[fd], self._pipes[fd] = stream, name
                self._poller.register(fd, events)
        self._input = memoryview(data or b"")
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def _close(self, fd: int) -> None:
        self._poller.unregister(fd)
        del self._pipes[fd]

    def _step(self, timeout: float | None) -> list[int]:
        """One poll() of the pipes (and what else is registered) for up to `timeout`
        seconds: what is ready is read or written. Returns the other fds that are ready."""
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        others = []
        for fd, _ in self._poller.poll(ms):
            name = self._pipes.get(fd)
            if name is None:
                others.append(fd)
            elif name == "stdin":
                self._feed(fd)
            else:
                self._take(fd, name)
        return others

    def _take(self, fd: int, name: str) -> int:
        """Read what the pipe has now; closed at EOF. Returns the bytes read."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return 0
        if not chunk:
            self._close(fd)
            return 0
        self._chunks[name].append(chunk)
        if self._on_output is not None:
            self._on_output(name, chunk)
        return len(chunk)

    def _feed(self, fd: int) -> None:
        try:
            if self._input:
                self._input = self._input[os.write(fd, self._input) :]
        except BlockingIOError:
            return
        except BrokenPipeError:  # the command stopped reading
            self._input = memoryview(b"")
        if not self._input:
            self._close(fd)
            with contextlib.suppress(OSError):
                self._streams[fd].close()  # EOF on the command's stdin

    # -- a run: the caller's thread ------------------------------------------------------
    def wait(self, proc: subprocess.Popen[bytes], limit: float | None) -> bool:
        """Serve the pipes until the command exits (True: it still ran after `limit` s)."""
        pidfd = os.pidfd_open(proc.pid)
        try:
            self._poller.register(pidfd, select.POLLIN)
            deadline = None if limit is None else time.monotonic() + limit
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return proc.poll() is None
                if pidfd in self._step(left):
                    proc.wait()
                    return False
        finally:
            self._poller.unregister(pidfd)
            os.close(pidfd)

    # -- a service: a thread of its own -------------------------------------------------
    def background(self) -> Output:
        """Serve the pipes on a thread until they close or `finish` stops it."""
        self._stop_r, self._stop_w = os.pipe()
        self._poller.register(self._stop_r, select.POLLIN)
        self._thread = threading.Thread(target=self._serve, name="depfence-output", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while self._pipes and self._stop_r not in self._step(None):
            pass

    # -- both ----------------------------------------------------------------------------
    def finish(self, grace: float = OUTPUT_GRACE) -> None:
        """Give the pipes `grace` seconds to end, then take what they hold (up to a limit)
        and stop reading and writing them."""
        if self._thread is not None:
            self._thread.join(grace)
            os.write(self._stop_w, b"x")
            self._thread.join(grace)  # at once, unless an on_output callback blocks
            if self._thread.is_alive():
                return  # it still uses the pipes; they close with the process
        else:
            deadline = time.monotonic() + grace
            while self._pipes and (left := deadline - time.monotonic()) > 0:
                self._step(left)
        budget = _DRAIN_LIMIT
        for fd, name in list(self._pipes.items()):
            if name != "stdin":
                while budget > 0 and fd in self._pipes and (taken := self._take(fd, name)):
                    budget -= taken
        for stream in self._streams.values():
            with contextlib.suppress(OSError):
                stream.close()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)

    def text(self) -> tuple[str, str]:
        """stdout and stderr, decoded."""
        out, err = (b"".join(self._chunks[name]) for name in ("stdout", "stderr"))
        return out.decode(errors="replace"), err.decode(errors="replace")
