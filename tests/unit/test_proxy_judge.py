"""The fence's `run.ProxyJudge` names a query's sender as the kernel saw it when the proxy
asked (`sender`, before the reply), not when the query is observed (after the upstream's
answer, its failure, or drain()): by then the flow entry (client port, DNS id) may be
another query's, or gone."""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_depfence.addresses import AddressBook, IPNetwork
from pytest_depfence.dnsproxy import Query
from pytest_depfence.judge import DnsVerdict, Judge
from pytest_depfence.kernel import Owner
from pytest_depfence.policy import Policy
from pytest_depfence.run import ProxyJudge


@dataclass
class FakeRun:
    """The flow map as a dict, and the query events a run was told."""

    flows: dict[tuple[int, int], Owner] = field(default_factory=dict)
    told: list[tuple[str, int, Owner | None]] = field(default_factory=list)
    lookups_fail: bool = False

    def query_owner(self, query: Query) -> Owner | None:
        if self.lookups_fail:
            raise OSError("the flow map cannot be read")
        return self.flows.get((query.client[1], query.txid))

    def on_query(self, query: Query, verdict: DnsVerdict) -> None:
        self.told.append(("looked up when observed", query.txid, self.query_owner(query)))

    def on_query_from(self, query: Query, verdict: DnsVerdict, owner: Owner | None) -> None:
        self.told.append(("looked up when asked", query.txid, owner))


class NoSink:
    def add_network(self, fence_id: int, network: IPNetwork, verdict: str) -> None: ...

    def forget_networks(self, fence_id: int, networks: object) -> None: ...


def _proxy_judge(run: FakeRun) -> ProxyJudge:
    judge = Judge(Policy.no_egress("github.com"), "block", "nxdomain", AddressBook(1, NoSink()))
    return ProxyJudge(judge, lambda: run)  # type: ignore[arg-type,return-value]


def _query(name: str, txid: int, port: int = 40000) -> Query:
    return Query(name, "A", "udp", ("127.0.0.1", port), 53, txid)


CURL = Owner(pid=100, tid=100, cgroup_id=7)
WGET = Owner(pid=200, tid=200, cgroup_id=7)


def test_the_sender_is_the_one_the_kernel_named_when_the_query_arrived() -> None:
    run = FakeRun({(40000, 1): CURL})
    proxy_judge = _proxy_judge(run)
    query = _query("mirror.internal", 1)
    verdict = proxy_judge.query(query)
    proxy_judge.sender(query)
    run.flows[(40000, 1)] = WGET  # the same port and id, another sender, while upstream waits
    proxy_judge.observe(query, verdict)
    assert run.told == [("looked up when asked", 1, CURL)]


def test_a_query_the_upstream_never_answered_keeps_its_sender() -> None:
    run = FakeRun({(40000, 2): CURL})
    proxy_judge = _proxy_judge(run)
    query = _query("slow.internal", 2)
    verdict = proxy_judge.query(query)
    proxy_judge.sender(query)
    run.flows.clear()  # evicted before drain() observes the query
    proxy_judge.observe(query, verdict)
    assert run.told == [("looked up when asked", 2, CURL)]


def test_equal_queries_in_flight_at_once_keep_their_own_senders() -> None:
    run = FakeRun({(40000, 3): CURL})
    proxy_judge = _proxy_judge(run)
    first, again = _query("mirror.internal", 3), _query("mirror.internal", 3)
    verdicts = [proxy_judge.query(first)]
    proxy_judge.sender(first)
    run.flows[(40000, 3)] = WGET
    verdicts.append(proxy_judge.query(again))
    proxy_judge.sender(again)
    proxy_judge.observe(again, verdicts[1])
    proxy_judge.observe(first, verdicts[0])
    assert run.told == [("looked up when asked", 3, WGET), ("looked up when asked", 3, CURL)]


def test_a_blocked_query_is_observed_with_its_sender_and_nothing_is_kept() -> None:
    run = FakeRun({(40000, 4): CURL})
    proxy_judge = _proxy_judge(run)
    query = _query("api.github.com", 4)
    verdict = proxy_judge.query(query)
    proxy_judge.sender(query)
    assert verdict.blocked
    proxy_judge.observe(query, verdict)
    assert run.told == [("looked up when asked", 4, CURL)]
    assert proxy_judge._owners == {}


def test_a_lookup_that_fails_on_arrival_is_made_again_when_observed() -> None:
    run = FakeRun({(40000, 5): CURL}, lookups_fail=True)
    proxy_judge = _proxy_judge(run)
    query = _query("mirror.internal", 5)
    verdict = proxy_judge.query(query)
    proxy_judge.sender(query)
    run.lookups_fail = False
    proxy_judge.observe(query, verdict)
    assert run.told == [("looked up when observed", 5, CURL)]
