"""Contacts with local services and the call chain of fenced services, without root.

The policy's local:/unix: patterns, the judge's verdict on a local contact under
each policy, the texts (terminal, log line, contract key, JSON record), and the
run's call chain: a service's event names the run's process that called the
service last before it. `Records` stands in for the kernel's process records
(the `procs` map), `NoAddresses` for its address trie.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import jsonschema
import pytest
from event_factory import event

from pytest_depfence import render
from pytest_depfence.addresses import AddressBook
from pytest_depfence.contract import Contract
from pytest_depfence.errors import PolicyError
from pytest_depfence.judge import LOCAL_OUTSIDE, Judge
from pytest_depfence.local import LocalListener
from pytest_depfence.policy import Policy
from pytest_depfence.procinfo import Attribution
from pytest_depfence.report import SCHEMA_PATH, event_from_record, event_record
from pytest_depfence.run import Member, Run

CURL = Attribution(4312, "curl -sS http://127.0.0.1:8080/migrate", ((4301, "sh ./deploy.sh"),))


class NoAddresses:
    """Stands in for the kernel's address trie: local contacts never touch it."""

    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        raise AssertionError("a local contact learned an address")

    def forget_networks(self, fence_id: int, networks: object) -> None:
        pass


def judge(policy: Policy, mode: str = "block") -> Judge:
    return Judge(policy, mode, "nxdomain", AddressBook(1, NoAddresses()))


def contact(policy: Policy, service: str | None = None, **where: object):  # noqa: ANN201
    fields = {"address": "127.0.0.1", "port": 3128, "protocol": "tcp", **where}
    return judge(policy).local_contact(
        CURL, listener="pid 812 squid -f /etc/squid.conf", service=service, **fields
    )


# --------------------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("pattern", "kind", "endpoint"),
    [
        ("local:3128", "local", "3128"),
        ("local:08080", "local", "8080"),
        ("unix:/run/docker.sock", "unix", "/run/docker.sock"),
        ("unix:@abstract-name", "unix", "@abstract-name"),
    ],
)
def test_local_patterns(pattern: str, kind: str, endpoint: str) -> None:
    [rule] = Policy.no_egress(pattern).rules
    assert (rule.kind, rule.endpoint, rule.name, rule.network) == (kind, endpoint, None, None)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("local:0", "'local:' takes a port number"),
        ("local:65536", "'local:' takes a port number"),
        ("local:http", "'local:' takes a port number"),
        ("unix:run/docker.sock", "'unix:' takes a socket's absolute path"),
        ("unix:", "'unix:' takes a socket's absolute path"),
    ],
)
def test_bad_local_patterns_name_the_value_and_where(pattern: str, reason: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.egress_only(pattern, source="marker at t.py:3")
    assert pattern in str(caught.value) and reason in str(caught.value)
    assert "t.py:3" in str(caught.value)


def test_the_same_local_rule_twice_is_one_rule() -> None:
    assert len(Policy.egress_only("local:3128", "local:03128").rules) == 1


def test_check_local_matches_port_or_path_only() -> None:
    policy = Policy.egress_only("local:3128", "unix:/run/docker.sock", "github.com")
    assert not policy.check_local("tcp", 3128, None).blocked
    assert not policy.check_local("udp", 3128, None).blocked
    assert policy.check_local("tcp", 3129, None).blocked
    assert not policy.check_local("unix", None, "/run/docker.sock").blocked
    assert policy.check_local("unix", None, "/run/other.sock").blocked
    assert policy.check_local("unix", None, "3128").blocked  # a path is never a port


# --------------------------------------------------------------------------- the judge


def test_no_egress_puts_a_local_contact_on_record_without_forbidding_it() -> None:
    found = contact(Policy.no_egress("github.com"))
    assert (found.verdict, found.forbidden, found.rule) == ("allowed", False, None)
    assert found.is_local and found.listener == "pid 812 squid -f /etc/squid.conf"
    assert (found.pid, found.cmdline, found.ancestry) == (CURL.pid, CURL.cmdline, CURL.ancestry)


def test_no_egress_forbids_a_local_service_it_names() -> None:
    found = contact(
        Policy.no_egress("unix:/run/docker.sock"),
        address="/run/docker.sock",
        port=None,
        protocol="unix",
    )
    assert found.forbidden and found.verdict == "allowed"  # on record: it was not refused
    assert found.rule == 'no_egress("unix:/run/docker.sock")'


def test_egress_only_forbids_an_unfenced_local_service_and_says_how_to_allow_it() -> None:
    policy = Policy.egress_only("mirror.internal")
    found = contact(policy)
    assert found.forbidden
    assert found.rule == LOCAL_OUTSIDE.format(policy=policy.describe(), pattern="local:3128")
    unix = contact(policy, address="/run/docker.sock", port=None, protocol="unix")
    assert 'allow "unix:/run/docker.sock"' in str(unix.rule)


def test_egress_only_allows_a_local_service_allowed_or_fenced() -> None:
    assert not contact(Policy.egress_only("local:3128")).forbidden
    assert not contact(Policy.egress_only("mirror.internal"), service="migrations").forbidden


# --------------------------------------------------------------------------- texts and records

LOCAL = dict(
    domain=None,
    address="/run/docker.sock",
    port=None,
    protocol="unix",
    verdict="allowed",
    blocked_at=None,
    rule=None,
    qtype=None,
    forbidden=False,
    outage=None,
    listener="pid 812 dockerd -H fd:// (unit docker.service)",
)


def test_a_local_contact_reads_with_its_listener() -> None:
    lines = render.format_event(event(**LOCAL))
    assert "unix:/run/docker.sock" in lines[0] and "(local service)" in lines[0]
    assert lines[-1].strip() == render.LISTENER.format(listener=LOCAL["listener"])
    log = render.log_line(event(**LOCAL), "blocklist")
    assert log.startswith("INFO LOCAL ALLOWED reason=FromLocalContact")
    assert 'listener="pid 812 dockerd -H fd:// (unit docker.service)"' in log


def test_a_service_event_reads_with_its_service_and_caller() -> None:
    found = event(service="migrations", called_by=((4312, CURL.cmdline), (4301, "sh ./deploy.sh")))
    lines = render.format_event(found)
    assert lines[1].strip().startswith("in service migrations: pid ")
    assert lines[2].strip() == f"called by pid 4312 {CURL.cmdline}"
    assert lines[3].strip() == "via pid 4301 sh ./deploy.sh"
    assert "service=migrations calledBy=4312" in render.log_line(found, "blocklist")


def test_contract_keys_of_local_contacts() -> None:
    tcp = event(**{**LOCAL, "address": "127.0.0.1", "port": 3128, "protocol": "tcp"})
    contract = Contract.from_events([event(**LOCAL), tcp])
    assert sorted(contract.entries) == ["127.0.0.1:3128/tcp", "unix:/run/docker.sock"]


def test_json_record_of_a_service_event_round_trips_and_matches_the_schema() -> None:
    schema = json.loads(Path(SCHEMA_PATH).read_text())
    found = event(service="migrations", called_by=((4312, CURL.cmdline),), listener=None)
    for one in (found, event(**LOCAL)):
        record = event_record(one)
        event_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"]}
        jsonschema.validate(record, {**event_schema, "$ref": "#/$defs/event"})
        assert event_from_record(json.loads(json.dumps(record))) == one


# --------------------------------------------------------------------------- the call chain


@dataclass(frozen=True)
class Record:
    pid: int
    ppid: int
    argv: tuple[str, ...]
    truncated: bool = False
    exited: bool = False
    cgroup_id: int = 0
    exe: str = ""


class Records:
    """Stands in for the kernel's process records (the `procs` map)."""

    def __init__(self, *records: Record) -> None:
        self.records = {r.pid: r for r in records}

    def process(self, pid: int, at_ns: int | None = None) -> Record | None:
        return self.records.get(pid)


def test_a_service_event_names_the_last_caller_before_it() -> None:
    command, service = 10, 20
    programs = Records(
        Record(100, 1, ("sh", "deploy.sh"), cgroup_id=command),
        Record(101, 100, ("curl", "one"), cgroup_id=command),
        Record(102, 100, ("curl", "two"), cgroup_id=command),
        Record(200, 1, ("migrations-service",), cgroup_id=service),
    )
    run = Run(programs, judge(Policy.no_egress("github.com")))  # type: ignore[arg-type]
    run.add_member(Member("command", command, Path("/c"), "/c", root_pid=100))
    run.add_member(Member("migrations", service, Path("/s"), "/s", root_pid=200, service=True))
    where = LocalListener(200, "migrations-service", "/s", None, 7)
    for when, caller in ((1, 101), (5, 102)):
        run._local(when, command, run.who(caller, command), where, "127.0.0.1", 8080, "tcp")
    blocked = event(pid=200, cmdline="migrations-service")
    run.add(0, blocked, service)  # before any call: no caller
    run.add(3, blocked, service)
    run.add(9, blocked, service)
    chains = [e.called_by for e in run.in_order() if e.service == "migrations" and e.domain]
    assert chains == [
        (),
        ((101, "curl one"), (100, "sh deploy.sh")),
        ((102, "curl two"), (100, "sh deploy.sh")),
    ]
    calls = [e for e in run.in_order() if e.is_local]
    assert [c.listener for c in calls] == ["service migrations: " + where.describe()] * 2
    assert not any(c.forbidden for c in calls)


def test_a_listener_inside_the_run_itself_is_its_own_traffic() -> None:
    run = Run(Records(), judge(Policy.egress_only()))  # type: ignore[arg-type]
    run.add_member(Member("command", 10, Path("/c"), "/c"))
    inside = LocalListener(300, "python3 -m http.server", "/c/sub", None, 8)
    run._local(1, 10, CURL, inside, "127.0.0.1", 8000, "tcp")
    assert run.in_order() == ()
    outside = replace(inside, cgroup="/system.slice/squid.service", unit="squid.service")
    run._local(2, 10, CURL, outside, "127.0.0.1", 3128, "tcp")
    [found] = run.in_order()
    assert found.forbidden and "unit squid.service" in str(found.listener)


def test_a_counted_local_contact_says_how_many_connections() -> None:
    counted = event(**{**LOCAL, "address": "127.0.0.1", "port": 3128, "protocol": "tcp"})
    [head, *_] = render.format_event(replace(counted, connections=5000))
    assert "(local service, 5000 connections)" in head
    [head, *_] = render.format_event(replace(counted, connections=1))
    assert "(local service, 1 connection)" in head
    assert "(local service)" in render.format_event(counted)[0]  # not counted: says nothing
