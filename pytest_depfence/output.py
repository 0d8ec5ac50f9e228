"""A fenced command's pipes: stdin fed and stdout/stderr drained in threads, stoppable.

The threads wait in poll(), never in a read or write, on their pipe and on a stop
pipe: `Output.finish` can always end them, even while a process outside the fence
(escaped, or a service it called) keeps the command's pipes open, so a run
returns by its deadline whoever holds its output.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

#: Seconds the output pipes may stay open once everything in the run's cgroup is dead:
#: a process outside the fence (escaped, or started through a service) that holds them
#: must not hold run() past its deadline.
OUTPUT_GRACE = 1.0
#: Bytes a stopped reader still takes from its pipe (what a holder keeps writing is cut).
_DRAIN_LIMIT = 1 << 20


class Output:
    """Feed stdin and drain stdout/stderr in threads, so a full pipe never blocks the script.

    The threads wait in poll(), never in a read or write, on their pipe and on a stop
    pipe: `finish` can always end them, even while a process outside the fence keeps
    the command's pipes open.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        data: bytes | None,
        on_output: Callable[[str, bytes], None] | None,
    ) -> None:
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._on_output = on_output
        self._stop_r, self._stop_w = os.pipe()
        self._threads: list[threading.Thread] = []
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if stream is not None:
                self._start(self._read, stream, name)
        if proc.stdin is not None:  # a pipe only when there is input to give
            self._start(self._write, proc.stdin, data or b"")

    def _start(self, target: Callable[..., None], stream: IO[bytes], arg: Any) -> None:
        name = f"depfence-{arg if isinstance(arg, str) else 'stdin'}"
        thread = threading.Thread(target=target, args=(stream, arg), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _ready(self, fd: int, event: int) -> bool:
        """Wait until `fd` is ready for `event` (or hung up); False once stopped."""
        poller = select.poll()
        poller.register(fd, event)
        poller.register(self._stop_r, select.POLLIN)
        return all(ready != self._stop_r for ready, _ in poller.poll())

    def _read(self, stream: IO[bytes], name: str) -> None:
        with stream:
            fd = stream.fileno()
            os.set_blocking(fd, False)
            stopping, budget = False, _DRAIN_LIMIT
            while budget > 0:
                # Once stopped, take what is already in the pipe, then leave.
                stopping = stopping or not self._ready(fd, select.POLLIN)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    if stopping:
                        return
                    continue
                if not chunk:
                    return
                self._chunks[name].append(chunk)
                if self._on_output is not None:
                    self._on_output(name, chunk)
                if stopping:
                    budget -= len(chunk)

    def _write(self, stream: IO[bytes], data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(BrokenPipeError), stream:  # the command stopped reading
            fd = stream.fileno()
            os.set_blocking(fd, False)
            while view and self._ready(fd, select.POLLOUT):
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view) :]

    def finish(self, grace: float = OUTPUT_GRACE) -> None:
        """Give the pipes `grace` seconds to end, then stop reading and writing them."""
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        os.write(self._stop_w, b"x")
        for thread in self._threads:
            thread.join(grace)  # at once, unless an on_output callback blocks
        if not any(thread.is_alive() for thread in self._threads):
            os.close(self._stop_r)
            os.close(self._stop_w)

    def text(self) -> tuple[str, str]:
        """stdout and stderr, decoded."""
        out, err = (b"".join(self._chunks[name]) for name in ("stdout", "stderr"))
        return out.decode(errors="replace"), err.decode(errors="replace")
