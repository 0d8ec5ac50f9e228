"""A run's count of each permitted contact, from the kernel's reports and counts (no root).

bpf/sockaddr.c reports the first message of each key (fence cgroup, pid,
destination, hook) and counts every one in map `contacts`; when that map is
full it reports every message instead. `Kernel` stands in for the loaded
programs: its `counts` are what the map holds, taken (read and deleted) as
`Programs.take_contacts` does.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pytest_depfence.addresses import AddressBook
from pytest_depfence.judge import Judge
from pytest_depfence.kernel import ConnEvent
from pytest_depfence.kernel.abi import ContactKey
from pytest_depfence.policy import Policy
from pytest_depfence.run import Member, Run

COMMAND, SERVICE = 10, 20
#: A documentation address: never local, so never a local contact.
SERVER = ipaddress.ip_address("192.0.2.10")


class NoAddresses:
    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        pass

    def forget_networks(self, fence_id: int, networks: object) -> None:
        pass


class Kernel:
    """The loaded programs as far as a run's counts go (no process records)."""

    def __init__(self) -> None:
        self.counts: dict[ContactKey, int] = {}

    def process(self, pid: int, at_ns: int | None = None) -> None:
        return None

    def take_contacts(self, cgroup_ids: set[int]) -> dict[ContactKey, int]:
        taken = {k: n for k, n in self.counts.items() if k[0] in cgroup_ids}
        for key in taken:
            del self.counts[key]
        return taken


def conn(pid: int = 4312, cgroup_id: int = COMMAND, port: int = 443) -> ConnEvent:
    return ConnEvent(1, cgroup_id, pid, pid, SERVER, port, "tcp", "allowed", "connect")


def run_of(kernel: Kernel) -> Run:
    judge = Judge(
        Policy.no_egress("github.com"), "block", "nxdomain", AddressBook(1, NoAddresses())
    )
    run = Run(kernel, judge)  # type: ignore[arg-type]
    run.add_member(Member("command", COMMAND, Path("/c"), "/c"))
    run.add_member(Member("migrations", SERVICE, Path("/s"), "/s", service=True))
    return run


def test_the_first_report_is_the_record_and_the_kernel_counts_the_rest() -> None:
    kernel = Kernel()
    run = run_of(kernel)
    run.on_connection(conn())
    kernel.counts[conn().contact] = 5000
    run.count_contacts()
    [contact] = run.in_order()
    assert contact.connections == 5000 and contact.address == str(SERVER)
    assert kernel.counts == {}


def test_while_the_kernels_map_is_full_each_report_counts_once() -> None:
    kernel = Kernel()
    run = run_of(kernel)
    for _ in range(3):  # no room for the key: every message reported, none counted
        run.on_connection(conn())
    run.on_connection(conn(port=80))  # no room, then room: one more message
    run.on_connection(conn(port=80))  # ... inserted: reported and counted (with 3 after it)
    kernel.counts[conn(port=80).contact] = 4
    run.count_contacts()
    assert {e.port: e.connections for e in run.in_order()} == {443: 3, 80: 5}


def test_counts_taken_twice_add_up_on_one_record() -> None:
    kernel = Kernel()
    run = run_of(kernel)
    run.on_connection(conn(cgroup_id=SERVICE))
    kernel.counts[conn(cgroup_id=SERVICE).contact] = 3
    run.count_contacts({SERVICE})
    run.on_connection(conn(cgroup_id=SERVICE))  # the key was taken: its next message reported
    kernel.counts[conn(cgroup_id=SERVICE).contact] = 2
    run.count_contacts({SERVICE})
    [contact] = run.in_order()
    assert contact.connections == 5 and contact.service == "migrations"


def test_a_members_counts_are_taken_only_for_it() -> None:
    kernel = Kernel()
    run = run_of(kernel)
    run.on_connection(conn())
    run.on_connection(conn(cgroup_id=SERVICE))
    kernel.counts.update({conn().contact: 7, conn(cgroup_id=SERVICE).contact: 9})
    run.count_contacts({SERVICE})
    assert {e.service: e.connections for e in run.in_order()} == {None: None, "migrations": 9}
    assert kernel.counts == {conn().contact: 7}
