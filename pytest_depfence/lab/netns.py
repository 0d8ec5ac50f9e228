"""The lab's network namespace: entering a fresh one, leaving it, and putting addresses on lo.

The namespace is made with ``unshare`` in the calling thread only and
configured through pyroute2; it has only the lab addresses and host routes to
them, so anything off-lab is unreachable.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from pathlib import Path

from .errors import LabError

CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02  # from linux/if_addr.h: usable at once, no duplicate address detection


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _thread_netns_path() -> str:
    # /proc/self/ns/net is the thread-group leader's namespace, not this thread's.
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def _unshare_netns() -> None:
    """Move the calling thread (only) into a fresh network namespace.

    A bare unshare keeps the namespace anonymous: nothing is mounted under
    /run/netns, so a crashed run leaves nothing behind and the namespace dies
    with its last thread, process or socket.
    """
    libc = _libc()
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (the lab needs root: CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise LabError(f"cannot create the lab network namespace: {os.strerror(err)}{hint}")


def _setns(fd: int) -> None:
    libc = _libc()
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"cannot return to the original network namespace: {os.strerror(err)}")


def _ensure_ipv6() -> None:
    # /proc/sys/net resolves against the calling thread's namespace.
    for iface in ("all", "default", "lo"):
        path = Path(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6")
        try:
            if path.read_text().strip() != "0":
                path.write_text("0\n")
        except OSError as exc:
            raise LabError(f"IPv6 is unavailable in the lab namespace ({path}: {exc})") from exc


def _configure_addresses(addresses: list[tuple[str, int]]) -> None:
    """Bring lo up and put every lab address on it.

    Addresses live on lo rather than a dummy device: dummy is a module some
    kernels lack, and local traffic goes through the loopback device anyway.
    Only host routes exist, so anything off-lab is unreachable.
    """
    from pyroute2 import IPRoute  # heavy; only when a lab is built

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
        for address, family in addresses:
            prefixlen = 32 if family == socket.AF_INET else 128
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)
