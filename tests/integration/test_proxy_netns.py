"""The DNS proxy's TCP forwards leave from its own network namespace.

Every proxy of a process is served by one loop thread (dnsproxy/loop.py), which
keeps the network namespace it started in: a proxy started in another (a second
lab, or the host after a lab) has its TCP clients' reader threads started by that
loop, and their pool threads, which connect to the upstream, by those readers. So a
pool thread's first step is to join the namespace its proxy was started in; were
it not to, its connections would leave from the loop's namespace. Here a thread in a
fresh namespace of its own (nothing in it: no packet can leave) starts as a pool
thread does, and ends up in the proxy's, the lab's.
"""

from __future__ import annotations

import os
import threading

import pytest
from helpers_net import AllowAll

from pytest_depfence.dnsproxy import DnsProxy
from pytest_depfence.lab import Lab
from pytest_depfence.lab.netns import _unshare_netns

NETNS = "/proc/thread-self/ns/net"


def test_a_pool_thread_started_elsewhere_joins_the_proxys_network_namespace(lab: Lab) -> None:
    host, port = lab.upstream.rsplit(":", 1)
    with DnsProxy(upstream=(host, int(port)), judge=AllowAll()) as dns:
        proxy_netns = os.stat(NETNS).st_ino
        seen: dict[str, int] = {}
        failed: list[BaseException] = []

        def pool_thread() -> None:
            try:
                _unshare_netns()  # the loop's namespace, say: not the proxy's
                seen["before"] = os.stat(NETNS).st_ino
                dns._pool_thread_started()
                seen["after"] = os.stat(NETNS).st_ino
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=pool_thread)
        thread.start()
        thread.join()
        assert failed == []
        assert seen["before"] != proxy_netns
        assert seen["after"] == proxy_netns
        assert dns.errors == []


def test_a_pool_thread_that_cannot_join_it_is_recorded(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_depfence.dnsproxy import proxy as proxy_module

    host, port = lab.upstream.rsplit(":", 1)
    with DnsProxy(upstream=(host, int(port)), judge=AllowAll()) as dns:
        monkeypatch.setattr(proxy_module, "_CLONE_NEWNET", 0x20000)  # CLONE_NEWNS: refused
        failed: list[BaseException] = []

        def pool_thread() -> None:
            try:
                _unshare_netns()
                dns._pool_thread_started()
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=pool_thread)
        thread.start()
        thread.join()
        assert len(failed) == 1 and dns.errors == failed
        assert "cannot join the DNS proxy's network namespace" in str(failed[0])
