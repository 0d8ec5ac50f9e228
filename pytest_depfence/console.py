"""Where `depfence run` writes: the command's output and the event log, from any thread;
and the signals that stop a run cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

from .events import EgressEvent
from .render import log_line


class Console:
    """The command's output and the event log, written as they come from any thread.

    One lock: a log line never lands inside a chunk of the command's stderr.
    A reader that went away (`depfence run ... | head`) stops that stream only;
    the command keeps running and its output keeps being drained.
    """

    def __init__(self, method: str, quiet: bool) -> None:
        self.method, self.quiet = method, quiet
        self._lock = threading.Lock()
        self._gone: set[int] = set()

    def output(self, stream: str, chunk: bytes) -> None:
        self._write(sys.stdout if stream == "stdout" else sys.stderr, chunk)

    def event(self, event: EgressEvent) -> None:
        if self.quiet and not event.forbidden:
            return
        self.log(log_line(event, self.method))

    def log(self, line: str) -> None:
        self._write(sys.stderr, line.encode() + b"\n")

    def say(self, text: str) -> None:
        """depfence's own results (the audit list) go to stdout."""
        self._write(sys.stdout, text.encode())

    def _write(self, stream: TextIO, data: bytes) -> None:
        with self._lock:
            if id(stream) in self._gone:
                return
            try:
                stream.flush()  # what print() left in its text buffer goes first
                stream.buffer.write(data)
                stream.buffer.flush()
            except BrokenPipeError:
                self._gone.add(id(stream))
                # Nothing more reaches it; keep interpreter shutdown from complaining too.
                with contextlib.suppress(OSError, ValueError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, stream.fileno())
                    os.close(devnull)


class Interrupted(BaseException):
    """depfence got SIGINT/SIGTERM/SIGHUP: stop the run (its cgroup is killed) and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first terminating signal into Interrupted, so every cleanup runs (the run's
    cgroup killed and removed, the lab left); later ones are ignored until cleanup is done."""
    caught: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if caught:
            return
        caught.append(signum)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {
        sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
