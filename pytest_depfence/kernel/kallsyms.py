"""bcc's compile, in a thread that sees a /proc/kallsyms of two lines.

Every bcc compile reads all of /proc/kallsyms into a hash table and frees it
again (`BFrontendAction::DoMiscWorkAround`, bcc 0.18 to today), only to learn
whether the kernel has `bpf_probe_read_kernel` and `bpf_probe_read_user`: when
it has not, bcc defines them as the older `bpf_probe_read`. That is 120,000
lines here, and 110-125 ms of a first fence's compile. Every kernel a fence
runs on has both: they came in 5.5, and the programs' events travel on ring
buffers, which came in 5.8.

So the compile runs in a thread of its own that first leaves the process's
mount namespace (`unshare(CLONE_NEWNS)` moves the calling thread only) and
bind-mounts a file naming just those two over /proc/kallsyms, in a copy of the
mount tree made private first, so nothing of it reaches the machine's. The
thread's namespace, and the mount, end with the thread. Where that cannot be
done (no CAP_SYS_ADMIN in this user namespace, no /proc/kallsyms), the compile
reads the real file, as bcc alone would: slower, the same programs.
"""

from __future__ import annotations

import ctypes
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

KALLSYMS_PATH = Path("/proc/kallsyms")
#: What bcc looks for, at an address it accepts as the kernel's (above 0x00ff...ff).
SHORT_KALLSYMS = (
    b"ffffffff81000000 T bpf_probe_read_kernel\nffffffff81000000 T bpf_probe_read_user\n"
)

_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000


def call_with_short_kallsyms(call: Callable[[], T]) -> T:
    """`call()` (a bcc compile) in a new thread that sees SHORT_KALLSYMS and ends with
    it; its result or its exception, here."""
    with ThreadPoolExecutor(1, thread_name_prefix="depfence-compile") as pool:
        return pool.submit(_call_seeing_short_kallsyms, call).result()


def _call_seeing_short_kallsyms(call: Callable[[], T]) -> T:
    try:
        short = tempfile.NamedTemporaryFile(prefix="depfence-kallsyms-")
    except OSError:
        return call()  # no temporary file to show: bcc reads the real one
    with short:
        short.write(SHORT_KALLSYMS)
        short.flush()
        _see_instead_of_kallsyms(short.name.encode())
        return call()


def _see_instead_of_kallsyms(path: bytes) -> None:
    """This thread sees `path` at /proc/kallsyms from now on, where it can be done (in a
    mount namespace of its own: never call it from a thread that lives on)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not KALLSYMS_PATH.exists() or libc.unshare(_CLONE_NEWNS) != 0:
        return
    # The copied tree shares propagation with the machine's until it is made private.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0:
        libc.mount(path, bytes(KALLSYMS_PATH), None, _MS_BIND, None)
