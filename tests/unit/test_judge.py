"""The judge's every verdict path, without root: DNS queries and answers, learned
addresses, connections and queries past the proxy, in block and audit mode."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import pytest
from dnslib import CNAME, QTYPE, RCODE, RR, A, DNSRecord

from pytest_depfence.addresses import FROM_DNS, FROM_HOSTS, FROM_RULE, AddressBook, IPAddress
from pytest_depfence.dnsproxy import Query
from pytest_depfence.judge import OWNERLESS, UNJUDGED, UNJUDGED_QUERY, Judge
from pytest_depfence.outages import OUTAGES
from pytest_depfence.policy import Policy
from pytest_depfence.procinfo import Attribution

GITHUB = ipaddress.ip_address("10.77.1.1")
MIRROR = ipaddress.ip_address("10.77.2.1")
GITHUB6 = ipaddress.ip_address("fd77::1:1")
WHO = Attribution(4312, "curl -s http://github.com/", ((4301, "sh deploy.sh"),))


class Trie:
    """Stands in for the kernel's address trie (`kernel.Programs` as an `AddressSink`)."""

    def __init__(self) -> None:
        self.verdicts: dict[str, str] = {}
        self.forgotten: list[int] = []

    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        self.verdicts[str(network)] = verdict

    def forget_networks(self, fence_id: int, networks: object) -> None:
        self.forgotten.append(fence_id)


@dataclass(frozen=True)
class Conn:
    """Stands in for `kernel.ConnEvent`: the fields the judge reads."""

    address: IPAddress
    port: int = 443
    protocol: str = "tcp"
    action: str = "refused"
    where: str = "connect"


@dataclass(frozen=True)
class Bypass:
    """Stands in for `kernel.BypassEvent`: the fields the judge reads."""

    name: str
    audited: bool = False
    address: IPAddress = ipaddress.ip_address("10.77.0.99")
    port: int = 5300
    protocol: str = "udp"
    qtype: int = 1
    unjudged: str | None = None


def judge(policy: Policy, mode: str = "block", outage: str = "nxdomain") -> tuple[Judge, Trie]:
    trie = Trie()
    return Judge(policy, mode, outage, AddressBook(7, trie)), trie


def query(name: str) -> Query:
    return Query(name, "A", "udp", ("127.0.0.1", 40000), 5353, 0x1234)


def reply(name: str, *records: RR) -> bytes:
    record = DNSRecord.question(name).reply()
    for rr in records:
        record.add_answer(rr)
    return record.pack()


NO_GITHUB = Policy.no_egress("github.com", source="marker at test_x.py:3")
ONLY_MIRROR = Policy.egress_only("mirror.internal", source="marker at test_x.py:4")


# -- queries -------------------------------------------------------------------------


def test_an_allowed_name_is_forwarded_and_not_forbidden() -> None:
    j, _ = judge(NO_GITHUB)
    verdict = j.query("mirror.internal")
    assert (verdict.blocked, verdict.forbidden) == (False, False)
    assert j.dns_event(query("mirror.internal"), verdict, WHO).rule is None


@pytest.mark.parametrize("outage", ["nxdomain", "servfail", "refused", "timeout"])
def test_a_blocked_name_gets_each_dns_outage(outage: str) -> None:
    j, _ = judge(NO_GITHUB, outage=outage)
    verdict = j.query("API.GitHub.com.")
    assert (verdict.blocked, verdict.forbidden, verdict.rcode) == (
        True,
        True,
        OUTAGES[outage].rcode,
    )
    event = j.dns_event(query("api.github.com"), verdict, WHO)
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "dns", outage)
    assert event.rule == 'no_egress("github.com") [marker at test_x.py:3]'


@pytest.mark.parametrize("policy", [NO_GITHUB, Policy.egress_only("mirror.internal")])
def test_a_query_past_the_proxy_the_kernel_could_not_judge(policy: Policy) -> None:
    j, _ = judge(policy)
    event = j.bypass(Bypass("API", qtype=0, unjudged="compression pointer in the question"), WHO)
    assert (event.domain, event.qtype, event.forbidden) == ("api", "?", True)
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "packet", "dropped")
    assert event.rule == UNJUDGED_QUERY.format(reason="compression pointer in the question")
    nameless = j.bypass(Bypass("", unjudged="message cut short"), WHO)
    assert (nameless.domain, nameless.qtype) == (None, "A")
    assert (event.pid, event.cmdline, event.ancestry) == (WHO.pid, WHO.cmdline, WHO.ancestry)


@pytest.mark.parametrize("outage", ["reset", "blackhole"])
def test_a_connect_level_outage_lets_the_name_resolve_but_forbids_it(outage: str) -> None:
    j, _ = judge(NO_GITHUB, outage=outage)
    verdict = j.query("github.com")
    assert (verdict.blocked, verdict.forbidden) == (False, True)
    event = j.dns_event(query("github.com"), verdict, WHO)
    assert (event.verdict, event.forbidden, event.outage) == ("allowed", True, outage)


def test_audit_mode_forbids_without_blocking_and_shows_no_outage() -> None:
    j, _ = judge(NO_GITHUB, mode="audit")
    verdict = j.query("github.com")
    assert (verdict.blocked, verdict.forbidden) == (False, True)
    event = j.dns_event(query("github.com"), verdict, WHO)
    assert (event.verdict, event.outage, event.is_violation) == ("allowed", None, True)


def test_egress_only_blocks_other_names_and_names_the_whole_allowlist() -> None:
    j, _ = judge(ONLY_MIRROR)
    assert j.query("mirror.internal").forbidden is False
    verdict = j.query("github.com")
    assert verdict.blocked and verdict.rule is None
    event = j.dns_event(query("github.com"), verdict, WHO)
    assert event.rule == 'egress_only("mirror.internal") [marker at test_x.py:4]'


# -- answers -------------------------------------------------------------------------


def test_a_cname_chain_through_a_blocked_name_forbids_the_query() -> None:
    j, trie = judge(NO_GITHUB)
    name = "downloads.mirror.internal"
    verdict = j.answer(
        name,
        reply(
            name,
            RR(name, QTYPE.CNAME, rdata=CNAME("objects.github.com")),
            RR("objects.github.com", QTYPE.A, rdata=A(str(GITHUB))),
        ),
        j.query(name),
    )
    assert (verdict.blocked, verdict.forbidden, verdict.via_cname) == (
        True,
        True,
        "objects.github.com",
    )
    rule = j.dns_event(query(name), verdict, WHO).rule
    assert rule == 'no_egress("github.com") [marker at test_x.py:3] via CNAME objects.github.com'
    # Learned before the client sees the answer: the address is refused at connect.
    assert trie.verdicts == {f"{GITHUB}/32": "block"}
    assert [(e.name, e.origin) for e in j.book.names_of(GITHUB)] == [
        ("objects.github.com", FROM_DNS)
    ]


def test_an_answer_for_a_blocked_name_to_a_query_that_only_looks_like_it_is_forbidden() -> None:
    """The query's one label `github.com` (a dot inside it: `github\\.com`) is not the
    name github.com; an upstream that answers it for github.com (the lab's does) gives
    a blocked name's address, which is judged as a CNAME into it would be."""
    j, trie = judge(NO_GITHUB)
    asked = "github\\.com"
    assert not j.query(asked).blocked
    answer = reply("github.com", RR("github.com", QTYPE.A, rdata=A(str(GITHUB))))
    verdict = j.answer(asked, answer, j.query(asked))
    assert (verdict.blocked, verdict.forbidden, verdict.via_cname) == (True, True, "github.com")
    assert trie.verdicts == {f"{GITHUB}/32": "block"}


def test_an_allowed_answer_under_no_egress_is_noted_not_judged() -> None:
    j, trie = judge(NO_GITHUB)
    before = j.query("mirror.internal")
    after = j.answer(
        "mirror.internal",
        reply("mirror.internal", RR("mirror.internal", rdata=A(str(MIRROR)))),
        before,
    )
    assert after is before
    assert trie.verdicts == {}
    assert [e.name for e in j.book.names_of(MIRROR)] == ["mirror.internal"]


def test_egress_only_learns_allowed_answers_and_refuses_forbidden_chains() -> None:
    j, trie = judge(ONLY_MIRROR)
    j.answer(
        "mirror.internal",
        reply("mirror.internal", RR("mirror.internal", rdata=A(str(MIRROR)))),
        j.query("mirror.internal"),
    )
    assert trie.verdicts == {f"{MIRROR}/32": "allow"}
    name = "mirror.internal"
    verdict = j.answer(
        name,
        reply(
            name,
            RR(name, QTYPE.CNAME, rdata=CNAME("cdn.example.org")),
            RR("cdn.example.org", rdata=A(str(GITHUB))),
        ),
        j.query(name),
    )
    assert verdict.forbidden and verdict.via_cname == "cdn.example.org"
    assert f"{GITHUB}/32" not in trie.verdicts  # never allowed, refused by default


def test_audited_query_keeps_its_verdict_after_the_answer() -> None:
    j, trie = judge(NO_GITHUB, mode="audit")
    before = j.query("github.com")
    after = j.answer(
        "github.com", reply("github.com", RR("github.com", rdata=A(str(GITHUB)))), before
    )
    assert after is before and after.forbidden
    assert trie.verdicts == {f"{GITHUB}/32": "block"}


def _rr(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata


def bad_a_after_cname(name: str, target: str) -> bytes:
    """A CNAME `name` -> `target`, an A record of 6 bytes, then a good AAAA, by hand."""
    head = bytes(DNSRecord.question(name).reply().pack())
    header, question = head[:12], head[12:]
    ancount_3 = header[:6] + struct.pack("!H", 3) + header[8:]
    target_wire = b"".join(bytes([len(x)]) + x.encode() for x in target.split(".")) + b"\0"
    return (
        ancount_3
        + question
        + _rr(b"\xc0\x0c", QTYPE.CNAME, target_wire)
        + _rr(b"\xc0\x0c", QTYPE.A, GITHUB.packed + b"\0\0")
        + _rr(b"\xc0\x0c", QTYPE.AAAA, GITHUB6.packed)
    )


def test_a_bad_address_record_does_not_hide_a_cname_into_a_blocked_name() -> None:
    j, trie = judge(NO_GITHUB)
    name = "downloads.mirror.internal"
    answer = bad_a_after_cname(name, "github.com")
    with pytest.raises(Exception):  # noqa: B017 - what dnslib does with it: give up
        DNSRecord.parse(answer)
    verdict = j.answer(name, answer, j.query(name))
    assert (verdict.blocked, verdict.forbidden, verdict.via_cname) == (True, True, "github.com")
    assert not verdict.unjudged
    # The bad A is skipped; the AAAA after it is still read and learned.
    assert trie.verdicts == {f"{GITHUB6}/128": "block"}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"\x12\x34garbage", id="garbage"),
        pytest.param(b"\x12\x34\x81\x80" + bytes(8), id="no-question"),
        pytest.param(bad_a_after_cname("mirror.internal", "github.com")[:-30], id="cut-short"),
        pytest.param(
            bad_a_after_cname("mirror.internal", "github.com").replace(
                b"\x06github", b"\x3fgithub"
            ),
            id="cname-past-its-rdata",
        ),
    ],
)
@pytest.mark.parametrize("mode", ["block", "audit"])
def test_an_answer_that_cannot_be_read_is_servfail_and_on_record(answer: bytes, mode: str) -> None:
    j, trie = judge(NO_GITHUB, mode=mode)
    verdict = j.answer("mirror.internal", answer, j.query("mirror.internal"))
    assert (verdict.blocked, verdict.rcode, verdict.unjudged) == (True, RCODE.SERVFAIL, True)
    # Under no_egress nothing showed a blocked name: visible, not a violation.
    assert not verdict.forbidden
    event = j.dns_event(query("mirror.internal"), verdict, WHO)
    assert (event.verdict, event.blocked_at, event.outage) == ("blocked", "dns", "servfail")
    assert event.rule == UNJUDGED
    assert not event.forbidden
    assert trie.verdicts == {}


def test_an_unreadable_answer_is_a_violation_under_egress_only() -> None:
    j, _ = judge(ONLY_MIRROR)
    verdict = j.answer("mirror.internal", b"\x12\x34garbage", j.query("mirror.internal"))
    assert (verdict.blocked, verdict.forbidden, verdict.unjudged) == (True, True, True)
    event = j.dns_event(query("mirror.internal"), verdict, WHO)
    assert (event.forbidden, event.rule, event.outage) == (True, UNJUDGED, "servfail")


# -- learning ------------------------------------------------------------------------


def test_rules_and_preresolved_names() -> None:
    j, trie = judge(Policy.no_egress("github.com", "*.example.org", "140.82.112.0/20"))
    j.learn_rules()
    assert trie.verdicts == {"140.82.112.0/20": "block"}
    assert j.names_to_preresolve() == ["github.com"]  # wildcards cannot be resolved
    j.learn_upstream("github.com", [GITHUB])
    assert trie.verdicts[f"{GITHUB}/32"] == "block"
    assert judge(ONLY_MIRROR)[0].names_to_preresolve() == []


def test_hosts_entries_are_judged_for_policy_names_and_noted_for_others() -> None:
    j, trie = judge(NO_GITHUB)
    loopback = ipaddress.ip_address("127.0.0.1")
    j.learn_hosts(
        [(GITHUB, ("github.com",)), (MIRROR, ("mirror.internal",)), (loopback, ("github.com",))]
    )
    assert trie.verdicts == {f"{GITHUB}/32": "block"}
    assert [(e.name, e.origin) for e in j.book.names_of(MIRROR)] == [
        ("mirror.internal", FROM_HOSTS)
    ]
    assert j.book.names_of(loopback) == []
    allow, trie = judge(ONLY_MIRROR)
    allow.learn_hosts([(MIRROR, ("mirror.internal",)), (GITHUB, ("github.com",))])
    assert trie.verdicts == {f"{MIRROR}/32": "allow"}


# -- connections and queries past the proxy --------------------------------------------


def test_a_refused_connection_names_the_blocked_name_and_where_it_was_learned() -> None:
    j, _ = judge(NO_GITHUB)
    j.learn_upstream("github.com", [GITHUB])
    event = j.connection(Conn(GITHUB), WHO)
    assert (event.domain, event.learned_from, event.verdict, event.blocked_at) == (
        "github.com",
        "upstream",
        "blocked",
        "connect",
    )
    assert event.rule == 'no_egress("github.com") [marker at test_x.py:3]'
    assert (event.forbidden, event.outage, event.address, event.port) == (
        True,
        "refused",
        "10.77.1.1",
        443,
    )


def test_a_connection_refused_by_an_address_rule_says_rule() -> None:
    j, _ = judge(Policy.no_egress("10.77.1.0/24"))
    event = j.connection(Conn(GITHUB), WHO)
    assert (event.domain, event.learned_from, event.rule) == (
        None,
        FROM_RULE,
        'no_egress("10.77.1.0/24")',
    )


def test_egress_only_refusal_names_the_allowlist() -> None:
    j, _ = judge(ONLY_MIRROR)
    event = j.connection(Conn(GITHUB), WHO)
    assert event.rule == 'egress_only("mirror.internal") [marker at test_x.py:4]'


def test_a_permitted_contact_is_on_record_without_a_rule() -> None:
    j, _ = judge(NO_GITHUB)
    j.book.note(MIRROR, "mirror.internal", FROM_DNS)
    event = j.connection(Conn(MIRROR, action="allowed"), WHO)
    assert (event.verdict, event.forbidden, event.rule, event.domain) == (
        "allowed",
        False,
        None,
        "mirror.internal",
    )


@pytest.mark.parametrize(
    ("action", "where", "verdict", "at"),
    [
        ("audited", "connect", "allowed", None),
        ("reset", "connect", "blocked", "connect"),
        ("blackhole", "connect", "blocked", "packet"),
        ("refused", "packet", "blocked", "packet"),
    ],
)
def test_each_kernel_action(action: str, where: str, verdict: str, at: str | None) -> None:
    j, _ = judge(NO_GITHUB)
    event = j.connection(Conn(GITHUB, action=action, where=where), WHO)
    assert (event.verdict, event.blocked_at, event.forbidden) == (verdict, at, True)


def test_an_ownerless_packet_says_why_no_process_is_named() -> None:
    j, _ = judge(NO_GITHUB)
    event = j.connection(
        Conn(GITHUB, protocol="icmp", port=0, where="packet"),
        Attribution(None, None, (), OWNERLESS),
    )
    assert (event.pid, event.unattributed) == (None, OWNERLESS)


@pytest.mark.parametrize("audited", [False, True])
def test_a_query_past_the_proxy(audited: bool) -> None:
    j, _ = judge(NO_GITHUB)
    event = j.bypass(Bypass("api.github.com", audited=audited), WHO)
    assert (event.domain, event.qtype, event.forbidden) == ("api.github.com", "A", True)
    assert event.verdict == ("allowed" if audited else "blocked")
    assert event.outage == (None if audited else "dropped")
    assert event.rule == 'no_egress("github.com") [marker at test_x.py:3]'


class FullTrie(Trie):
    """Stands in for the kernel's address trie when it is full: the first `full` updates
    fail as bcc's table update does."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full = full

    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        if self.full:
            self.full -= 1
            raise Exception("Could not update table: No space left on device")  # noqa: TRY002
        super().add_network(fence_id, network, verdict)


def test_a_block_the_kernel_refused_is_tried_again_not_taken_as_known() -> None:
    trie = FullTrie(full=1)
    book = AddressBook(7, trie)
    with pytest.raises(Exception, match="No space left"):
        book.learn(GITHUB, "github.com", "dns", "block")
    book.learn(GITHUB, "github.com", "dns", "block")
    assert trie.verdicts == {f"{GITHUB}/32": "block"}
